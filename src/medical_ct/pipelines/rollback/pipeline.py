"""Wiring of the rollback pipeline (not part of ``__default__`` nor of the weekly DAG)."""

from kedro.pipeline import Node, Pipeline

from .nodes import roll_back_champion


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=roll_back_champion,
                inputs=[
                    "registered_versions",
                    "champion_version",
                    "params:rollback",
                    "params:champion_gate",
                ],
                outputs=["champion_move", "rollback_record"],
                name="roll_back_champion",
            ),
        ]
    )
