"""`bentoml build` packages the champion; the Bento serves it with no MLflow reachable."""

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from medical_ct.registry import CHAMPION_ALIAS, MODEL_NAME
from medical_ct.serving.project import load_project, project_path, refuse_state_inside_bento
from tests.conftest import (
    BENTOML,
    PROJECT_ROOT,
    bentoml_server,
    free_port,
    jpeg,
    make_project,
    mlflow_client,
    project_env,
    wait_ready,
)

pytestmark = pytest.mark.e2e  # real servers and kedro runs


def run(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        args, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, (
        f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def test_bento_serves_the_packaged_champion_without_mlflow(
    trained_project, tmp_path, sample_dir, monkeypatch
):
    import sys

    build_home, serve_home = tmp_path / "build_home", tmp_path / "serve_home"
    build_env = project_env(
        trained_project,
        BENTOML_HOME=str(build_home),
        MEDICAL_CT_PROJECT_DIR=str(trained_project),
    )
    run([sys.executable, "-m", "medical_ct.serving.packaging"], build_env)
    build_env.pop("MEDICAL_CT_PROJECT_DIR")  # the build reads this repository's files
    run([BENTOML, "build"], build_env)
    archive = tmp_path / "medical_ct.bento"
    run([BENTOML, "export", "medical_ct:latest", str(archive)], build_env)
    # A fresh BentoML home that only has the exported Bento, and a registry nobody answers at.
    serve_env = {**build_env, "BENTOML_HOME": str(serve_home)}
    run([BENTOML, "import", str(archive)], serve_env)
    bento_dir = next(p for p in (serve_home / "bentos/medical_ct").iterdir() if p.is_dir())
    bento_src = bento_dir / "src"
    # What `bentoml containerize` builds from (docker is not run here).
    dockerfile = (bento_dir / "env/docker/Dockerfile").read_text()
    assert "bentoml" in dockerfile and "requirements.txt" in dockerfile
    requirements = (bento_dir / "env/python/requirements.txt").read_text()
    assert "torch==2.14.1" in requirements and "pandas-parquetdataset" in requirements
    # Replicas run it with KEDRO_ENV=s3 (README "Scale out"): conf/s3 and s3fs were left out.
    assert "s3fs" in requirements and "boto3" in requirements
    monkeypatch.setenv("MEDICAL_CT_S3_BUCKET", "hospital-bucket")
    in_s3 = load_project(bento_src, env="s3").catalog
    assert "s3://hospital-bucket/" in repr(in_s3.get("raw_images"))
    champion = mlflow_client(trained_project).get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS)
    refused = serve_without_settings(serve_env, bento_src, tmp_path)
    assert refused.returncode != 0
    assert f"serving from the Bento at {bento_dir} would write" in " ".join(refused.stdout.split())
    assert not (bento_src / "mlflow.db").exists() and not (bento_src / "data").exists()

    with bentoml_server(
        tmp_path,
        "medical_ct:latest",
        cwd=bento_src,  # as in a container: relative paths (PYTHONPATH=src) resolve here
        BENTOML_HOME=str(serve_home),
        MEDICAL_CT_PROJECT_DIR=str(bento_src),
        PYTHONPATH=str(bento_src / "src"),
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="3",
    ) as url:
        wait_ready(url)
        image = next((sample_dir / "HeadCT").iterdir()).read_bytes()
        response = httpx.post(f"{url}/predict", files={"image": jpeg(image)}, timeout=30)
        model = httpx.get(f"{url}/model", timeout=30).json()

    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == str(champion.version)
    assert model["version"] == str(champion.version)
    assert model["test_metrics"]["test_accuracy"] >= 0.7


def serve_without_settings(env: dict[str, str], bento_src: Path, cwd: Path):
    """`bentoml serve medical_ct:latest` as the README's Bento users ran it, with no
    MEDICAL_CT_PROJECT_DIR, S3 or MLflow settings: it served, writing the prediction log, the
    feedback and an empty mlflow.db inside the Bento store; it must refuse to start."""
    env = {key: value for key, value in env.items() if key != "MEDICAL_CT_PROJECT_DIR"}
    env.pop("MLFLOW_TRACKING_URI")
    env["PYTHONPATH"] = str(bento_src / "src")
    port = str(free_port())
    server = subprocess.Popen(
        [BENTOML, "serve", "medical_ct:latest", "--host", "127.0.0.1", "--port", port],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = server.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(server.args, server.returncode, output, "")


def test_a_bento_names_what_to_set_before_keeping_state_inside_itself(tmp_path, monkeypatch):
    """Found from a Bento's own folder, local stores and a local MLflow store would live in
    the Bento store; remote ones, or MEDICAL_CT_PROJECT_DIR set on purpose, are served."""
    bento = tmp_path / "bentos/medical_ct/v1"
    src = make_project(bento / "src")
    (bento / "bento.yaml").write_text("service: service:MedicalCT\n")
    for variable in ("MEDICAL_CT_PROJECT_DIR", "MLFLOW_TRACKING_URI", "KEDRO_ENV"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(src)

    with pytest.raises(RuntimeError) as refused:
        refuse_state_inside_bento(load_project(project_path()))

    message = str(refused.value)
    assert "the stores: prediction log and feedback (data)" in message
    assert f"the MLflow store ({src / 'mlflow.db'})" in message
    assert "set MEDICAL_CT_PROJECT_DIR to the project folder" in message
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.org:5000")
    monkeypatch.setenv("MEDICAL_CT_S3_BUCKET", "hospital-bucket")
    refuse_state_inside_bento(load_project(project_path(), env="s3"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("MEDICAL_CT_PROJECT_DIR", str(src))  # e.g. data/ is a mounted volume
    refuse_state_inside_bento(load_project(project_path()))
