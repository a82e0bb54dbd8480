"""Project hooks: parameters checked before anything runs; node timings in MLflow; no URL's
secrets in MLflow."""

import logging
import os
import pkgutil
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import mlflow
from kedro.framework.context import KedroContext
from kedro.framework.hooks import hook_impl
from kedro.io import CatalogProtocol
from kedro.pipeline import Node, Pipeline
from mlflow.entities import Metric

from medical_ct.redaction import redact_urls

logger = logging.getLogger(__name__)


# Each parameter group's check, as "module:attribute", imported only when the pipeline
# uses the group: `kedro run --pipelines data_processing` then imports no torch, scipy.stats
# or scikit-learn (about 5 s of its start-up; tests/test_hooks.py). Also, settings.py loads
# this module for every kedro command, even --help.
PARAMETER_CHECKS = {
    "params:ingest": "medical_ct.pipelines.data_processing.nodes:validate_ingest",
    "params:data_processing": (
        "medical_ct.pipelines.data_processing.nodes:DataProcessingParams.from_params"
    ),
    "params:training": "medical_ct.pipelines.training.nodes:TrainingParams.from_params",
    "params:calibration": "medical_ct.calibration:CalibrationParams.from_params",
    "params:champion_gate": "medical_ct.checks:validate_gate",
    "params:rollback": "medical_ct.pipelines.rollback.nodes:validate_rollback",
    "params:rebuild": "medical_ct.pipelines.rebuild.nodes:validate_rebuild",
    "params:monitoring": "medical_ct.pipelines.monitoring.nodes:MonitoringParams.from_params",
}


class ParameterCheckHook:
    """Checks the parameters a run will use before its first node starts.

    The nodes check them too, but a typo in the champion gate should fail in seconds, not
    after a download and a training run.
    """

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, pipeline: Pipeline, catalog: CatalogProtocol) -> None:
        used = pipeline.inputs()
        problems = []
        for name, check in PARAMETER_CHECKS.items():
            if name not in used:
                continue
            try:
                pkgutil.resolve_name(check)(catalog.load(name))
            except ValueError as error:
                problems.append(str(error))
        if len(problems) == 1:
            raise ValueError(problems[0])
        if problems:  # every group's problems at once: one run to fix them, not one each
            raise ValueError(
                f"{len(problems)} parameter groups are invalid: " + " | ".join(problems)
            )


class RedactUrlsHook:
    """Gives kedro-mlflow the parameters with every URL's query string and user info redacted.

    kedro-mlflow logs each node's ``params:`` inputs as MLflow parameters and the run's
    ``--params`` as the tag ``runtime_params``, and has no setting to leave a value out: a
    presigned ``ingest.url`` (``?X-Amz-Signature=...``) or ``https://user:password@host/...``
    was stored in clear for everyone who reads the tracking server.

    These hooks run first (tryfirst) and replace the values in what the later hooks see. The
    node still gets the real URL: Kedro hands ``before_node_run`` a copy of the node's inputs,
    and ``run_params`` is only a record of the run, made after the parameters were loaded.
    """

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        if run_params.get("runtime_params"):
            run_params["runtime_params"] = redact_urls(run_params["runtime_params"])

    @hook_impl(tryfirst=True)
    def before_node_run(self, inputs: dict[str, Any]) -> None:
        for name, value in inputs.items():
            if name.startswith("params:") or name == "parameters":
                inputs[name] = redact_urls(value)


class NodeTimingHook:
    """Logs where a run's time goes: each node's wall time as the MLflow metric
    ``node_seconds.<node name>``, and each dataset's load and save as ``load_seconds.<name>``
    and ``save_seconds.<name>``.

    kedro-mlflow records parameters, metrics and artifacts but not where the time goes; with
    these metrics the MLflow UI shows which step of a weekly run grew, and whether it was the
    work or the store (listing a bucket, reading last run's index).

    The timings are sent in one batch when each node ends (its loads and its time; its saves,
    which Kedro makes after, go with the next node's or at the end of the run): a request per
    timing took 0.3 s of every data_processing run (49 of them, 6 ms each on sqlite).
    """

    def __init__(self) -> None:
        self._started: dict[str, float] = {}
        self._timings: list[Metric] = []
        self._lock = threading.Lock()  # a ThreadRunner's nodes end in several threads

    def _start(self, key: str) -> None:
        self._started[key] = time.perf_counter()

    def _stop(self, key: str, metric: str) -> None:
        started = self._started.pop(key, None)
        if started is not None:
            seconds = time.perf_counter() - started
            with self._lock:
                self._timings.append(Metric(metric, seconds, int(time.time() * 1000), 0))

    def _send(self) -> None:
        with self._lock:
            timings, self._timings = self._timings, []
        if timings and (run := mlflow.active_run()) is not None:
            mlflow.MlflowClient().log_batch(run.info.run_id, metrics=timings)

    @hook_impl
    def before_node_run(self, node: Node) -> None:
        self._start(f"node:{node.name}")

    @hook_impl
    def after_node_run(self, node: Node, outputs: dict[str, Any]) -> None:
        started = self._started.get(f"node:{node.name}", time.perf_counter())
        logger.info("Node %s took %.1f s", node.name, time.perf_counter() - started)
        self._stop(f"node:{node.name}", f"node_seconds.{node.name}")
        self._send()

    @hook_impl
    def before_dataset_loaded(self, dataset_name: str) -> None:
        if not dataset_name.startswith(("params:", "parameters")):
            self._start(f"load:{dataset_name}")

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str) -> None:
        self._stop(f"load:{dataset_name}", f"load_seconds.{dataset_name}")

    @hook_impl
    def before_dataset_saved(self, dataset_name: str) -> None:
        self._start(f"save:{dataset_name}")

    @hook_impl
    def after_dataset_saved(self, dataset_name: str) -> None:
        self._stop(f"save:{dataset_name}", f"save_seconds.{dataset_name}")

    # tryfirst: before kedro-mlflow ends the run.
    @hook_impl(tryfirst=True)
    def after_pipeline_run(self) -> None:
        self._send()

    @hook_impl(tryfirst=True)
    def on_pipeline_error(self) -> None:
        self._send()


class AirflowRunTrackingHook:
    """Makes all tasks of one Airflow DAG run log into one MLflow run, as one `kedro run` does.

    Each task of the generated DAG runs its node in a new Kedro session, often in another
    process or on another worker, and kedro-mlflow would start an MLflow run per task. Airflow
    exports the DAG run's identity to its tasks' environment (``AIRFLOW_CTX_DAG_ID``,
    ``AIRFLOW_CTX_DAG_RUN_ID``): the first task creates an MLflow run tagged with it and the
    next tasks resume that run. Outside Airflow this hook does nothing.

    A task that fails is listed in the run's tag ``airflow.failed_tasks`` until a retry of it
    succeeds; while the list is not empty the run stays ``FAILED``, even when tasks that do
    not depend on the failed one finish after it.
    """

    def __init__(self) -> None:
        self._context: KedroContext | None = None
        self._run_id: str | None = None

    @hook_impl
    def after_context_created(self, context: KedroContext) -> None:
        self._context = context

    # tryfirst: before kedro-mlflow starts its run. The store and parameter checks (tryfirst
    # too, registered after this hook in settings.HOOKS) still come first, so that a task
    # failing them leaves no empty MLflow run behind.
    @hook_impl(tryfirst=True)
    def before_pipeline_run(self) -> None:
        self._run_id = None  # this instance serves every session of the process
        run = self._dag_run(create=True)
        if run is None:
            return
        mlflow_config = self._context.mlflow
        mlflow_config.tracking.run.id = self._run_id = run.info.run_id
        mlflow_config.tracking.run.name = run.info.run_name
        logger.info("Airflow DAG run %s logs into MLflow run %s", run.info.run_name, self._run_id)

    # Wraps every before_pipeline_run, the checks' too. A task failing the parameter or store
    # checks raised before Kedro's own try, so on_pipeline_error never ran: the DAG run's
    # MLflow run, made by an earlier task, stayed FINISHED and named no failed task.
    @hook_impl(wrapper=True, specname="before_pipeline_run")
    def record_a_failed_check(self) -> Iterator[None]:
        try:
            return (yield)
        except Exception:
            self._run_id = None
            if (run := self._dag_run(create=False)) is not None:
                self._run_id = run.info.run_id
                self._settle_run(task_failed=True)
            raise

    def _dag_run(self, create: bool) -> mlflow.entities.Run | None:
        """The MLflow run of this task's Airflow DAG run; None outside Airflow (or before the
        first task made it, unless ``create``)."""
        dag_id = os.environ.get("AIRFLOW_CTX_DAG_ID")
        dag_run_id = os.environ.get("AIRFLOW_CTX_DAG_RUN_ID")
        mlflow_config = getattr(self._context, "mlflow", None)  # set by kedro-mlflow's hook
        if not (dag_id and dag_run_id) or mlflow_config is None:
            return None
        experiment = mlflow.get_experiment_by_name(mlflow_config.tracking.experiment.name)
        if experiment is None and not create:
            return None
        client = mlflow.MlflowClient()
        return dag_run_tracking_run(client, experiment.experiment_id, dag_id, dag_run_id, create)

    # trylast: after kedro-mlflow has ended the run as FINISHED or FAILED.
    @hook_impl(trylast=True)
    def after_pipeline_run(self) -> None:
        self._settle_run(task_failed=False)

    @hook_impl(trylast=True)
    def on_pipeline_error(self) -> None:
        self._settle_run(task_failed=True)

    def _settle_run(self, task_failed: bool) -> None:
        if self._run_id is None:
            return
        client = mlflow.MlflowClient()
        run = client.get_run(self._run_id)
        recorded = run.data.tags.get(FAILED_TASKS_TAG, "")
        failed_tasks = set(filter(None, recorded.split(",")))
        task_id = os.environ.get("AIRFLOW_CTX_TASK_ID", "unknown")
        if task_failed:
            failed_tasks.add(task_id)
        else:
            failed_tasks.discard(task_id)
        if ",".join(sorted(failed_tasks)) != recorded:
            client.set_tag(self._run_id, FAILED_TASKS_TAG, ",".join(sorted(failed_tasks)))
        status = "FAILED" if failed_tasks else "FINISHED"
        # kedro-mlflow reopens the run in before_node_run and ends it once: without this the
        # run stays active in this process, and is ended FINISHED when the process exits.
        while (active := mlflow.active_run()) is not None and active.info.run_id == self._run_id:
            mlflow.end_run(status)
        if failed_tasks:
            client.set_terminated(self._run_id, "FAILED")
            logger.warning(
                "MLflow run %s stays FAILED: task(s) %s failed in this DAG run",
                self._run_id,
                ", ".join(sorted(failed_tasks)),
            )


DAG_ID_TAG = "airflow.dag_id"
DAG_RUN_ID_TAG = "airflow.dag_run_id"
FAILED_TASKS_TAG = "airflow.failed_tasks"


def dag_run_tracking_run(
    client: mlflow.MlflowClient,
    experiment_id: str,
    dag_id: str,
    dag_run_id: str,
    create: bool = True,
) -> mlflow.entities.Run | None:
    """The MLflow run of an Airflow DAG run: found by its tags, created by the first task
    (None when there is none and not ``create``).

    Tasks of a DAG run must not run concurrently the first time (the DAG's
    ``max_active_tasks: 1``), or two of them could both create one.
    """
    # No quoting needed: Airflow's ids match [A-Za-z0-9_.~:+-]+ (allowed_run_id_pattern).
    found = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{DAG_ID_TAG}` = '{dag_id}' and tags.`{DAG_RUN_ID_TAG}` = '{dag_run_id}'"
        ),
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if found or not create:
        return found[0] if found else None
    return client.create_run(
        experiment_id,
        run_name=dag_run_id,
        tags={DAG_ID_TAG: dag_id, DAG_RUN_ID_TAG: dag_run_id},
    )


class StoreUnavailableError(RuntimeError):
    """The S3 store of the catalog cannot be used; the message names the endpoint and bucket."""


class StoreCheckHook:
    """Fails a run before its first node when an S3 bucket of the catalog is not usable.

    An unreachable endpoint, refused credentials or a missing bucket would otherwise surface
    deep inside a node, possibly after minutes of retries; this check answers in seconds,
    before the MLflow run starts, so nothing is trained or registered.
    """

    def __init__(self) -> None:
        self._buckets: list[str] = []

    @hook_impl
    def after_context_created(self, context: KedroContext) -> None:
        catalog = context.config_loader["catalog"]
        self._buckets = sorted(set(_s3_buckets(catalog)))

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self) -> None:
        for bucket in self._buckets:
            check_bucket(bucket)


def check_bucket(bucket: str, timeout_s: float = 10.0) -> None:
    """Raise ``StoreUnavailableError`` unless ``bucket`` exists and the credentials may read it."""
    import botocore.exceptions
    import s3fs

    endpoint = (
        os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "the AWS default S3 endpoint"
    )
    where = f"S3 bucket {bucket!r} at {endpoint}"
    filesystem = s3fs.S3FileSystem(
        skip_instance_cache=True,
        config_kwargs={
            "connect_timeout": timeout_s,
            "read_timeout": timeout_s,
            "retries": {"max_attempts": 1},
        },
    )
    filesystem.retries = 1  # s3fs's own retry loop, on top of botocore's
    try:
        filesystem.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise StoreUnavailableError(
            f"{where} does not exist: create it or set MEDICAL_CT_S3_BUCKET"
        ) from None
    except PermissionError as error:
        raise StoreUnavailableError(
            f"{where} refused the credentials ({error}): check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        ) from None
    except (OSError, botocore.exceptions.BotoCoreError) as error:
        raise StoreUnavailableError(
            f"{where} is not reachable ({error}): check AWS_ENDPOINT_URL and the network"
        ) from None
    logger.info("Store check: %s is reachable", where)


def _s3_buckets(config: Any) -> Iterator[str]:
    """Buckets of every ``s3://`` path or filepath in a catalog configuration."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key in {"path", "filepath"} and isinstance(value, str):
                url = urlparse(value)
                if url.scheme in {"s3", "s3a", "s3n"}:
                    yield url.netloc
            else:
                yield from _s3_buckets(value)
    elif isinstance(config, list):
        for item in config:
            yield from _s3_buckets(item)
