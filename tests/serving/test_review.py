"""The review queue: a real `bentoml serve` (two workers), real `kedro run`s, a real browser.

Nothing posted to /feedback trains until a reviewer accepts it. The tests run in file order
on one project: submissions and flags first, then decisions, then the poisoning and
min_new_images runs, then the burst limit (it floods the submitter's minute).
"""

import asyncio
import contextlib
import copy
import dataclasses
import io
import json
import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from playwright.sync_api import Page

from medical_ct.pipelines.data_processing.nodes import split_of
from medical_ct.preprocessing import content_hash, preprocess_image
from medical_ct.serving.batching import AdaptiveBatcher
from medical_ct.serving.model_holder import InvalidModelOutputError, ServedModel, load_served_model
from medical_ct.serving.project import load_project
from medical_ct.serving.review import ReviewConfig, ReviewQueue, ReviewStore, Submissions
from tests.conftest import (
    CLASSES,
    FAST_RUN_PARAMS,
    assert_ok,
    bentoml_server,
    chromium_browser,
    jpeg,
    kedro,
    mlflow_client,
    project_env,
    read_model_input,
    wait_ready,
)

pytestmark = pytest.mark.e2e  # real servers and kedro runs

SUBMITTER = {"Authorization": "Bearer submitter-token-for-tests"}
ALICE = {"Authorization": "Bearer alice-token-for-tests"}
BOB = {"Authorization": "Bearer bob-token-for-tests"}
FLAG_PER_MINUTE, REFUSE_PER_MINUTE = 30, 80  # the runs below send 64 in a minute
SERVE_ENV = {
    "MEDICAL_CT_WORKERS": "2",
    "MEDICAL_CT_FEEDBACK_TOKEN": "submitter-token-for-tests",
    "MEDICAL_CT_REVIEWER_TOKENS": "alice:alice-token-for-tests,bob:bob-token-for-tests",
    "MEDICAL_CT_BURST_FLAG_PER_MINUTE": str(FLAG_PER_MINUTE),
    "MEDICAL_CT_BURST_REFUSE_PER_MINUTE": str(REFUSE_PER_MINUTE),
    "MEDICAL_CT_REVIEW_LOOK_EVERY_S": "1",
    "MEDICAL_CT_REVIEW_LIST_EVERY_S": "3",  # each GET /review reads the journals only
}
PENDING = Path("data/01_raw/feedback_pending")
TRAINING_DECISION = Path("data/06_models/training_decision.json")
ACCEPTED = Path("data/01_raw/feedback_accepted")
REJECTED = Path("data/01_raw/feedback_rejected")
AUDIT = Path("data/01_raw/review_audit")
# min_new_images stays at its default (10): the runs here test it.
RUN_PARAMS = FAST_RUN_PARAMS.replace(",min_new_images=1", "")
SPLIT = (0.1, 0.15)  # conf/base/parameters_data_processing.yml


@pytest.fixture(scope="module")
def project(trained_project, tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("review") / "project"
    shutil.copytree(trained_project, copy)
    return copy


@pytest.fixture(scope="module")
def server(project) -> str:
    with bentoml_server(project, **SERVE_ENV) as url:
        wait_ready(url)
        yield url


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server, timeout=60) as session:
        yield session


@pytest.fixture(scope="module")
def seen() -> dict:
    """Ids the tests submitted and decided, shared by the tests of this module in order."""
    return {"accepted": set(), "rejected": set()}


def post(client: httpx.Client, image: bytes, label: str, headers=SUBMITTER) -> httpx.Response:
    return client.post(
        "/feedback", files={"image": jpeg(image)}, data={"label": label}, headers=headers
    )


def decide(client, feedback_id: str, decision: str, label=None, headers=ALICE) -> httpx.Response:
    body = {"feedback_id": feedback_id, "decision": decision}
    if label:
        body["label"] = label
    return client.post("/review", json=body, headers=headers)


def queue(client: httpx.Client) -> dict[str, dict]:
    response = client.get("/review", params={"limit": 500}, headers=ALICE)
    assert response.status_code == 200, response.text
    return {item["feedback_id"]: item for item in response.json()}


def flags(item: dict) -> set[str]:
    return {flag["flag"] for flag in item["flags"]}


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def confident_image(client, sample_dir: Path, label: str, skip: int = 0) -> bytes:
    """The ``skip``-th sample image the champion classifies as ``label`` with at least 95%."""
    for path in sorted((sample_dir / label).iterdir()):
        answer = client.post("/predict", files={"image": jpeg(path.read_bytes())}).json()
        if answer["label"] == label and answer["confidence"] >= 0.95:
            if skip == 0:
                return path.read_bytes()
            skip -= 1
    pytest.fail(f"the champion is not 95% sure of enough sample {label} images")


def new_images(sample_dir: Path, label: str, count: int, start: int = 0) -> list[bytes]:
    """Images of ``label`` no store has: sample images shifted by one pixel (new hashes)."""
    paths = sorted((sample_dir / label).iterdir())[start : start + count]
    return [png(np.roll(preprocess_image(path.read_bytes()), 1, axis=1)) for path in paths]


# ---- who may review ----
@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/review", {}, 401),
        ("GET", "/review", {"Authorization": "Bearer wrong"}, 401),
        ("GET", "/review", SUBMITTER, 403),
        ("POST", "/review", {}, 401),
        ("POST", "/review", SUBMITTER, 403),
        ("GET", "/review/image?feedback_id=Hand-0", SUBMITTER, 403),
        ("GET", "/review/image?feedback_id=Hand-0", {}, 401),
        ("POST", "/review/revoke", {}, 401),
        ("POST", "/review/revoke", SUBMITTER, 403),
    ],
)
def test_review_routes_need_a_reviewer_token(client, method, path, headers, status):
    response = client.request(method, path, headers=headers, json={} if method == "POST" else None)

    assert response.status_code == status, response.text
    assert "review" in response.json()["error"]
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_a_reviewer_token_cannot_submit_feedback(client, sample_dir):
    image = (sample_dir / "Hand").iterdir().__next__().read_bytes()

    assert post(client, image, "Hand", headers=ALICE).status_code == 401


# ---- pending first, and the flags ----
def test_feedback_waits_pending_unflagged_and_nothing_is_trained_on(
    client, project, sample_dir, seen
):
    image = confident_image(client, sample_dir, "Hand")

    response = post(client, image, "Hand")

    assert response.status_code == 202, response.text
    receipt = response.json()
    assert receipt["status"] == "pending" and receipt["message"] == "received, waiting for review"
    item = queue(client)[receipt["feedback_id"]]
    assert item["label"] == "Hand" and item["submitter"] == "127.0.0.1"
    assert item["model"]["label"] == "Hand" and item["model"]["version"] == "1"
    assert flags(item) == set(), item["flags"]
    assert item["out_of_distribution_ratio"] < 2.0
    assert client.get(item["image_url"], headers=ALICE).content == image
    assert (project / PENDING / "images" / receipt["stored_as"]).read_bytes() == image
    assert not (project / ACCEPTED).exists()
    seen["ordinary"] = receipt["feedback_id"]


def gauge(client: httpx.Client, name: str = "medical_ct_feedback_pending") -> float | None:
    found = re.search(rf"^{re.escape(name)} (\S+)$", client.get("/metrics").text, re.M)
    return float(found[1]) if found else None


def gauge_becomes(client: httpx.Client, value: float, name: str = "medical_ct_feedback_pending"):
    """Wait up to 15 s for a gauge of /metrics (either worker's) to read ``value``."""
    deadline = time.monotonic() + 15
    while gauge(client, name) != value and time.monotonic() < deadline:
        time.sleep(0.5)
    assert gauge(client, name) == value, client.get("/metrics").text


def test_metrics_count_what_waits_without_a_request(client, project, sample_dir, seen, monkeypatch):
    """The pending count on /metrics was set only by /feedback and /review: 0 after every
    start, blind to items another replica stored. Each worker now looks every look_every_s
    (1 s here): an item another replica stores (its record, image and journal entry, through
    the same ReviewStore) shows up with no request. The oldest waiting item's time is there
    too (alert MedicalCTFeedbackWaitsForReview)."""
    before = gauge(client)
    assert before is not None and before >= 1  # the ordinary item, counted since the start
    ordinary = json.loads((project / PENDING / f"records/{seen['ordinary']}.json").read_text())
    oldest = gauge(client, "medical_ct_feedback_oldest_pending_timestamp_seconds")
    sent = datetime.fromisoformat(ordinary["submitted_at"]).timestamp()
    assert oldest == pytest.approx(sent, abs=0.01)
    monkeypatch.chdir(project)
    replica = ReviewStore(load_project(project).catalog)
    image = new_images(sample_dir, "HeadCT", 1, start=30)[0]

    replica.submit(image, "HeadCT", {"submitter": "10.0.0.7"})  # another replica's client

    gauge_becomes(client, before + 1)


def test_a_record_broken_by_hand_is_left_out_counted_and_stops_nothing(
    client, project, sample_dir, seen
):
    """Each listing of a store read every record: one that is not JSON (a hand edit) answered
    500 to every /feedback and /review of both workers. Now both go on without it, the next
    listing (every list_every_s, 3 s here) counts it on /metrics (alert
    MedicalCTFeedbackRecordUnreadable), and once deleted the count is 0."""
    broken = project / PENDING / "records/Hand-brokenbyhand.json"
    broken.write_text('{"feedback_id": "Hand-brokenbyhand", "label": "Ha')
    unreadable = 'medical_ct_feedback_unreadable_records{store="pending_feedback_records"}'
    try:
        gauge_becomes(client, 1, unreadable)
        for _ in range(4):  # both workers, whichever answers
            assert seen["ordinary"] in queue(client)
        repeat = post(client, confident_image(client, sample_dir, "Hand"), "Hand")  # no new item
        assert repeat.status_code == 202 and repeat.json()["feedback_id"] == seen["ordinary"]
    finally:
        broken.unlink()
    gauge_becomes(client, 0, unreadable)


def test_a_label_the_champion_confidently_disputes_is_flagged(client, sample_dir, seen):
    image = confident_image(client, sample_dir, "Hand", skip=1)  # not the ordinary one

    receipt = post(client, image, "HeadCT").json()

    (flag,) = queue(client)[receipt["feedback_id"]]["flags"]
    assert flag["flag"] == "model_disagrees_confidently"
    assert "gives HeadCT" in flag["reason"] and "sure it is Hand" in flag["reason"]
    seen["disputed"] = receipt["feedback_id"]


def test_one_image_with_two_labels_is_flagged_on_both(client, sample_dir, seen):
    image = sorted((sample_dir / "ChestCT").iterdir())[3].read_bytes()

    first = post(client, image, "CXR").json()["feedback_id"]
    second = post(client, image, "AbdomenCT").json()["feedback_id"]

    pending = queue(client)
    assert "conflicting_labels" in flags(pending[first])
    assert "conflicting_labels" in flags(pending[second])
    conflict = next(f for f in pending[first]["flags"] if f["flag"] == "conflicting_labels")
    assert conflict["reason"] == "the same image was also submitted as AbdomenCT"
    seen["conflicting"] = (first, second)


def test_an_image_unlike_any_training_image_is_flagged_out_of_distribution(client, seen):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64))

    receipt = post(client, png(noise), "CXR").json()

    item = queue(client)[receipt["feedback_id"]]
    assert "out_of_distribution" in flags(item), item
    assert item["out_of_distribution_ratio"] > 2.0
    seen["noise"] = receipt["feedback_id"]


# ---- decisions ----
def test_decisions_are_checked_recorded_once_and_audited(client, project, seen):
    ordinary, disputed = seen["ordinary"], seen["disputed"]
    first, second = seen["conflicting"]

    assert decide(client, "Hand-" + "0" * 32, "accept").status_code == 404
    unknown_label = decide(client, ordinary, "accept", label="Knee")
    assert unknown_label.status_code == 422 and unknown_label.json()["valid_labels"] == CLASSES
    assert decide(client, ordinary, "maybe").status_code == 400
    accepted = decide(client, ordinary, "accept")
    assert accepted.status_code == 200, accepted.text
    assert accepted.json() | {"decided_at": ""} == {
        "feedback_id": ordinary,
        "decision": "accept",
        "label": "Hand",
        "submitted_label": "Hand",
        "reviewer": "alice",
        "decided_at": "",
    }
    again = decide(client, ordinary, "reject", headers=BOB)
    assert again.status_code == 409 and "already accepted" in again.json()["error"]
    # The disputed label, relabelled by the reviewer; one conflicting label in, one out.
    assert decide(client, disputed, "accept", label="Hand").json()["label"] == "Hand"
    assert decide(client, first, "accept", headers=BOB).status_code == 200
    assert decide(client, second, "reject", headers=BOB).status_code == 200

    assert not {ordinary, disputed, first, second} & queue(client).keys()
    audit = [json.loads(path.read_text()) for path in sorted((project / AUDIT).rglob("*.json"))]
    assert [(a["feedback_id"], a["decision"], a["reviewer"]) for a in audit] == [
        (ordinary, "accept", "alice"),
        (disputed, "accept", "alice"),
        (first, "accept", "bob"),
        (second, "reject", "bob"),
    ]
    assert audit[1]["previous_state"] == {"status": "pending", "label": "HeadCT"}
    assert audit[1]["label"] == "Hand"
    relabelled = json.loads((project / ACCEPTED / "records" / f"{disputed}.json").read_text())
    assert (project / ACCEPTED / "images" / relabelled["accepted_as"]).is_file()
    assert relabelled["accepted_as"].startswith("Hand/")
    assert (project / REJECTED / "records" / f"{second}.json").is_file()
    seen["accepted"] |= {ordinary, disputed, first}
    seen["rejected"] |= {second}


@contextlib.contextmanager
def review_page_at(chromium, server: str, feedback_id: str) -> Iterator[Page]:
    """The review page in a real browser, a reviewer's queue loaded, showing ``feedback_id``
    (the oldest item comes first: the "next" key skips to it)."""
    with chromium_browser(chromium) as browser:
        page = browser.new_page()
        page.goto(f"{server}/#review")
        page.fill("#reviewer-token", "alice-token-for-tests")
        page.click("#load-queue")
        page.wait_for_selector("#review-item:not([hidden])")
        for _ in range(20):
            if page.get_attribute("#review-item", "data-feedback-id") == feedback_id:
                break
            page.keyboard.press("n")
            page.wait_for_timeout(200)
        else:
            pytest.fail(f"the review page never showed {feedback_id}")
        yield page


def test_the_review_page_decides_with_a_key(server, project, client, sample_dir, chromium, seen):
    receipt = post(client, sorted((sample_dir / "CXR").iterdir())[5].read_bytes(), "CXR").json()

    with review_page_at(chromium, server, receipt["feedback_id"]) as page:
        assert page.text_content("#review-label") == "CXR"
        assert page.locator("#review-image").get_attribute("src").startswith("blob:")
        page.keyboard.press("r")
        page.wait_for_selector("#review-status.ok")

    assert (project / REJECTED / "records" / f"{receipt['feedback_id']}.json").is_file()
    audit = [json.loads(p.read_text()) for p in (project / AUDIT).rglob("*.json")]
    assert any(a["feedback_id"] == receipt["feedback_id"] for a in audit)
    seen["rejected"].add(receipt["feedback_id"])


def test_an_item_whose_image_was_deleted_shows_flagged_and_can_be_rejected_not_accepted(
    server, client, project, sample_dir, chromium, seen
):
    """A pending item whose image was deleted by hand answered 500 to every GET /review that
    showed it, on every worker, and 503 "try again" to its accept. Now the queue shows it with
    no model view and a flag saying what to do, on the page too; its image is 404, an accept
    409, and a reviewer can reject it."""
    receipt = post(client, new_images(sample_dir, "CXR", 1, start=20)[0], "CXR").json()
    (project / PENDING / "images" / receipt["stored_as"]).unlink()

    pending = queue(client)
    item = pending[receipt["feedback_id"]]
    assert item["model"] is None and item["out_of_distribution_ratio"] is None
    (flag,) = item["flags"]
    assert flag["flag"] == "image_missing" and receipt["stored_as"] in flag["reason"]
    assert "restore it from a backup, or reject the item" in flag["reason"]
    assert pending[seen["noise"]]["model"]["version"] == "1"  # the others as before
    image = client.get(item["image_url"], headers=ALICE)
    assert image.status_code == 404 and receipt["stored_as"] in image.json()["error"]
    accept = decide(client, receipt["feedback_id"], "accept")
    assert accept.status_code == 409 and "cannot accept: the image" in accept.json()["error"]
    with review_page_at(chromium, server, receipt["feedback_id"]) as page:
        assert page.is_hidden("#review-model")
        assert "image missing: the image of feedback" in page.text_content("#review-flags")
        page.keyboard.press("r")
        page.wait_for_selector("#review-status.ok")

    assert (project / REJECTED / "records" / f"{receipt['feedback_id']}.json").is_file()
    seen["rejected"].add(receipt["feedback_id"])


def test_bad_review_requests_are_4xx_and_a_broken_image_is_sent_as_it_is(
    client, project, sample_dir, seen
):
    """Each answered 500: a limit that is a digit to Python but not a number ("²"), an id
    too long for a file name, and the image of an item flagged image_unreadable."""
    receipt = post(client, new_images(sample_dir, "CXR", 1, start=21)[0], "CXR").json()
    broken = b"GIF89a not an image any more"
    (project / PENDING / "images" / receipt["stored_as"]).write_bytes(broken)

    limit = client.get("/review", params={"limit": "\u00b2"}, headers=ALICE)
    long_id = decide(client, "Hand-" + "0" * 300, "reject")
    long_image = client.get("/review/image", params={"feedback_id": "H" * 300}, headers=ALICE)
    item = queue(client)[receipt["feedback_id"]]
    image = client.get(item["image_url"], headers=ALICE)

    assert limit.status_code == 400 and "limit is a number" in limit.json()["error"]
    assert long_id.status_code == 404 and "no feedback" in long_id.json()["error"]
    assert long_image.status_code == 404 and "no feedback" in long_image.json()["error"]
    assert flags(item) == {"image_unreadable"}
    assert image.status_code == 200 and image.content == broken
    assert image.headers["content-type"] == "application/octet-stream"
    assert decide(client, receipt["feedback_id"], "reject").status_code == 200
    seen["rejected"].add(receipt["feedback_id"])


# ---- what the next runs train on ----
@pytest.fixture(scope="module")
def runs(client, project, sample_dir, seen) -> dict:
    """50 poisoned labels left pending; 5 new images rejected; new images accepted up to 9
    new or relabelled (one relabel came from the decisions above), a run, one more, a run."""
    train_set = read_model_input(f"{project}/data", "train")
    raw_hashes = dict(zip(train_set["content_hashes"], train_set["labels"], strict=True))
    poisoned = {}
    # Hand and ChestCT images were reviewed above: the poison takes the other classes.
    for path in sorted(sample_dir.glob("*/*.jpeg")):
        if path.parent.name in ("Hand", "ChestCT"):
            continue
        digest = content_hash(preprocess_image(path.read_bytes()))
        if digest in raw_hashes and len(poisoned) < 50:
            wrong = CLASSES[(CLASSES.index(path.parent.name) + 1) % len(CLASSES)]
            receipt = post(client, path.read_bytes(), wrong)
            assert receipt.status_code == 202, receipt.text
            poisoned[digest] = (receipt.json()["feedback_id"], path.parent.name)
    pending = queue(client)
    good = {image: "Hand" for image in new_images(sample_dir, "Hand", 9)}
    bad = {image: "CXR" for image in new_images(sample_dir, "AbdomenCT", 5, start=10)}
    receipts = {image: post(client, image, label).json() for image, label in (good | bad).items()}
    ids = {image: receipt["feedback_id"] for image, receipt in receipts.items()}
    for image in list(good)[:8]:
        assert decide(client, ids[image], "accept").status_code == 200
    for image in bad:
        assert decide(client, ids[image], "reject", headers=BOB).status_code == 200
    # An accept that failed between its image and its record (the store refused the record,
    # the service answered 503) left the image in the accepted store; a reviewer then rejected
    # it. No record accepts it: it must not train.
    stored_as = receipts[next(iter(bad))]["stored_as"]  # "CXR/<sha256>.png", as accepted
    half_accepted = project / ACCEPTED / "images" / stored_as
    half_accepted.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(project / PENDING / "images" / stored_as, half_accepted)
    waiting = kedro(project, "run", "--params", RUN_PARAMS)
    assert_ok(waiting)
    waiting_reason = json.loads((project / TRAINING_DECISION).read_text())["reason"]
    assert decide(client, ids[list(good)[8]], "accept").status_code == 200
    trained = kedro(project, "run", "--params", RUN_PARAMS)
    assert_ok(trained)
    seen["accepted"] |= {ids[image] for image in good}
    seen["rejected"] |= {ids[image] for image in bad}
    return {
        "poisoned": poisoned,
        "pending": pending,
        "good": {content_hash(preprocess_image(image)): ids[image] for image in good},
        "bad": {content_hash(preprocess_image(image)) for image in bad},
        "waiting": " ".join((waiting.stdout + waiting.stderr).split()),
        "waiting_reason": waiting_reason,  # the log wraps it wherever its width falls
        "trained": " ".join((trained.stdout + trained.stderr).split()),
    }


def model_input(project: Path) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Content hash -> label and -> split, over the three splits of the last run."""
    class_names = json.loads((project / "data/05_model_input/class_names.json").read_text())
    labels, splits = {}, {}
    for split in ("train", "validation", "test"):
        data = read_model_input(f"{project}/data", split)
        for digest, label in zip(data["content_hashes"], data["labels"], strict=True):
            labels[digest], splits[digest] = class_names[label], split
    return labels, splits, class_names


def test_a_burst_of_submissions_is_flagged(runs):
    flagged = [flags(runs["pending"][feedback_id]) for feedback_id, _ in runs["poisoned"].values()]

    assert len(flagged) == 50
    assert all("burst" in item for item in flagged)
    reason = next(
        f
        for f in runs["pending"][next(iter(runs["poisoned"].values()))[0]]["flags"]
        if f["flag"] == "burst"
    )
    assert f"more than {FLAG_PER_MINUTE}" in reason["reason"]


def test_fewer_new_images_than_min_new_images_do_not_train(runs):
    assert runs["waiting_reason"].startswith(
        "9 new or relabelled and 0 removed images since champion version 1's data; "
        "min_new_images is 10: skipping training until 1 more are new or removed"
    )
    assert "9 new or relabelled and 0 removed images" in runs["waiting"]  # in the run's log
    assert "10 new or relabelled and 0 removed images" in runs["trained"]


def test_poisoned_labels_left_pending_never_train_and_accepted_ones_do(runs, project):
    labels, splits, _ = model_input(project)

    assert "Not training on 1 accepted feedback image(s) that no accepted record" in runs["trained"]

    for digest, (_, original) in runs["poisoned"].items():
        assert labels[digest] == original  # the raw label, not the posted one
    for digest in runs["good"]:
        assert labels[digest] == "Hand"
        assert splits[digest] == split_of(digest, *SPLIT)
    assert not runs["bad"] & labels.keys()


def test_the_run_logs_the_review_counts_and_the_manifest_names_each_decision(runs, project, seen):
    report = json.loads((project / "data/08_reporting/feedback_report.json").read_text())
    client = mlflow_client(project)
    run = client.search_runs(
        [client.get_experiment_by_name("medical_ct").experiment_id],
        order_by=["start_time DESC"],
        max_results=1,
    )[0]
    # The run's own client: no process-wide tracking URI left behind for later modules.
    manifest_path = client.download_artifacts(
        run.info.run_id, "model_input/training_manifest.parquet", str(project)
    )
    manifest = pd.read_parquet(manifest_path)

    assert report["accepted"] == len(seen["accepted"]) == 12
    assert report["rejected"] == len(seen["rejected"]) == 9  # 1 + 2 on the page + 1 + 5
    assert report["pending"] >= 50 and report["auto_accepted"] == 0
    (changed,) = report["accepted_changing_a_raw_label"]
    assert changed["feedback_id"] == seen["conflicting"][0]
    assert (changed["raw_label"], changed["label"]) == ("ChestCT", "CXR")
    assert run.data.metrics["feedback.accepted"] == 12
    assert run.data.metrics["training.new_images"] == 10
    feedback_rows = manifest[manifest["source"] == "feedback"]
    assert set(feedback_rows["feedback_id"]) == seen["accepted"]
    assert set(feedback_rows["review_decision"]) == {"accept"}


def revoke(client, feedback_id: str, reason="wrong label", headers=ALICE) -> httpx.Response:
    body = {"feedback_id": feedback_id, "reason": reason}
    return client.post("/review/revoke", json=body, headers=headers)


def test_a_revoked_label_trains_no_more_and_is_audited(client, project, runs, seen):
    """A label accepted by mistake trained at every run (decisions are final, the stores only
    grow), so a rollback for bad labels held until the next new image. Revoked, it leaves
    the model input at the next run; its accepted record and image stay, for lineage."""
    digest, feedback_id = next(iter(runs["good"].items()))
    pending_id = next(iter(runs["poisoned"].values()))[0]
    rejected_id = next(iter(seen["rejected"]))

    no_reason = revoke(client, feedback_id, reason="  ")
    unknown = revoke(client, "Hand-" + "0" * 32)
    pending = revoke(client, pending_id)
    rejected = revoke(client, rejected_id)
    revoked = revoke(client, feedback_id, reason="Hand batch was CXR", headers=BOB)
    again = revoke(client, feedback_id)
    run = kedro(project, "run", "--params", RUN_PARAMS)

    assert no_reason.status_code == 422 and "needs a reason" in no_reason.json()["error"]
    assert unknown.status_code == 404 and "no feedback" in unknown.json()["error"]
    assert pending.status_code == 409 and "is pending: only an accepted" in pending.json()["error"]
    assert rejected.status_code == 409 and "is rejected" in rejected.json()["error"]
    assert revoked.status_code == 200, revoked.text
    assert revoked.json() | {"revoked_at": ""} == {
        "feedback_id": feedback_id,
        "label": "Hand",
        "reviewer": "bob",
        "reason": "Hand batch was CXR",
        "revoked_at": "",
    }
    assert again.status_code == 409 and "already revoked by bob" in again.json()["error"]
    audit = [json.loads(path.read_text()) for path in sorted((project / AUDIT).rglob("*.json"))]
    (entry,) = [a for a in audit if a["decision"] == "revoke"]
    assert entry["previous_state"] == {"status": "accepted", "label": "Hand"}
    assert (entry["feedback_id"], entry["reviewer"]) == (feedback_id, "bob")
    assert_ok(run)
    assert "Not training on 1 revoked feedback label(s)" in run.stdout + run.stderr
    labels, _, _ = model_input(project)
    assert digest not in labels and set(runs["good"]) - {digest} <= labels.keys()
    report = json.loads((project / "data/08_reporting/feedback_report.json").read_text())
    assert (report["accepted"], report["revoked"]) == (len(seen["accepted"]) - 1, 1)
    assert (project / ACCEPTED / "records" / f"{feedback_id}.json").is_file()


# ---- the burst limit ----
def test_past_the_hard_burst_limit_feedback_is_429_with_retry_after(client, project, sample_dir):
    images = [png(np.full((64, 64), value)) for value in range(0, 256, 3)]
    answers = [post(client, image, "CXR") for image in images[: REFUSE_PER_MINUTE + 1]]

    statuses = [answer.status_code for answer in answers]
    assert 429 in statuses, statuses
    refused = answers[statuses.index(429)]
    assert 1 <= int(refused.headers["Retry-After"]) <= 61
    assert f"the limit is {REFUSE_PER_MINUTE}" in refused.json()["error"]
    assert statuses.index(429) <= REFUSE_PER_MINUTE
    refused_image = images[statuses.index(429)]
    stored = [path.read_bytes() for path in (project / PENDING / "images").rglob("*.png")]
    assert refused_image not in stored


# ---- the auto-accept policy and a broken model, in process on the same stores ----
@pytest.fixture
def in_process(project, monkeypatch) -> tuple:
    """The project's catalog and review config, and its champion, loaded as the service does."""
    monkeypatch.chdir(project)
    # Through the environment, restored after the test (a process-wide set_tracking_uri
    # would point later modules' registry calls at this project's store).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project_env(project)["MLFLOW_TRACKING_URI"])
    return load_project(project), load_served_model()


AUTO_ACCEPT = ReviewConfig.from_config(
    {
        "model_disagrees_confidently": {"max_label_probability": 0.05, "min_confidence": 0.9},
        "burst": {"flag_per_minute": 1000, "refuse_per_minute": 1000},
        "out_of_distribution": {"reference_images_per_class": 10, "max_distance_ratio": 1.5},
        "auto_accept": {"policy": "agree_with_model", "min_confidence": 0.9},
        "look_every_s": 60,
        "list_every_s": 600,
    }
)


def new_image_the_champion_is_sure_of(sample_dir: Path, served, start: int) -> tuple:
    """A new BreastMRI image (as sent, and its pixels) the champion labels so at >= 90%."""
    image = new_images(sample_dir, "BreastMRI", 1, start=start)[0]
    pixels = preprocess_image(image)
    view = served.classify(pixels[None])[0]
    assert view["label"] == "BreastMRI" and view["confidence"] >= 0.9, view
    return image, pixels


def test_auto_accept_takes_only_what_the_champion_confidently_agrees_with(
    project, sample_dir, in_process
):
    loaded, served = in_process
    reviews = ReviewQueue(loaded.catalog, AUTO_ACCEPT)
    image, pixels = new_image_the_champion_is_sure_of(sample_dir, served, start=20)

    agreed, agreed_status = reviews.submit(image, pixels, "BreastMRI", {"submitter": "t"}, served)
    _, disputed_status = reviews.submit(image, pixels, "Hand", {"submitter": "t"}, served)

    assert (agreed_status, disputed_status) == ("accepted", "pending")
    record = json.loads(
        (project / ACCEPTED / "records" / f"{agreed['feedback_id']}.json").read_text()
    )
    assert record["decision"] == "auto_accept" and record["reviewer"] == "auto:agree_with_model"
    audit = [json.loads(p.read_text()) for p in (project / AUDIT).rglob("*.json")]
    assert any(a["feedback_id"] == agreed["feedback_id"] for a in audit)


def test_auto_accept_leaves_an_item_review_would_flag_to_a_reviewer(sample_dir, in_process):
    """The policy looked at the champion's answer only: an image also sent under another
    label (or far from every training image) was accepted to train when the champion agreed."""
    loaded, served = in_process
    reviews = ReviewQueue(loaded.catalog, AUTO_ACCEPT)
    image, pixels = new_image_the_champion_is_sure_of(sample_dir, served, start=22)

    _, disputed = reviews.submit(image, pixels, "Hand", {"submitter": "v"}, served)
    agreed, status = reviews.submit(image, pixels, "BreastMRI", {"submitter": "v"}, served)

    assert (disputed, status) == ("pending", "pending")
    shown = {item["feedback_id"]: item for item in reviews.queue(served, 1000)}
    assert "conflicting_labels" in flags(shown[agreed["feedback_id"]])
    for item in (agreed["feedback_id"], f"Hand-{agreed['sha256'][:32]}"):
        reviews.decide(item, "reject", "reviewer")


class NanForWhiteImages(torch.nn.Module):
    """A model broken for some inputs only: NaN logits for an all-white image."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        white = images.flatten(1).amin(1) == 255
        return self.model(images).masked_fill(white[:, None], float("nan"))


def test_a_model_giving_nan_answers_no_label_and_its_review_item_says_why(sample_dir, in_process):
    """NaN probabilities were answered as the first class with confidence NaN, under no
    review threshold (needs_review false), and made every GET /review answer 500 (JSON has
    no NaN). Now that image's request alone fails, naming the rollback, and the item is
    flagged model_output_invalid."""
    loaded, served = in_process
    white_broken = ServedModel(
        dataclasses.replace(served.classifier, model=NanForWhiteImages(served.classifier.model))
    )
    white = np.full((64, 64), 255, dtype=np.uint8)
    hand = preprocess_image(new_images(sample_dir, "Hand", 1, start=31)[0])
    batcher = AdaptiveBatcher(white_broken.classify, max_batch_size=8, max_latency_ms=5000)

    async def both() -> list:
        submitted = (batcher.submit(white), batcher.submit(hand))
        return await asyncio.gather(*submitted, return_exceptions=True)

    failed, answered = asyncio.run(both())
    nan_everywhere = copy.deepcopy(served.classifier.model)  # the registered graph, broken
    with torch.no_grad():
        list(nan_everywhere.parameters())[-1].fill_(float("nan"))
    broken = ServedModel(dataclasses.replace(served.classifier, model=nan_everywhere))
    reviews = ReviewQueue(loaded.catalog, loaded.review)
    stored, _ = reviews.submit(png(white), white, "Hand", {"submitter": "w"}, broken)
    shown = {item["feedback_id"]: item for item in reviews.queue(broken, 1000)}

    assert isinstance(failed, InvalidModelOutputError) and "--pipelines rollback" in str(failed)
    assert answered["label"] == "Hand" and answered["model_version"] == served.version
    item = shown[stored["feedback_id"]]
    assert item["model"] is None and flags(item) == {"model_output_invalid"}
    assert "NaN or infinite" in item["flags"][0]["reason"]
    json.dumps(list(shown.values()), allow_nan=False)  # as Starlette's JSONResponse does
    reviews.decide(stored["feedback_id"], "reject", "reviewer")


def test_a_test_metric_mlflow_holds_as_nan_is_shown_as_null(project, in_process):
    """GET /model answered 500 for one NaN metric of the champion's run (JSON has no NaN)."""
    _, served = in_process
    client = mlflow_client(project)
    run_id = client.get_model_version("medical_ct_classifier", served.version).run_id
    client.log_metric(run_id, "test_nan_probe", float("nan"))

    shown = load_served_model().describe()

    assert shown["test_metrics"]["test_nan_probe"] is None
    json.dumps(shown, allow_nan=False)  # as Starlette's JSONResponse does


def test_an_item_whose_stored_image_no_longer_decodes_is_flagged_not_a_500(
    project, sample_dir, in_process
):
    """Images are checked when sent; one changed in the store since (a hand edit, a disk
    error) made every GET /review that showed it fail on decoding."""
    loaded, served = in_process
    reviews = ReviewQueue(loaded.catalog, loaded.review)
    image = new_images(sample_dir, "Hand", 1, start=30)[0]
    stored, _ = reviews.submit(image, preprocess_image(image), "Hand", {"submitter": "u"}, served)
    (project / PENDING / "images" / stored["image"]).write_bytes(b"GIF89a" + image[6:40])

    shown = {item["feedback_id"]: item for item in reviews.queue(served, 1000)}

    item = shown[stored["feedback_id"]]
    assert item["model"] is None and [flag["flag"] for flag in item["flags"]] == [
        "image_unreadable"
    ]
    assert "no longer decodes" in item["flags"][0]["reason"]
    assert "restore it from a backup, or reject the item" in item["flags"][0]["reason"]
    assert any(other["model"] for other in shown.values())  # the rest keep the model's view
    reviews.decide(stored["feedback_id"], "reject", "reviewer")


def test_the_flags_index_kept_and_extended_is_the_index_built_at_once():
    """Every GET /review built the flags' index (labels by image, times by submitter) from
    every pending record ever sent: 0.33 s at 100,000 (bench_review_flags.py). The queue keeps
    it and adds the records read since; extended in steps, in no order of time, and handed
    an older copy of the cache by a concurrent request, it is the index built at once, and a
    burst counts what a count of every record counts."""
    start, records = datetime(2026, 12, 4, tzinfo=UTC), {}
    for n in range(30):
        records[f"Hand-{n}"] = {
            "sha256": str(n % 7),
            "label": ("Hand", "CXR")[n % 2],
            "submitter": f"10.0.0.{n % 3}",
            "submitted_at": (start + timedelta(seconds=n * 37 % 300)).isoformat(),
        }
    ids, kept = list(records), Submissions()

    for end in (10, 11, 30, 20, 30):  # 20: a concurrent request's copy, taken before
        kept.add({key: records[key] for key in ids[:end]})

    whole = Submissions.of(records)
    assert kept.labels_by_image == whole.labels_by_image
    assert kept.times_by_submitter == whole.times_by_submitter
    assert all(times == sorted(times) for times in kept.times_by_submitter.values())
    sent = {key: datetime.fromisoformat(r["submitted_at"]) for key, r in records.items()}
    for key, item in records.items():
        counted = sum(
            other["submitter"] == item["submitter"]
            and abs(sent[other_key] - sent[key]) <= timedelta(minutes=1)
            for other_key, other in records.items()
        )
        assert kept.burst_size(item) == counted, key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"auto_accept": {"policy": "always", "min_confidence": 0.9}}, "auto_accept.policy"),
        ({"burst": {"flag_per_minute": 10, "refuse_per_minute": 5}}, "flag_per_minute"),
        ({"burst": {"flag_per_minute": "x", "refuse_per_minute": 5}}, "review.yml is invalid"),
        ({"look_every_s": 0}, "look_every_s must be over 0"),
        ({"look_every_s": None}, "review.yml is invalid"),
        ({"list_every_s": 30}, r"list_every_s \(30.0\) must be at least look_every_s"),
        ({"list_every_s": "hourly"}, "review.yml is invalid"),
    ],
)
def test_a_bad_review_config_is_refused(change, message):
    config = {
        "model_disagrees_confidently": {"max_label_probability": 0.05, "min_confidence": 0.9},
        "burst": {"flag_per_minute": 20, "refuse_per_minute": 60},
        "out_of_distribution": {"reference_images_per_class": 10, "max_distance_ratio": 1.5},
        "auto_accept": {"policy": False, "min_confidence": 0.99},  # YAML's bare `off`
        "look_every_s": 60,
        "list_every_s": 600,
    }
    assert ReviewConfig.from_config(config).auto_accept == "off"
    with pytest.raises(ValueError, match=message):
        ReviewConfig.from_config({**config, **change})
