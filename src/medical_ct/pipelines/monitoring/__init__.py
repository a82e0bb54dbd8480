"""The monitoring pipeline: input drift, prediction drift, confidence and feedback error rate
of the champion in production, from the prediction log since the last run."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
