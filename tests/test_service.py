"""The BentoML service against a real `bentoml serve` and the model of a real training run."""

import hashlib
import io
import json
import pickle
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from medical_ct.preprocessing import content_hash, preprocess_image
from medical_ct.registry import CHAMPION_ALIAS, MODEL_NAME
from tests.conftest import (
    CLASSES,
    FAST_RUN_PARAMS,
    assert_ok,
    bentoml_server,
    kedro,
    mlflow_client,
    wait_ready,
)

FEEDBACK_DIR = Path("data/01_raw/feedback")
METADATA_DIR = Path("data/01_raw/feedback_metadata")


@pytest.fixture(scope="module")
def project(trained_project, tmp_path_factory) -> Path:
    """A copy of the trained project, so feedback and retraining here touch no other test."""
    copy = tmp_path_factory.mktemp("service") / "project"
    shutil.copytree(trained_project, copy)
    return copy


@pytest.fixture(scope="module")
def server(project) -> str:
    with bentoml_server(project, MEDICAL_CT_MODEL_POLL_INTERVAL_S="1") as url:
        wait_ready(url)
        yield url


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server, timeout=30) as session:
        yield session


def sample_image(sample_dir: Path, label: str, index: int = 0) -> bytes:
    return sorted((sample_dir / label).iterdir())[index].read_bytes()


def champion_version(project: Path) -> str:
    version = mlflow_client(project).get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version
    return str(version)


def test_predict_answers_label_probabilities_and_version(client, project, sample_dir):
    response = client.post(
        "/predict", files={"image": ("hand.jpeg", sample_image(sample_dir, "Hand"))}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"label", "confidence", "probabilities", "model_version", "prediction_id"}
    assert set(body["probabilities"]) == set(CLASSES)
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["confidence"] == body["probabilities"][body["label"]]
    assert body["model_version"] == champion_version(project)
    assert len(body["prediction_id"]) == 32


def test_predictions_are_right_on_the_sample(client, sample_dir):
    right = 0
    for label in CLASSES:
        for index in range(3):
            image = sample_image(sample_dir, label, index)
            right += client.post("/predict", files={"image": image}).json()["label"] == label
    assert right >= 0.8 * 3 * len(CLASSES)


def test_model_describes_the_serving_version(client, project):
    response = client.get("/model")

    assert response.status_code == 200
    body = response.json()
    assert body["version"] == champion_version(project)
    assert body["classes"] == CLASSES
    assert 0.7 <= body["test_metrics"]["test_accuracy"] <= 1


def test_health_and_metrics(client, sample_dir):
    client.post("/predict", files={"image": sample_image(sample_dir, "CXR")})

    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    metrics = client.get("/metrics").text
    assert 'medical_ct_predictions_total{label="CXR"}' in metrics
    assert "medical_ct_serving_model_version 1.0" in metrics
    assert "medical_ct_batch_size_bucket" in metrics


def test_page_is_self_contained(client):
    response = client.get("/")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "Wrong? Choose the correct class" in response.text
    assert "http://" not in response.text and "https://" not in response.text


def test_page_classifies_an_image_and_sends_a_correction(server, project, sample_dir, chromium):
    from playwright.sync_api import sync_playwright

    from tests.conftest import CHROMIUM_ARGS

    image_path = sorted((sample_dir / "BreastMRI").iterdir())[5]
    outside_requests = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()

            def only_the_service(route):
                if route.request.url.startswith(server):
                    route.continue_()
                else:
                    outside_requests.append(route.request.url)
                    route.abort()

            page.route("**/*", only_the_service)
            page.goto(f"{server}/")
            page.set_input_files("#file", str(image_path))
            page.wait_for_selector("#result:not([hidden])")
            predicted = page.text_content("#label")
            bars = page.locator(".bar")
            shown = {bars.nth(i).get_attribute("data-label") for i in range(bars.count())}
            correct = "Hand" if predicted != "Hand" else "CXR"
            page.select_option("#correct", correct)
            page.click("#send")
            page.wait_for_selector("#feedback-status.ok", timeout=30_000)
            confirmation = page.text_content("#feedback-status")
        finally:
            browser.close()

    assert predicted in CLASSES
    assert shown == set(CLASSES)
    assert f"stored as {correct}" in confirmation
    digest = hashlib.sha256(image_path.read_bytes()).hexdigest()
    assert (project / FEEDBACK_DIR / correct / f"{digest}.jpeg").read_bytes() == (
        image_path.read_bytes()
    )
    assert outside_requests == [], "the page must work offline"


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring ``width`` x ``height`` pixels, without the pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def gif_frames() -> bytes:
    frames = [Image.new("L", (32, 32), shade) for shade in (0, 128, 255)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


@pytest.mark.parametrize(
    ("case", "request_kwargs", "status", "message"),
    [
        ("empty body", {}, 400, "empty"),
        ("json body", {"json": {"image": "x"}}, 415, "multipart"),
        ("missing field", {"files": {"picture": b"123"}}, 400, "'image' is missing"),
        ("text field", {"data": {"image": "not a file"}, "files": {"x": b"1"}}, 400, "file"),
        ("non-image bytes", {"files": {"image": b"hello, not an image"}}, 422, "not an image"),
        ("multi-frame GIF", {"files": {"image": gif_frames()}}, 422, "3 frames"),
        ("PNG bomb", {"files": {"image": png_declaring(50_000, 50_000)}}, 422, "too large"),
        ("over the size limit", {"files": {"image": b"\xff" * 11_000_000}}, 413, "limit"),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(
    client, sample_dir, case, request_kwargs, status, message
):
    response = client.post("/predict", **request_kwargs)

    assert response.status_code == status, f"{case}: {response.status_code} {response.text}"
    assert message in response.json()["error"], case
    healthy = client.post("/predict", files={"image": sample_image(sample_dir, "Hand")})
    assert healthy.status_code == 200


def test_truncated_jpeg_is_refused(client, sample_dir):
    whole = sample_image(sample_dir, "ChestCT")

    response = client.post("/predict", files={"image": whole[: len(whole) // 2]})

    assert response.status_code == 422
    assert "cannot be decoded" in response.json()["error"] or "truncated" in response.text


@pytest.mark.parametrize("mode", ["I;16", "CMYK"])
def test_sixteen_bit_and_cmyk_images_are_classified(client, mode):
    """Decoded by the shared preprocessing (scaled to 8 bits, converted to luminance): 200."""
    if mode == "I;16":
        pixels = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
        image = encoded(Image.fromarray(pixels), "PNG")
    else:
        image = encoded(Image.new("CMYK", (80, 80), (10, 20, 30, 40)), "JPEG")

    response = client.post("/predict", files={"image": image})

    assert response.status_code == 200, response.text
    assert response.json()["label"] in CLASSES


def stored_feedback(project: Path) -> list[Path]:
    root = project / FEEDBACK_DIR
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


def test_feedback_is_stored_once_with_its_metadata(client, project, sample_dir):
    image = sample_image(sample_dir, "Hand", 1)
    prediction = client.post("/predict", files={"image": image}).json()
    form = {"label": "HeadCT", "prediction_id": prediction["prediction_id"]}

    first = client.post("/feedback", files={"image": ("x.jpeg", image)}, data=form)
    second = client.post("/feedback", files={"image": ("y.jpeg", image)}, data=form)

    assert first.status_code == 201, first.text
    assert second.json()["feedback_id"] == first.json()["feedback_id"]
    digest = hashlib.sha256(image).hexdigest()
    stored = project / FEEDBACK_DIR / "HeadCT" / f"{digest}.jpeg"
    assert stored.read_bytes() == image
    assert [p for p in stored_feedback(project) if digest in p.name] == [stored]
    record = json.loads(
        (project / METADATA_DIR / f"{first.json()['feedback_id']}.json").read_text()
    )
    assert record["prediction_id"] == prediction["prediction_id"]
    assert record["corrected_label"] == prediction["label"]
    assert record["corrected_model_version"] == prediction["model_version"]
    assert record["label"] == "HeadCT" and record["received_at"]
    assert 'medical_ct_feedback_total{label="HeadCT"}' in client.get("/metrics").text


def test_feedback_with_an_unknown_label_lists_the_classes_and_stores_nothing(
    client, project, sample_dir
):
    before = stored_feedback(project)

    response = client.post(
        "/feedback", files={"image": sample_image(sample_dir, "CXR", 2)}, data={"label": "Knee"}
    )

    assert response.status_code == 422
    assert response.json()["valid_labels"] == CLASSES
    assert "Knee" in response.json()["error"]
    assert stored_feedback(project) == before


@pytest.mark.parametrize(
    ("request_kwargs", "status"),
    [
        ({"data": {"label": "CXR"}, "files": {"x": b"1"}}, 400),
        ({"files": {"image": b"\x89PNG broken"}, "data": {"label": "CXR"}}, 422),
        ({"files": {"image": b"1"}}, 400),
        ({}, 400),
    ],
)
def test_bad_feedback_is_refused(client, project, request_kwargs, status):
    before = stored_feedback(project)

    response = client.post("/feedback", **request_kwargs)

    assert response.status_code == status, response.text
    assert response.json()["error"]
    assert stored_feedback(project) == before


def test_feedback_store_failure_is_503_and_not_acknowledged(client, project, sample_dir):
    blocker = project / FEEDBACK_DIR / "BreastMRI"  # a file where the class folder should be
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"")
    try:
        response = client.post(
            "/feedback",
            files={"image": sample_image(sample_dir, "CXR", 3)},
            data={"label": "BreastMRI"},
        )
    finally:
        blocker.unlink()

    assert response.status_code == 503, response.text
    assert "nothing was stored" in response.json()["error"]


@pytest.fixture(scope="module")
def retrained(client, project, sample_dir) -> dict:
    """Feedback posted to the service, then the next `kedro run` on the same project."""
    train_hashes = set(
        pickle.loads((project / "data/05_model_input/train_set.pkl").read_bytes())["content_hashes"]
    )
    for path in sorted((sample_dir / "Hand").iterdir()):
        image = path.read_bytes()
        if content_hash(preprocess_image(image)) in train_hashes:
            break
    response = client.post("/feedback", files={"image": image}, data={"label": "CXR"})
    assert response.status_code == 201, response.text
    assert_ok(kedro(project, "run", "--params", FAST_RUN_PARAMS))
    return {"image": image, "label": "CXR"}


def test_feedback_trains_the_next_run_under_the_corrected_label(retrained, project):
    train_set = pickle.loads((project / "data/05_model_input/train_set.pkl").read_bytes())
    class_names = json.loads((project / "data/05_model_input/class_names.json").read_text())
    digest = content_hash(preprocess_image(retrained["image"]))

    row = train_set["content_hashes"].index(digest)

    assert class_names[train_set["labels"][row]] == retrained["label"]
    report = json.loads((project / "data/08_reporting/data_report.json").read_text())
    assert report["feedback_images_decoded"] >= 1


def wait_for_version(client: httpx.Client, version: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/model").json()["version"] != version:
        assert time.monotonic() < deadline, f"version {version} was not picked up"
        time.sleep(0.2)


def test_a_new_champion_is_swapped_in_while_requests_keep_succeeding(
    retrained, client, project, sample_dir
):
    registry_client = mlflow_client(project)
    versions = sorted(
        int(v.version) for v in registry_client.search_model_versions(f"name='{MODEL_NAME}'")
    )
    assert len(versions) >= 2, "the retraining registered a second version"
    old, new = str(versions[0]), str(versions[-1])
    # Whatever the gate decided for the retrained model, serve the old version first.
    registry_client.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, old)
    wait_for_version(client, old)
    image = sample_image(sample_dir, "AbdomenCT")
    seen, failures, stop = [], [], threading.Event()

    def keep_predicting() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=30) as session:
            while not stop.is_set():
                response = session.post("/predict", files={"image": image})
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    seen.append(response.json()["model_version"])

    threads = [threading.Thread(target=keep_predicting) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        while len(seen) < 20:
            time.sleep(0.1)
        registry_client.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, new)
        waited = 0.0
        while (not seen or seen[-1] != new) and waited < 60:
            time.sleep(0.2)
            waited += 0.2
        count_at_swap = len(seen)
        while len(seen) < count_at_swap + 20:
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert failures == []
    assert old in seen and seen[-1] == new
    assert seen[seen.index(new) :].count(old) <= 4  # only requests already in flight
    assert client.get("/model").json()["version"] == new
