"""Project pipelines."""

from collections.abc import Mapping

from kedro.framework.project import find_pipelines
from kedro.pipeline import Node, Pipeline

# Run on demand only: never by a plain `kedro run` nor by the weekly DAG (`__default__`).
ON_DEMAND = ("rollback", "rebuild")
# In `__default__`, monitoring measures the champion that served the prediction log before
# this run may train and promote another: training's first node waits for its summary.
MONITORING_OUTPUT = "monitoring_summary"
FIRST_TRAINING_NODE = "decide_training"


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines.

    Every node is tagged with the name of its pipeline: the weekly DAG runs each task from
    that pipeline alone (Kedro then imports only its modules), and ``kedro viz`` filters by it.

    Returns:
        A mapping from pipeline names to ``Pipeline`` objects; ``__default__`` runs the
        weekly ones (monitoring, data_processing, training, evaluation), not ``rollback`` or
        ``rebuild``.
    """
    pipelines = {
        name: pipeline.tag(name) for name, pipeline in find_pipelines(raise_errors=True).items()
    }
    pipelines["__default__"] = default_pipeline(pipelines)
    return pipelines


def default_pipeline(pipelines: Mapping[str, Pipeline]) -> Pipeline:
    """Every pipeline but the on-demand ones, with monitoring before training."""
    weekly = sum(pipeline for name, pipeline in pipelines.items() if name not in ON_DEMAND)
    if "monitoring" not in pipelines:
        return weekly
    return Pipeline(
        [
            runs_after(node, MONITORING_OUTPUT) if node.name == FIRST_TRAINING_NODE else node
            for node in weekly.nodes
        ]
    )


def runs_after(node: Node, dataset: str) -> Node:
    """``node`` with ``dataset`` as one more input that its function does not receive.

    Kedro orders nodes by their data only, and the Airflow DAG is generated from that order;
    an input is how a node is made to wait for another without changing what it computes.
    ``node.inputs`` lists the inputs in the order of the function's arguments, so they are
    passed on by position.
    """
    func = node.func

    def waiting(*args):
        return func(*args[:-1])

    waiting.__name__ = getattr(func, "__name__", "node")
    waiting.__doc__ = func.__doc__
    return Node(
        func=waiting,
        inputs=[*node.inputs, dataset],
        outputs=node.outputs,
        name=node.name,
        tags=node.tags,
    )
