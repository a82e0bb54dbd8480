"""The service before any training, with the feedback token set: it starts and says what to do."""

import httpx
import pytest

from tests.conftest import bentoml_server, make_project

TOKEN = "s3cret-feedback-token-for-tests"


@pytest.fixture(scope="module")
def served_project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("no_champion") / "project")
    with bentoml_server(project, MEDICAL_CT_FEEDBACK_TOKEN=TOKEN) as url:
        yield project, url


@pytest.fixture(scope="module")
def client(served_project):
    with httpx.Client(base_url=served_project[1], timeout=30) as session:
        yield session


def test_not_ready_and_predict_says_to_run_make_run(client, sample_dir):
    image = next((sample_dir / "Hand").iterdir()).read_bytes()

    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 503
    response = client.post("/predict", files={"image": image})
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
        files={"image": next((sample_dir / "Hand").iterdir()).read_bytes()},
        data={"label": "Hand"},
        headers=headers,
    )

    assert response.status_code == 401
    assert "Bearer" in response.json()["error"]


def test_the_right_token_passes_and_never_reaches_the_log(client, served_project, sample_dir):
    project, _ = served_project

    response = client.post(
        "/feedback",
        files={"image": next((sample_dir / "Hand").iterdir()).read_bytes()},
        data={"label": "Hand"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )

    assert response.status_code == 503  # authorized, but no model to check the label against
    logs = "".join(path.read_text() for path in project.glob("bentoml-serve-*.log"))
    assert "/feedback" in logs
    assert TOKEN not in logs
