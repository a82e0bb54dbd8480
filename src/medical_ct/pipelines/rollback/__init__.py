"""The rollback pipeline: point `champion` back at an earlier version, and record why."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
