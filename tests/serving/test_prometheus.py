"""A real Prometheus (Debian's package) scrapes a real `bentoml serve` with the committed config.

Every query of the committed Grafana dashboard runs against it and returns data, the alert
rules load and evaluate, and the counters move by exactly the traffic sent.
"""

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    PROJECT_ROOT,
    bentoml_server,
    free_port,
    jpeg,
    wait_ready,
    wait_until_answers,
)

pytestmark = pytest.mark.e2e  # real servers and kedro runs

MONITORING = PROJECT_ROOT / "monitoring"
PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
SCRAPE_INTERVAL_S = 1


@pytest.fixture(scope="module")
def project(trained_project, tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("prometheus") / "project"
    shutil.copytree(trained_project, project)
    return project


@pytest.fixture(scope="module")
def service(project) -> Iterator[str]:
    reviewers = {"MEDICAL_CT_REVIEWER_TOKENS": "alice:alice-token-for-tests"}
    with bentoml_server(project, MEDICAL_CT_WORKERS="2", **reviewers) as url:
        wait_ready(url)
        yield url


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory) -> Iterator[str]:
    """Prometheus with monitoring/prometheus.yml, pointed at the test's service, scraping fast."""
    if not PROMETHEUS.exists():
        pytest.fail(f"{PROMETHEUS} is missing: `make prometheus` installs Debian's package")
    folder = tmp_path_factory.mktemp("prometheus-server")
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = f"{SCRAPE_INTERVAL_S}s"
    config["global"]["evaluation_interval"] = f"{SCRAPE_INTERVAL_S}s"
    config["rule_files"] = [str(MONITORING / name) for name in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [service.removeprefix("http://")]}]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    server = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{url}/-/ready", server, folder / "prometheus.log", timeout=60)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def query(prometheus: str, expr: str) -> list[dict]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def scalar(prometheus: str, expr: str) -> float:
    result = query(prometheus, expr)
    return float(result[0]["value"][1]) if result else 0.0


def wait_for(prometheus: str, expr: str, predicate, timeout: float = 30) -> float:
    """The value of ``expr`` once ``predicate`` holds for it (fresh scrapes arrive each second)."""
    deadline = time.monotonic() + timeout
    while True:
        value = scalar(prometheus, expr)
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(SCRAPE_INTERVAL_S)


@pytest.fixture(scope="module")
def traffic(service, prometheus, sample_dir) -> dict:
    """30 predictions and 3 feedback posted after Prometheus saw the service's counters; a
    reviewer accepts 2 of them and rejects 1."""
    target_up = wait_for(prometheus, 'up{job="medical_ct"}', lambda value: value == 1)
    assert target_up == 1, "Prometheus does not scrape the service"
    before = scalar(prometheus, "sum(medical_ct_predictions_total)")
    images = sorted(sample_dir.glob("*/*.jpeg"))[::8][:30]
    with httpx.Client(base_url=service, timeout=30) as client:
        answers = [
            client.post("/predict", files={"image": jpeg(path.read_bytes())}) for path in images
        ]
        assert all(answer.is_success for answer in answers)
        ids = []
        for path in images[:3]:
            response = client.post(
                "/feedback",
                files={"image": jpeg(path.read_bytes())},
                data={"label": path.parent.name},
            )
            assert response.status_code == 202, response.text
            ids.append(response.json()["feedback_id"])
        reviewer = {"Authorization": "Bearer alice-token-for-tests"}
        for feedback_id, decision in zip(ids, ("accept", "accept", "reject"), strict=True):
            body = {"feedback_id": feedback_id, "decision": decision}
            assert client.post("/review", json=body, headers=reviewer).status_code == 200
    uncertain = sum(answer.json()["needs_review"] for answer in answers)
    return {
        "before": before,
        "predictions": len(images),
        "feedback": 3,
        "uncertain": uncertain,
        "finished_at": time.time(),
    }


# Labelled counters whose first event an alert or a panel must see: each series exists at 0
# from the service's start, before any event (none of these happens in healthy traffic).
SERIES_AT_ZERO = [
    ("medical_ct_prediction_log_records_total", "outcome", "dropped"),
    ("medical_ct_review_journal_refused_total", "journal", "review_audit"),
    ("medical_ct_review_journal_refused_total", "journal", "feedback_submissions"),
    ("medical_ct_feedback_reviews_total", "decision", "auto_accept"),
    # per class of the served model, created as it is loaded
    ("medical_ct_predictions_total", "label", "Hand"),
    ("medical_ct_feedback_total", "label", "HeadCT"),
]


def test_counters_of_rare_events_are_at_zero_before_the_first(service, prometheus):
    """A labelled counter had no series until its first event, and Prometheus first saw it
    already holding that count: increase() read no rise, so MedicalCTPredictionLogRecordsDropped
    and MedicalCTReviewAuditEntryRefused could never fire (hunt of 2026-12-05). The service now
    creates every known label value at 0 when it starts."""
    text = httpx.get(f"{service}/metrics", timeout=10).text
    samples = {
        (sample.name, *sample.labels.items()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    exported = {series: samples.get((series[0], series[1:])) for series in SERIES_AT_ZERO}
    assert exported == dict.fromkeys(SERIES_AT_ZERO, 0)
    assert ("medical_ct_prediction_log_records_total", ("outcome", "written")) in samples

    wait_for(prometheus, 'up{job="medical_ct"}', lambda value: value == 1)
    scraped = {
        (name, label, value): tuple(
            series["value"][1] for series in query(prometheus, f'{name}{{{label}="{value}"}}')
        )
        for name, label, value in SERIES_AT_ZERO
    }
    assert scraped == dict.fromkeys(SERIES_AT_ZERO, ("0",))


def test_counters_rise_by_the_traffic_sent(prometheus, traffic):
    # Every value below is read from one scrape that began after the last request was
    # answered: a scrape taken mid-traffic would show some counters moved and not others.
    scraped_at = wait_for(
        prometheus,
        'timestamp(up{job="medical_ct"})',
        lambda started: started > traffic["finished_at"],
    )
    assert scraped_at > traffic["finished_at"], "Prometheus took no scrape after the traffic"

    predictions = scalar(prometheus, "sum(medical_ct_predictions_total)")
    assert predictions == traffic["before"] + traffic["predictions"]
    confidence = scalar(prometheus, "sum(medical_ct_prediction_confidence_count)")
    assert confidence == predictions
    assert query(prometheus, "medical_ct_needs_review_total"), "the counter is exported"
    assert scalar(prometheus, "sum(medical_ct_needs_review_total)") == traffic["uncertain"]
    assert scalar(prometheus, "sum(medical_ct_feedback_total)") == traffic["feedback"]
    assert scalar(prometheus, 'sum(medical_ct_feedback_reviews_total{decision="accept"})') == 2
    assert scalar(prometheus, 'sum(medical_ct_feedback_reviews_total{decision="reject"})') == 1
    assert scalar(prometheus, "max(medical_ct_feedback_pending)") == 0
    served = query(prometheus, "medical_ct_serving_model_version")
    assert len(served) == 2 and {series["value"][1] for series in served} == {"1"}


def test_every_dashboard_query_returns_data(prometheus, traffic):
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    wait_for(  # the prediction log writes once a second; rates need two scrapes after it
        prometheus,
        'sum(medical_ct_prediction_log_records_total{outcome="written"})',
        lambda value: value >= traffic["predictions"],
    )
    time.sleep(3 * SCRAPE_INTERVAL_S)

    empty = [
        f"{panel['title']}: {target['expr']}"
        for panel in dashboard["panels"]
        for target in panel["targets"]
        if not query(prometheus, target["expr"])
    ]

    assert len(dashboard["panels"]) >= 6
    assert empty == []


def promtool(*args: str) -> None:
    result = subprocess.run(
        [str(PROMTOOL), *args], cwd=MONITORING, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_fires_on_its_case_and_not_on_healthy_traffic():
    """monitoring/alerts_test.yml: synthetic series for a down replica, no model, 10% 5xx,
    confidence falling from 0.98 to 0.80, a feedback record nobody can read, an audit entry
    refused, feedback waiting a week for a review, and healthy traffic (nothing fires)."""
    promtool("check", "config", "prometheus.yml")
    promtool("test", "rules", "alerts_test.yml")


def test_alert_rules_load_and_evaluate_on_the_live_service(prometheus, traffic):
    time.sleep(2 * SCRAPE_INTERVAL_S)  # an evaluation after the traffic

    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}

    assert set(rules) == {
        "MedicalCTServiceDown",
        "MedicalCTNoChampionServed",
        "MedicalCTErrorRateHigh",
        "MedicalCTConfidenceDropping",
        "MedicalCTFeedbackRecordUnreadable",
        "MedicalCTReviewAuditEntryRefused",
        "MedicalCTPredictionLogNotWritten",
        "MedicalCTPredictionLogRecordsDropped",
        "MedicalCTModelOutputInvalid",
        "MedicalCTFeedbackWaitsForReview",
    }
    assert {rule["health"] for rule in rules.values()} == {"ok"}
    # A healthy service with a champion: nothing fires.
    assert [rule["name"] for rule in rules.values() if rule["state"] != "inactive"] == []


def test_the_first_refused_audit_entry_fires_its_alert_on_the_live_service(
    project, service, prometheus, traffic, sample_dir
):
    """The real sequence, end to end: the audit log refuses the entry of one decision (a file
    where its folder should be), the decision stands, and Prometheus fires
    MedicalCTReviewAuditEntryRefused. Before, the refused counter's series appeared with its
    first count and increase() never saw it rise. Last in this module: the alert then fires
    for an hour, and the test above asserts that nothing fires on healthy traffic."""
    audit = project / "data/01_raw/review_audit"
    if audit.exists():
        audit.rename(audit.with_name("review_audit.kept"))
    audit.write_text("a file where the audit log's folder should be: every entry is refused")
    image = sorted((sample_dir / "Hand").glob("*.jpeg"))[-1].read_bytes()
    with httpx.Client(base_url=service, timeout=30) as client:
        submitted = client.post("/feedback", files={"image": jpeg(image)}, data={"label": "Hand"})
        assert submitted.status_code == 202, submitted.text
        body = {"feedback_id": submitted.json()["feedback_id"], "decision": "accept"}
        reviewer = {"Authorization": "Bearer alice-token-for-tests"}
        decided = client.post("/review", json=body, headers=reviewer)
        assert decided.status_code == 200, decided.text  # the decision stands

    firing = 'ALERTS{alertname="MedicalCTReviewAuditEntryRefused", alertstate="firing"}'
    refused = 'sum(medical_ct_review_journal_refused_total{journal="review_audit"})'
    assert wait_for(prometheus, refused, lambda value: value == 1) == 1
    assert wait_for(prometheus, f"count({firing})", lambda value: value == 1) == 1
