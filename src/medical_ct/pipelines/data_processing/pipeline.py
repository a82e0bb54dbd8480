"""Wiring of the data_processing pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    build_model_input,
    build_training_manifest,
    decode_images,
    decode_reviewed_feedback,
    ingest_mednist,
    report_data,
    report_feedback,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=ingest_mednist,
                inputs=["raw_store_has_files", "params:ingest"],
                outputs="raw_images",
                name="ingest_mednist",
            ),
            Node(
                func=decode_images,
                inputs=[
                    "raw_images",
                    "previous_decoded_raw_images",
                    "params:data_processing",
                ],
                outputs="decoded_raw_images",
                name="decode_raw_images",
            ),
            Node(
                func=decode_reviewed_feedback,
                inputs=[
                    "feedback_images",
                    "accepted_feedback_records",
                    "revoked_feedback_records",
                    "previous_accepted_records",
                    "previous_decoded_feedback_images",
                    "params:data_processing",
                ],
                outputs=["decoded_feedback_images", "accepted_records"],
                name="decode_feedback_images",
            ),
            Node(
                func=build_model_input,
                inputs=[
                    "decoded_raw_images",
                    "decoded_feedback_images",
                    "params:data_processing",
                ],
                outputs=["train_set", "validation_set", "test_set", "class_names", "dedupe_stats"],
                name="build_model_input",
            ),
            Node(
                func=report_data,
                inputs=[
                    "train_set",
                    "validation_set",
                    "test_set",
                    "class_names",
                    "decoded_raw_images",
                    "decoded_feedback_images",
                    "dedupe_stats",
                ],
                outputs=["data_report", "data_metrics", "dataset_fingerprint"],
                name="report_data",
            ),
            Node(
                func=build_training_manifest,
                inputs=[
                    "train_set",
                    "validation_set",
                    "test_set",
                    "class_names",
                    "accepted_records",
                ],
                outputs="training_manifest",
                name="build_training_manifest",
            ),
            Node(
                func=report_feedback,
                inputs=[
                    "pending_feedback_records",
                    "accepted_records",
                    "rejected_feedback_records",
                    "decoded_raw_images",
                    "decoded_feedback_images",
                ],
                outputs=["feedback_report", "feedback_metrics"],
                name="report_feedback",
            ),
        ]
    )
