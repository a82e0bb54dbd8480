"""The evaluation pipeline: test metrics, plots, registration and the champion gate."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
