"""Wiring of the rebuild pipeline (not part of ``__default__`` nor of the weekly DAG)."""

from kedro.pipeline import Node, Pipeline

from .nodes import rebuild_model_input


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=rebuild_model_input,
                inputs=["registered_versions", "raw_images", "feedback_images", "params:rebuild"],
                outputs=["rebuilt_model_input", "rebuild_report"],
                name="rebuild_model_input",
            ),
        ]
    )
