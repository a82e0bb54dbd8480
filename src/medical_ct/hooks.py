"""Project hooks: parameters checked before anything runs; node timings in MLflow."""

import logging
import time
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl
from kedro.io import CatalogProtocol
from kedro.pipeline import Node, Pipeline

logger = logging.getLogger(__name__)


class ParameterCheckHook:
    """Checks the parameters a run will use before its first node starts.

    The nodes check them too, but a typo in the champion gate should fail in seconds, not
    after a download and a training run.
    """

    @hook_impl
    def before_pipeline_run(self, pipeline: Pipeline, catalog: CatalogProtocol) -> None:
        # Imported here: settings.py loads this module for every kedro command, even --help.
        from medical_ct.pipelines.data_processing.nodes import validate_ingest, validate_split
        from medical_ct.pipelines.evaluation.nodes import validate_gate
        from medical_ct.pipelines.training.nodes import validate_training_params

        checks = {
            "params:ingest": validate_ingest,
            "params:data_processing.split": validate_split,
            "params:training": validate_training_params,
            "params:champion_gate": validate_gate,
        }
        used = pipeline.inputs()
        for name, check in checks.items():
            if name in used:
                check(catalog.load(name))


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
