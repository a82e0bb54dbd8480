"""The service before any training, with the feedback token set: it starts and says what to do."""

import json
import subprocess
import sys

import httpx
import pytest

from tests.conftest import (
    CLASSES,
    bentoml_server,
    jpeg,
    make_project,
    project_env,
    wait_ready,
)

pytestmark = pytest.mark.e2e  # real servers and kedro runs

TOKEN = "s3cret-feedback-token-for-tests"
# The README's proxy setting (Scale out): the tests' loopback client, and a load balancer's
# network in front of it.
PROXIES = "127.0.0.1,192.0.2.0/24"


@pytest.fixture(scope="module")
def served_project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("no_champion") / "project")
    # An empty MLflow store, as `make run` leaves before its first promotion. Without it, the
    # service's workers and the registration below would create sqlite's tables at the same
    # time, and MLflow's migration fails on a concurrent one (_alembic_tmp_... exists).
    create = "import mlflow; mlflow.MlflowClient().search_experiments()"
    env = project_env(project)
    command = [sys.executable, "-c", create]
    created = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert created.returncode == 0, created.stderr
    with bentoml_server(
        project,
        MEDICAL_CT_FEEDBACK_TOKEN=TOKEN,
        MEDICAL_CT_MODEL_POLL_INTERVAL_S="1",
        FORWARDED_ALLOW_IPS=PROXIES,
    ) as url:
        yield project, url


@pytest.fixture(scope="module")
def client(served_project):
    with httpx.Client(base_url=served_project[1], timeout=30) as session:
        yield session


def test_not_ready_and_predict_says_to_run_make_run(client, sample_dir):
    image = next((sample_dir / "Hand").iterdir()).read_bytes()

    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 503
    response = client.post("/predict", files={"image": jpeg(image)})
    assert response.status_code == 503
    assert "make run" in response.json()["error"]
    assert client.get("/model").status_code == 503
    assert client.get("/").status_code == 200


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x"]
)
def test_feedback_needs_the_bearer_token(client, sample_dir, authorization):
    headers = {"Authorization": authorization} if authorization else {}

    response = client.post(
        "/feedback",
        files={"image": jpeg(next((sample_dir / "Hand").iterdir()).read_bytes())},
        data={"label": "Hand"},
        headers=headers,
    )

    assert response.status_code == 401
    assert "Bearer" in response.json()["error"]


def test_the_right_token_passes_and_never_reaches_the_log(client, served_project, sample_dir):
    project, _ = served_project

    response = client.post(
        "/feedback",
        files={"image": jpeg(next((sample_dir / "Hand").iterdir()).read_bytes())},
        data={"label": "Hand"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )

    assert response.status_code == 503  # authorized, but no model to check the label against
    logs = "".join(path.read_text() for path in project.glob("bentoml-serve-*.log"))
    assert "/feedback" in logs
    assert TOKEN not in logs


REGISTER_UNTRAINED_CHAMPION = f"""
import mlflow, numpy as np
from medical_ct import registry
from medical_ct.model import build_classifier
with mlflow.start_run():
    version = registry.log_and_register(
        build_classifier("small_cnn", {len(CLASSES)}, width=4), {CLASSES!r},
        np.zeros((1, 1, 64, 64), dtype=np.uint8), tags={{}},
    )
registry.set_alias(version, registry.CHAMPION_ALIAS)
"""


def test_the_first_champion_is_picked_up_without_a_restart(client, served_project, sample_dir):
    """Runs last in this module: after it, the service has a model."""
    project, url = served_project
    result = subprocess.run(
        [sys.executable, "-c", REGISTER_UNTRAINED_CHAMPION],
        cwd=project,
        env=project_env(project),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    wait_ready(url)
    response = client.post(
        "/predict", files={"image": jpeg(next((sample_dir / "CXR").iterdir()).read_bytes())}
    )

    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "1"
    # Registered without calibration (as every version before it was): it still serves, its
    # answers are never marked for review and GET /model says it has no threshold.
    assert response.json()["needs_review"] is False
    assert client.get("/model").json()["review_threshold"] is None


def test_behind_trusted_proxies_the_submitter_is_the_client_they_forwarded(
    client, served_project, sample_dir
):
    """Runs after the first champion. The README's FORWARDED_ALLOW_IPS reaches the workers:
    the load balancer (192.0.2.7) is trusted, so the submitter is the client it forwarded, not
    the load balancer that every client would share (the default trusts the loopback only)."""
    project, _ = served_project

    response = client.post(
        "/feedback",
        files={"image": jpeg(sorted((sample_dir / "Hand").iterdir())[1].read_bytes())},
        data={"label": "Hand"},
        headers={"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "203.0.113.9, 192.0.2.7"},
    )

    assert response.status_code == 202, response.text
    records = project / "data/01_raw/feedback_pending/records"
    record = json.loads((records / f"{response.json()['feedback_id']}.json").read_text())
    assert record["submitter"] == "203.0.113.9"
