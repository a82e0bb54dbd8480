"""The training pipeline: a PyTorch classifier with early stopping."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
