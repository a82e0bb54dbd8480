"""The data_processing pipeline: MedNIST ingest, decoding, dedupe, split and data report."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
