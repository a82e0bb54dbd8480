"""The rebuild pipeline: a registered version's model input, read again from the stores."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
