"""Project hooks: how long each node takes, in the log and in the MLflow run."""

import logging
import time
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl
from kedro.pipeline import Node

logger = logging.getLogger(__name__)


class NodeTimingHook:
    """Logs each node's wall time as the MLflow metric ``node_seconds.<node name>``.

    kedro-mlflow records parameters, metrics and artifacts but not where the time goes; with
    these metrics the MLflow UI shows which step of a weekly run grew.
    """

    def __init__(self) -> None:
        self._started: dict[str, float] = {}

    @hook_impl
    def before_node_run(self, node: Node) -> None:
        self._started[node.name] = time.perf_counter()

    @hook_impl
    def after_node_run(self, node: Node, outputs: dict[str, Any]) -> None:
        seconds = time.perf_counter() - self._started.pop(node.name)
        logger.info("Node %s took %.1f s", node.name, seconds)
        if mlflow.active_run() is not None:
            mlflow.log_metric(f"node_seconds.{node.name}", seconds)
