"""`bentoml build` packages the champion; the Bento serves it with no MLflow reachable."""

import subprocess

import httpx
import pytest

from medical_ct.registry import CHAMPION_ALIAS, MODEL_NAME
from medical_ct.serving.project import load_project
from tests.conftest import (
    BENTOML,
    PROJECT_ROOT,
    bentoml_server,
    free_port,
    jpeg,
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
