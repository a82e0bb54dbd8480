"""Wiring of the training pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import decide_training, train_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=decide_training,
                inputs=[
                    "dataset_fingerprint",
                    "training_manifest",
                    "champion_model",
                    "registered_versions",
                    "params:retrain_on_same_data",
                    "params:min_new_images",
                ],
                outputs=["training_decision", "training_decision_metrics"],
                name="decide_training",
            ),
            Node(
                func=train_model,
                inputs=[
                    "train_set",
                    "validation_set",
                    "class_names",
                    "params:training",
                    "params:calibration",
                    "training_decision",
                ],
                outputs=["trained_model", "training_history", "calibration"],
                name="train_model",
            ),
        ]
    )
