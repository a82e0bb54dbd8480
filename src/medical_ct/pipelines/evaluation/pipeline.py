"""Wiring of the evaluation pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import evaluate_champion, evaluate_model, register_and_promote


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=evaluate_model,
                inputs=["trained_model", "test_set", "class_names", "calibration"],
                outputs=[
                    "evaluation",
                    "test_metrics",
                    "confusion_matrix_plot",
                    "misclassified_images_plot",
                    "reliability_diagram_plot",
                ],
                name="evaluate_model",
            ),
            Node(
                func=evaluate_champion,
                inputs=[
                    "champion_model",
                    "test_set",
                    "class_names",
                    "training_decision",
                    "registered_versions",
                ],
                outputs="champion_evaluation",
                name="evaluate_champion",
            ),
            Node(
                func=register_and_promote,
                inputs=[
                    "trained_model",
                    "evaluation",
                    "champion_evaluation",
                    "test_set",
                    "class_names",
                    "dataset_fingerprint",
                    "training_manifest",
                    "params:champion_gate",
                    "calibration",
                ],
                outputs=["promotion", "registered_training_manifest"],
                name="register_and_promote",
            ),
        ]
    )
