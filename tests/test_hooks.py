"""The hooks: each parameter group's check is found, and imported only by runs that use it."""

import hashlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys

import pytest

from medical_ct.hooks import PARAMETER_CHECKS
from tests.conftest import (
    KEDRO,
    PROJECT_ROOT,
    assert_ok,
    build_mednist_tarball,
    kedro,
    make_project,
    mlflow_client,
    project_env,
    run_ingest,
)


def test_every_parameter_check_names_a_function():
    """The checks are named as strings (imported on demand): a renamed function must fail
    here, not in the first run that happens to use its group."""
    for group, check in PARAMETER_CHECKS.items():
        assert callable(pkgutil.resolve_name(check)), group


# What `kedro run --pipelines data_processing` imports of the project: its pipeline (Kedro
# imports only the requested one), the catalog's dataset classes and the hooks with the
# checks of the parameter groups the pipeline uses.
DATA_PROCESSING_IMPORTS = """
import json, pkgutil, sys
from pathlib import Path
from kedro.framework.project import pipelines
from kedro.framework.startup import bootstrap_project
bootstrap_project(Path(sys.argv[1]))
pipelines.set_requested(["data_processing"])
used = pipelines["data_processing"].inputs()
from medical_ct import changes, datasets, hooks, shards
for group, check in hooks.PARAMETER_CHECKS.items():
    if group in used:
        pkgutil.resolve_name(check)
print(json.dumps(sorted({"torch", "scipy.stats", "sklearn"} & sys.modules.keys())))
"""


def test_a_data_processing_run_does_not_import_torch():
    """Decoding and splitting need no torch, scipy.stats or scikit-learn: importing them cost every
    data_processing process (a weekly rerun, each of its Airflow tasks) about 5 s of start-up."""
    assert json_printed_by(DATA_PROCESSING_IMPORTS) == []


def json_printed_by(script: str, **env: str) -> object:
    """The JSON a script prints last, run in a fresh interpreter on the project (what it
    imports is then what a run imports)."""
    result = subprocess.run(
        [sys.executable, "-c", script, str(PROJECT_ROOT)],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT_ROOT,
        timeout=120,
        env={**os.environ, **env},
    )
    return json.loads(result.stdout.splitlines()[-1])


# What a run's start makes of the catalog: kedro-mlflow's hook makes every dataset in it.
CATALOG_AT_START = """
import json, sys
from pathlib import Path
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from medical_ct.datasets import MlflowReportDataset
bootstrap_project(Path(sys.argv[1]))
with KedroSession.create(project_path=Path(sys.argv[1])) as session:
    catalog = session.load_context().catalog
    imported = "matplotlib.pyplot" in sys.modules
    reports = [name for name in catalog.keys() if isinstance(catalog[name], MlflowReportDataset)]
    for name in reports:
        catalog[name].exists()  # makes the wrapped dataset: its type must resolve
print(json.dumps({"pyplot_at_start": imported, "reports": len(reports)}))
"""


def test_a_run_imports_matplotlib_only_when_it_saves_a_plot(tmp_path):
    """kedro-mlflow makes every dataset of the catalog at the start of a run; a report's
    wrapped dataset is made on first use, so that the plots' MatplotlibDataset does not import
    pyplot (0.4 s) in data_processing and most tasks of the weekly DAG. Every report's wrapped
    dataset is still made here once, so a wrong type in the catalog fails this test, not a
    run that reaches the save."""
    found = json_printed_by(
        CATALOG_AT_START,
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        KEDRO_DISABLE_TELEMETRY="1",
    )
    assert found["pyplot_at_start"] is False
    assert found["reports"] >= 10


@pytest.mark.e2e
def test_a_run_that_fails_midway_still_logs_where_its_time_went(tmp_path, sample_dir):
    """One class in the raw store: decoding runs, the model input refuses to be built with a
    message saying what to check, and the failed MLflow run still has the timings of what ran,
    the save after the last node that ended included (sent as the run fails)."""
    project = make_project(tmp_path / "project")
    shutil.copytree(sample_dir / "Hand", project / "data/01_raw/mednist/Hand")
    result = kedro(project, "run", "--pipeline", "data_processing")
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert "need images of at least 2 classes" in output and "check the raw store" in output
    client = mlflow_client(project)
    (run,) = client.search_runs([client.get_experiment_by_name("medical_ct").experiment_id])
    assert run.info.status == "FAILED"
    timings = {"node_seconds.decode_raw_images", "save_seconds.decoded_raw_images"}
    assert timings <= set(run.data.metrics)
    assert "node_seconds.build_model_input" not in run.data.metrics


def test_a_dag_task_failing_the_checks_marks_the_dag_runs_mlflow_run_failed(tmp_path, sample_dir):
    """The checks raise before Kedro's own try, so on_pipeline_error never ran: a later task of
    a DAG run that failed them left the DAG run's MLflow run FINISHED, naming no failed task."""
    project = make_project(tmp_path / "project")
    shutil.copytree(sample_dir / "Hand", project / "data/01_raw/mednist/Hand")  # ingest skips
    dag_run = {"AIRFLOW_CTX_DAG_ID": "medical_ct", "AIRFLOW_CTX_DAG_RUN_ID": "scheduled__1"}

    def task(task_id: str, *params: str) -> subprocess.CompletedProcess:
        args = ["run", "--pipeline", "data_processing", "--nodes", "ingest_mednist", *params]
        env = project_env(project, **dag_run, AIRFLOW_CTX_TASK_ID=task_id)
        return subprocess.run(
            [KEDRO, *args], cwd=project, env=env, capture_output=True, text=True, check=False
        )

    first = task("ingest_mednist")
    second = task("checked_again", "--params", "ingest.md5=not-an-md5")

    assert first.returncode == 0, first.stderr
    assert second.returncode != 0 and "md5" in second.stdout + second.stderr
    client = mlflow_client(project)
    (run,) = client.search_runs([client.get_experiment_by_name("medical_ct").experiment_id])
    assert run.info.run_name == "scheduled__1" and run.info.status == "FAILED"
    assert run.data.tags["airflow.failed_tasks"] == "checked_again"


SIGNED_QUERY = "X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=s3cr3t-token"


@pytest.mark.e2e
def test_a_signed_ingest_url_reaches_mlflow_without_its_token(tmp_path, http_server, sample_dir):
    """kedro-mlflow logs every node's parameters (``ingest.url``) and the run's ``--params``
    (tag ``runtime_params``): a presigned URL's signature was stored in clear in MLflow. The
    download itself must still be made with the whole URL."""
    base_url, root, requests = http_server
    tarball = build_mednist_tarball(sample_dir, root / "MedNIST.tar.gz")
    md5 = hashlib.md5(tarball.read_bytes()).hexdigest()
    project = make_project(tmp_path / "project")
    url = f"{base_url}/MedNIST.tar.gz?{SIGNED_QUERY}"

    result = run_ingest(project, url, md5)

    assert_ok(result)
    assert requests == [f"/MedNIST.tar.gz?{SIGNED_QUERY}"]  # the node got the real URL
    client = mlflow_client(project)
    (run,) = client.search_runs([client.get_experiment_by_name("medical_ct").experiment_id])
    assert run.data.params["ingest.url"] == f"{base_url}/MedNIST.tar.gz?<redacted>"
    logged = json.dumps([run.data.params, run.data.tags])
    assert "s3cr3t" not in logged and "AKIAEXAMPLE" not in logged
    assert "s3cr3t" not in result.stdout + result.stderr  # nor in the run's log
