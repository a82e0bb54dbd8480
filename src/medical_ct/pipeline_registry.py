"""Project pipelines."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

# Run on demand only: never by a plain `kedro run` nor by the weekly DAG (`__default__`).
ON_DEMAND = ("rollback", "rebuild")


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines.

    Returns:
        A mapping from pipeline names to ``Pipeline`` objects; ``__default__`` runs the
        continuous-training ones (data_processing, training, evaluation), not ``rollback`` or
        ``rebuild``.
    """
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(
        pipeline for name, pipeline in pipelines.items() if name not in ON_DEMAND
    )
    return pipelines
