"""Wiring of the training pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import train_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=train_model,
                inputs=["train_set", "validation_set", "class_names", "params:training"],
                outputs=["trained_model", "training_history"],
                name="train_model",
            ),
        ]
    )
