"""monitoring nodes, in memory: drift on shifted images and not on held-out ones, prediction
drift, confidence, feedback error rate, incremental reads, parameters, nothing to measure."""

import functools
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, DatasetError, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.matplotlib import MatplotlibDataset

from medical_ct.datasets import MlflowRunIdDataset, OptionalJSONDataset, PredictionLogDataset
from medical_ct.model import build_classifier
from medical_ct.pipelines.monitoring import create_pipeline
from medical_ct.pipelines.monitoring.nodes import (
    MonitoringParams,
    monitor_predictions,
    new_partitions,
    next_state,
    read_predictions,
    report_monitoring,
)
from medical_ct.preprocessing import content_hash, preprocess_image
from medical_ct.registry import RegisteredClassifier
from medical_ct.serving.prediction_log import PredictionLog, new_prediction_id
from medical_ct.shards import ModelInputSet
from tests.conftest import CLASSES

PARAMS = {"min_records": 20, "reference_size": 2000, "unusual_images": 8}
HOUR_MS = 3600 * 1000
START_MS = 1_780_000_000_000  # 2026-05-28


@pytest.fixture(scope="module")
def sample(sample_dir) -> tuple[np.ndarray, np.ndarray]:
    """The 240 sample images decoded as the service does, and their class indices."""
    images, labels = [], []
    for index, name in enumerate(CLASSES):
        for path in sorted((sample_dir / name).glob("*.jpeg")):
            images.append(preprocess_image(path.read_bytes()))
            labels.append(index)
    return np.stack(images), np.array(labels)


def split(sample, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Three quarters of each class as the training reference, the rest held out."""
    images, labels = sample
    keep = np.zeros(len(labels), bool)
    for index in range(len(CLASSES)):
        rows = np.flatnonzero(labels == index)
        keep[rows[: len(rows) * 3 // 4]] = True
    chosen = keep if part == "train" else ~keep
    return images[chosen], labels[chosen]


@pytest.fixture(scope="module")
def reference(sample) -> ModelInputSet:
    images, labels = split(sample, "train")
    index = pd.DataFrame(
        {
            "source": "raw",
            "shard": "00000",
            "row": np.arange(len(labels)),
            "label": labels,
            "content_hash": [f"h{i}" for i in range(len(labels))],
        }
    )
    return ModelInputSet(index, {("raw", "00000"): lambda: images})


@pytest.fixture(scope="module")
def champion() -> RegisteredClassifier:
    """A real (untrained, seeded) small CNN: its embedding is a fixed function of the pixels."""
    torch.manual_seed(0)
    model = build_classifier("small_cnn", len(CLASSES), 8).eval()
    return RegisteredClassifier(
        model=model, version="3", class_names=CLASSES, tags={}, review_threshold=0.9
    )


def answer(label: str, confidence: float, version: str = "3", unusual: bool = False) -> dict:
    rest = (1 - confidence) / (len(CLASSES) - 1)
    probabilities = {name: confidence if name == label else rest for name in CLASSES}
    return {
        "label": label,
        "confidence": confidence,
        "probabilities": probabilities,
        "model_version": version,
        "needs_review": unusual,
        "out_of_distribution": unusual,
        "out_of_distribution_ratio": 3.0 if unusual else 0.5,
    }


def write_log(
    dataset: PredictionLogDataset,
    images: np.ndarray,
    labels: list[str],
    confidences: list[float] | None = None,
    start_ms: int = START_MS,
    version: str = "3",
    unusual: int = 0,
    log_pixels: bool = True,
) -> list[str]:
    """Log one prediction per image through the service's writer; return the ids. The
    first ``unusual`` answers were flagged out of distribution."""
    log = PredictionLog(dataset, flush_interval_s=3600, log_pixels=log_pixels)
    confidences = confidences or [0.99] * len(labels)
    ids = []
    for offset, (image, label, confidence) in enumerate(
        zip(images, labels, confidences, strict=True)
    ):
        prediction_id = new_prediction_id(start_ms + offset * 1000)
        log.append(prediction_id, answer(label, confidence, version, offset < unusual), image)
        ids.append(prediction_id)
    log.close()
    return ids


def run(
    dataset,
    champion,
    reference,
    state=None,
    feedback=None,
    kept=None,
    reads=None,
    classes=CLASSES,
    revoked=(),
    mlflow_run=None,
    **params,
):
    """``feedback``: the accepted records as stored; ``kept``: those data_processing kept last
    run; ``reads``: a list that gets the id of every record read from the store; ``classes``:
    the model input's class names, which the reference's labels index; ``revoked``: the ids
    in the revocation store; ``mlflow_run``: the id of the MLflow run it is part of."""
    reads = [] if reads is None else reads

    def load(key: str) -> object:
        reads.append(key)
        return feedback[key]

    return monitor_predictions(
        dataset.load(),
        state,
        mlflow_run,
        champion,
        reference,
        classes,
        {key: functools.partial(load, key) for key in feedback or {}},
        kept,
        {key: functools.partial(pytest.fail, f"read revocation {key}") for key in revoked},
        {**PARAMS, **params},
    )


def metric(metrics: dict, name: str) -> float:
    return metrics[f"monitoring.{name}"]["value"]


@pytest.fixture
def log(tmp_path) -> PredictionLogDataset:
    return PredictionLogDataset(path=str(tmp_path / "prediction_log"))


def test_held_out_images_do_not_drift_and_inverted_or_brightened_ones_do(
    tmp_path, sample, reference, champion
):
    held_out, labels = split(sample, "held_out")
    names = [CLASSES[label] for label in labels]
    shifted = {
        "held_out": held_out,
        "inverted": 255 - held_out,
        "brightened": np.clip(held_out.astype(int) + 90, 0, 255).astype(np.uint8),
    }
    results = {}
    for name, images in shifted.items():
        dataset = PredictionLogDataset(path=str(tmp_path / name))
        write_log(dataset, images, names)
        summary, metrics, _, _ = run(dataset, champion, reference)
        results[name] = (summary, metrics)

    summary, metrics = results["held_out"]
    assert metric(metrics, "predictions") == len(held_out)
    assert metric(metrics, "input_drift_detected") == 0, summary["input_drift"]
    assert metric(metrics, "input_drift_score") < 0.5
    assert summary["alerts"] == []
    for name in ("inverted", "brightened"):
        summary, metrics = results[name]
        assert metric(metrics, "input_drift_detected") == 1, (name, summary["input_drift"])
        assert metric(metrics, "input_drift_score") >= 0.5
        assert summary["input_drift"]["features"]["intensity_mean"]["drifted"]
        assert any(alert.startswith("input drift") for alert in summary["alerts"])
        assert "intensity_mean" in summary["alerts"][0]
    # The unusual images are the inverted ones the logged predictions name.
    unusual = results["inverted"][0]["unusual"]
    assert len(unusual) == PARAMS["unusual_images"]
    assert unusual[0]["distance_ratio"] >= unusual[-1]["distance_ratio"]


def test_a_skewed_class_mix_is_prediction_drift_and_the_training_mix_is_not(
    tmp_path, sample, reference, champion
):
    held_out, labels = split(sample, "held_out")
    balanced = PredictionLogDataset(path=str(tmp_path / "balanced"))
    write_log(balanced, held_out, [CLASSES[label] for label in labels])
    skewed = PredictionLogDataset(path=str(tmp_path / "skewed"))
    write_log(skewed, held_out, ["Hand"] * 40 + [CLASSES[label] for label in labels[40:]])

    _, balanced_metrics, _, _ = run(balanced, champion, reference)
    summary, skewed_metrics, _, _ = run(skewed, champion, reference)

    assert metric(balanced_metrics, "prediction_drift_detected") == 0
    assert metric(skewed_metrics, "prediction_drift_detected") == 1
    assert summary["versions"]["3"]["prediction_drift"]["class_counts"]["Hand"] >= 40
    assert any(alert.startswith("prediction drift: version 3") for alert in summary["alerts"])


def test_the_training_mix_is_matched_to_the_champions_classes_by_name(
    tmp_path, sample, reference, champion
):
    """The reference's labels index the model input's classes, which differ from the
    champion's once the data gains or loses a class (or after a rollback): matched by
    position, one class's share went to another and a balanced stream looked drifted."""
    held_out, labels = split(sample, "held_out")
    balanced = PredictionLogDataset(path=str(tmp_path / "balanced"))
    write_log(balanced, held_out, [CLASSES[label] for label in labels])
    reordered = [*CLASSES[1:], CLASSES[0]]  # the same classes, the data's order another
    relabelled = ModelInputSet(
        reference.index.assign(label=(reference.index["label"] - 1) % len(CLASSES)),
        reference.loaders,
    )
    without_hand = [name for name in CLASSES if name != "Hand"]  # the data lost a class
    kept = reference.index["label"] != CLASSES.index("Hand")
    lost = ModelInputSet(
        reference.index[kept].assign(
            label=[without_hand.index(CLASSES[i]) for i in reference.index["label"][kept]]
        ),
        reference.loaders,
    )

    same, _, _, _ = run(balanced, champion, reference)
    by_name, metrics, _, _ = run(balanced, champion, relabelled, classes=reordered)
    missing, _, _, _ = run(balanced, champion, lost, classes=without_hand)

    assert by_name["training_class_mix"] == same["training_class_mix"]
    assert metric(metrics, "prediction_drift_detected") == 0
    assert missing["training_class_mix"]["Hand"] == 0
    assert missing["versions"]["3"]["prediction_drift"]["detected"]  # answers Hand: no data has


def test_a_version_answering_classes_the_champion_lacks_is_not_tested_on_what_is_left(
    tmp_path, sample, reference, champion
):
    """Answers of an older version trained on other classes were dropped from its counts,
    and the rest tested as if they were all its answers (p = NaN once none was left)."""
    held_out, labels = split(sample, "held_out")
    log = PredictionLogDataset(path=str(tmp_path / "log"))
    write_log(log, held_out, [CLASSES[label] for label in labels])
    write_log(log, held_out[:40], ["Knee"] * 40, start_ms=START_MS + HOUR_MS, version="2")

    summary, metrics, _, _ = run(log, champion, reference)

    older = summary["versions"]["2"]["prediction_drift"]
    assert older["other_classes"] == {"Knee": 40} and older["p_value"] is None
    assert "answers in classes the champion does not have (Knee)" in older["reason"]
    assert not older["detected"] and not summary["overall"]["prediction_drift"]["detected"]
    assert summary["versions"]["3"]["prediction_drift"]["p_value"] is not None
    assert metric(metrics, "prediction_drift_detected") == 0


def test_low_confidence_over_fewer_answers_than_min_records_raises_no_alert(
    log, sample, reference, champion
):
    held_out, labels = split(sample, "held_out")
    write_log(log, held_out[:4], [CLASSES[label] for label in labels[:4]], [0.5] * 4)

    summary, metrics, _, _ = run(log, champion, reference)

    assert metric(metrics, "low_confidence_share") == 1.0
    assert summary["alerts"] == []


def test_low_confidence_share_and_estimated_accuracy_come_from_the_logged_confidences(
    log, sample, reference, champion
):
    held_out, labels = split(sample, "held_out")
    confidences = [0.5] * 15 + [0.95] * 45  # threshold 0.9: a quarter under it
    write_log(log, held_out, [CLASSES[label] for label in labels], confidences)

    summary, metrics, _, _ = run(log, champion, reference)

    assert metric(metrics, "low_confidence_share") == pytest.approx(0.25)
    assert metric(metrics, "estimated_accuracy") == pytest.approx((15 * 0.5 + 45 * 0.95) / 60)
    assert sum(summary["confidence_histogram"]["counts"]) == 60
    # 25% is over max_low_confidence_share (20%): an alert naming the threshold
    assert any("25.0% of answers under the review threshold 0.900" in a for a in summary["alerts"])


def test_feedback_error_rate_counts_accepted_corrections_of_the_version(
    log, sample, reference, champion
):
    held_out, labels = split(sample, "held_out")
    ids = write_log(log, held_out, [CLASSES[label] for label in labels])

    def accepted(prediction_id, corrected_label, label, version="3"):
        return {
            "prediction_id": prediction_id,
            "corrected_model_version": version,
            "corrected_label": corrected_label,
            "label": label,
            "decision": "accept",
        }

    feedback = {
        "a": accepted(ids[0], "Hand", "CXR"),  # the answer was wrong
        "b": accepted(ids[1], "Hand", "Hand"),  # confirmed
        "c": accepted(ids[2], "CXR", "CXR"),
        "d": accepted(ids[3], "CXR", "HeadCT"),  # wrong
        "e": accepted(ids[4], "CXR", "Hand", version="2"),  # another version's answer
        "f": ["edited", "by", "hand"],  # not a record: left out, named in the log, not fatal
    }
    reads = []
    _, metrics, _, _ = run(log, champion, reference, feedback=feedback, reads=reads)
    assert metric(metrics, "feedback_error_rate") == pytest.approx(2 / 4)
    assert sorted(reads) == ["a", "b", "c", "d", "e", "f"]

    # what the last data_processing kept stands for its records; the rest are read
    kept = {key: feedback[key] for key in ("a", "b", "c", "e")}
    reads.clear()
    _, metrics, _, _ = run(log, champion, reference, feedback=feedback, kept=kept, reads=reads)
    assert metric(metrics, "feedback_error_rate") == pytest.approx(2 / 4)
    assert sorted(reads) == ["d", "f"]
    # a label revoked since is no correction, before data_processing marked it (only the
    # revocation store's listing is read) and after
    for revoked in ({"revoked": True}, {}):
        kept["a"] = {**feedback["a"], **revoked}
        _, metrics, _, _ = run(
            log, champion, reference, feedback=feedback, kept=kept, revoked=["a"]
        )
        assert metric(metrics, "feedback_error_rate") == pytest.approx(1 / 3)

    _, without, _, _ = run(log, champion, reference)
    assert "monitoring.feedback_error_rate" not in without


def test_a_minority_of_images_unlike_the_training_images_raises_an_alert(
    log, sample, reference, champion
):
    """60 non-medical images among 600, answered confidently, raised no alert: the class mix
    and the confidence hardly moved (hunt of 2026-12-05). The service's flag is counted."""
    held_out, labels = split(sample, "held_out")
    names = [CLASSES[label] for label in labels]
    write_log(log, held_out, names, unusual=3)  # 3 of 48: 6%

    summary, metrics, _, _ = run(log, champion, reference)

    assert metric(metrics, "out_of_distribution_share") == pytest.approx(3 / len(names))
    assert [alert for alert in summary["alerts"] if alert.startswith("out of distribution")] == [
        f"out of distribution: {3 / len(names):.1%} of answers were for images unlike the "
        "training images (max_out_of_distribution_share 2%); the grid of unusual images shows "
        "some"
    ]


def test_without_pixels_input_drift_is_untested_not_absent_and_says_so(
    log, sample, reference, champion, caplog
):
    """With log_pixels false the run recorded input_drift_detected 0, "no drift", and said
    so only at INFO (hunt of 2026-12-05): it is left out, with a warning."""
    held_out, labels = split(sample, "held_out")
    write_log(log, held_out, [CLASSES[label] for label in labels], log_pixels=False)

    summary, metrics, _, _ = run(log, champion, reference)

    assert "monitoring.input_drift_detected" not in metrics
    assert summary["input_drift"]["tested"] is False
    assert "the prediction log holds no pixels" in caplog.text


def test_a_second_run_reads_only_new_partitions_and_a_third_says_nothing_is_new(
    log, sample, reference, champion, caplog
):
    held_out, labels = split(sample, "held_out")
    names = [CLASSES[label] for label in labels]
    write_log(log, held_out[:30], names[:30])
    _, first, _, state = run(log, champion, reference)
    write_log(log, held_out[30:], names[30:], start_ms=START_MS + 2 * HOUR_MS)

    summary, second, _, state = run(log, champion, reference, state=state)
    assert metric(first, "predictions") == 30
    assert metric(second, "predictions") == 30
    assert summary["period"]["first"] > "2026-05-28 22:"  # only the later hour's records
    assert len(state["history"]) == 2

    with caplog.at_level("INFO"):
        summary, third, _, unchanged = run(log, champion, reference, state=state)
    assert metric(third, "predictions") == 0
    assert "monitoring.input_drift_detected" not in third  # nothing new: nothing tested
    assert summary["status"] == "no_new_records"
    assert unchanged == state
    assert "no new prediction log records since the last run" in caplog.text


def test_a_retry_of_the_run_that_wrote_the_state_measures_the_same_records_again(
    log, sample, reference, champion
):
    """An Airflow task cleared or retried after it saved the state (the DAG's tasks share one
    MLflow run) found nothing new: it logged an empty summary over the week's in that run.
    Another run, after it, still finds nothing new."""
    held_out, labels = split(sample, "held_out")
    write_log(log, held_out[:30], [CLASSES[label] for label in labels[:30]])
    first, _, _, state = run(log, champion, reference, mlflow_run="dag-run-1")

    retried, _, _, retried_state = run(
        log, champion, reference, state=state, mlflow_run="dag-run-1"
    )
    assert retried["status"] == "measured" and retried["records"] == first["records"] == 30
    assert retried["alerts"] == first["alerts"]
    assert len(retried_state["history"]) == len(state["history"]) == 1  # counted once
    next_week, _, _, kept = run(
        log, champion, reference, state=retried_state, mlflow_run="dag-run-2"
    )
    assert next_week["status"] == "no_new_records" and kept == retried_state


def listed_files(filesystem, monkeypatch) -> list[str]:
    """Every entry the store's listings (``ls``, ``find``) answer from now on."""
    listed: list[str] = []

    def spy(listing, path, *args, **kwargs):
        found = listing(path, *args, **kwargs)
        listed.extend(str(entry) for entry in found)
        return found

    for method in ("ls", "find"):
        monkeypatch.setattr(filesystem, method, functools.partial(spy, getattr(filesystem, method)))
    return listed


def test_a_run_lists_only_the_hours_from_its_state_on_and_reads_what_a_full_listing_would(
    log, sample, reference, champion, tmp_path, monkeypatch
):
    """The weekly run's cost must not grow with the log's age: the hours before what the
    state read through, less the grace, are not even listed."""
    held_out, labels = split(sample, "held_out")
    names = [CLASSES[label] for label in labels]
    write_log(log, held_out[:20], names[:20], start_ms=START_MS - 48 * HOUR_MS)
    write_log(log, held_out[20:40], names[20:40], start_ms=START_MS - 24 * HOUR_MS)
    _, _, _, state = run(log, champion, reference)
    (old,) = (tmp_path / "prediction_log" / "date=2026-05-26").rglob("*.parquet")
    old.write_bytes(b"garbage")  # were it read, the run would warn that it cannot be
    write_log(log, held_out[40:], names[40:])
    every_file = dict(log.load())  # a plain mapping: the whole log, as before

    listed = listed_files(log._filesystem, monkeypatch)
    summary, metrics, _, new_state = run(log, champion, reference, state=state)
    monkeypatch.undo()

    assert listed and not [entry for entry in listed if "date=2026-05-26/" in entry]
    assert metric(metrics, "predictions") == 20
    assert summary["unreadable_files"] == []
    everything, _, _, full_state = monitor_predictions(
        every_file, state, None, champion, reference, CLASSES, {}, None, {}, PARAMS
    )
    for key in ("records", "partitions", "period", "versions"):
        assert summary[key] == everything[key]
    assert (new_state["read_through"], new_state["recent"]) == (
        full_state["read_through"],
        full_state["recent"],
    )


def test_a_log_file_named_by_hand_is_left_out_of_every_run_with_a_warning(
    log, sample, reference, champion, tmp_path, caplog
):
    """A copy or an export in an hour folder stopped the weekly run (its name has no time)."""
    held_out, labels = split(sample, "held_out")
    write_log(log, held_out[:30], [CLASSES[label] for label in labels[:30]])
    _, _, _, state = run(log, champion, reference)
    (written,) = (tmp_path / "prediction_log").rglob("*.parquet")
    write_log(
        log, held_out[30:], [CLASSES[label] for label in labels[30:]], start_ms=START_MS + 60_000
    )
    shutil.copy(written, written.with_name("backup copy.parquet"))
    shutil.copy(written, written.with_name("0_export.parquet"))

    with caplog.at_level("WARNING"):
        second, _, _, _ = run(log, champion, reference, state=state)
        first_ever, _, _, _ = run(log, champion, reference)

    assert (second["records"], first_ever["records"]) == (30, 60)  # the copies not counted
    assert caplog.text.count("backup copy") == 2 and caplog.text.count("0_export") == 2


def test_records_written_twice_are_counted_once(log, sample, reference, champion, tmp_path, caplog):
    """A PUT that landed but raised is written again, with newer records, under another name."""
    held_out, labels = split(sample, "held_out")
    names = [CLASSES[label] for label in labels]
    write_log(log, held_out[:30], names[:30])
    (first,) = (tmp_path / "prediction_log").rglob("*.parquet")
    retried = pd.concat([pd.read_parquet(first), pd.read_parquet(first).iloc[:5]])
    write_log(log, held_out[30:], names[30:], start_ms=START_MS + 40_000)
    retried.to_parquet(first.with_name(f"{START_MS}-{START_MS + 29_000}-w2-0000000001.parquet"))

    with caplog.at_level("WARNING"):
        summary, metrics, _, _ = run(log, champion, reference)
    logged = read_predictions(log.load(), sorted(log.load()), 100, np.random.default_rng(0))

    assert metric(metrics, "predictions") == 60
    assert summary["duplicate_records"] == 35
    assert "35 records read again under another file name were counted once" in caplog.text
    assert logged.records["prediction_id"].is_unique and logged.images_logged == 60
    hashes = logged.records["pixel_hash"].to_numpy()[logged.pixel_rows]
    assert [content_hash(image) for image in logged.pixels] == list(hashes)


def test_the_images_read_are_a_uniform_sample_of_the_records_with_pixels(log, sample):
    images, _ = sample
    for start in range(0, 240, 30):  # eight files
        write_log(
            log, images[start : start + 30], ["Hand"] * 30, start_ms=START_MS + start * HOUR_MS
        )
    rng = np.random.default_rng(0)

    logged = read_predictions(log.load(), sorted(log.load()), max_images=50, rng=rng)

    assert len(logged.records) == logged.images_logged == 240
    assert len(logged.pixels) == 50
    assert len(set(logged.pixel_rows)) == 50
    hashes = logged.records["pixel_hash"].to_numpy()[logged.pixel_rows]
    assert [content_hash(image) for image in logged.pixels] == list(hashes)
    # drawn from every file, not the first ones: rows spread over the whole range
    assert logged.pixel_rows.min() < 60 and logged.pixel_rows.max() >= 180


def test_a_partition_written_late_within_the_grace_window_is_still_read():
    hour = "date=2026-05-28/hour=20"
    first = f"{hour}/{START_MS + 5000}-{START_MS + 6000}-worker_a"
    late = f"{hour}/{START_MS + 1000}-{START_MS + 2000}-worker_b"  # sorts before `first`
    old = f"{hour}/{START_MS - 7 * HOUR_MS}-{START_MS - 7 * HOUR_MS}-worker_c"
    state = next_state({}, [first], grace_ms=HOUR_MS, run=None)

    assert new_partitions([old, late, first], state, grace_ms=HOUR_MS) == [late]
    assert new_partitions([old, late, first], {}, grace_ms=HOUR_MS) == [old, late, first]


def test_an_empty_log_or_no_champion_gives_zero_predictions_without_failing(
    log, reference, champion, caplog
):
    with caplog.at_level("INFO"):
        summary, metrics, _, _ = run(log, champion, reference)
        no_champion, no_champion_metrics, _, _ = run(log, None, None)
    zero = {
        "monitoring.predictions": {"value": 0.0, "step": 0},
        "monitoring.prediction_drift_detected": {"value": 0.0, "step": 0},
        "monitoring.alerts": {"value": 0.0, "step": 0},
    }
    assert metrics == zero
    assert no_champion_metrics == zero
    assert summary["status"] == "no_new_records"
    assert no_champion["status"] == "no_champion"
    assert "no champion in the registry yet" in caplog.text
    page, *_, tags = report_monitoring(summary)
    assert "no new prediction log records" in page
    assert tags == {}


def test_the_report_page_and_the_alert_tag_say_what_drifted(log, sample, reference, champion):
    held_out, labels = split(sample, "held_out")
    write_log(log, 255 - held_out, [CLASSES[label] for label in labels])
    summary, _, unusual_figure, _ = run(log, champion, reference)

    page, _, class_mix, _, tags = report_monitoring(summary)

    assert "input drift" in tags["monitoring.alert"]
    assert "Alerts" in page and "intensity_mean" in page
    assert page.count("data:image/png;base64,") == 3
    assert len(unusual_figure.axes) >= PARAMS["unusual_images"]
    assert len(class_mix.axes[0].patches) == 2 * len(CLASSES)  # training and version 3


def test_a_run_whose_plot_save_fails_leaves_the_state_for_the_next_run_to_read_again(
    log, sample, reference, champion, tmp_path
):
    """The runner saves a node's outputs in order: with the state before the plot, a plot that
    could not be saved (a full disk) left the state past the files read, so the next run found
    nothing new and the week's measurement was lost."""
    held_out, labels = split(sample, "held_out")
    write_log(log, held_out, [CLASSES[label] for label in labels])
    blocked = tmp_path / "reporting"
    blocked.write_text("a file where the plots' folder should be")
    state = OptionalJSONDataset(filepath=str(tmp_path / "monitoring_state.json"))
    catalog = DataCatalog(
        {
            "prediction_log": log,
            "previous_monitoring_state": state,
            "monitoring_run": MlflowRunIdDataset(),
            "champion_model": MemoryDataset(champion),
            "monitoring_reference": MemoryDataset(reference),
            "monitoring_reference_classes": MemoryDataset(CLASSES),
            "accepted_feedback_records": MemoryDataset({}),
            "previous_accepted_records": OptionalJSONDataset(filepath=str(tmp_path / "none")),
            "revoked_feedback_records": MemoryDataset({}),
            "params:monitoring": MemoryDataset(PARAMS),
            "monitoring_unusual_images_plot": MatplotlibDataset(
                filepath=str(blocked / "unusual_images.png")
            ),
            "monitoring_state": state,
        }
    )
    node = create_pipeline().only_nodes("monitor_predictions")

    with pytest.raises(DatasetError, match="unusual_images"):
        SequentialRunner().run(node, catalog)

    assert state.load() is None
    blocked.unlink()
    SequentialRunner().run(node, catalog)
    assert state.load()["read_through"] is not None


def test_bad_parameters_are_named_in_one_error():
    with pytest.raises(ValueError) as error:
        MonitoringParams.from_params(
            {"reference_size": 0, "p_value": 2, "drift_share": "half", "treshold": 0.1}
        )
    message = str(error.value)
    assert message.startswith("invalid parameters monitoring: ")
    for part in (
        "reference_size must be a positive integer, got 0",
        "p_value must be a number in (0, 1], got 2",
        "drift_share must be a number in (0, 1], got 'half'",
        "unknown keys ['treshold']",
    ):
        assert part in message
    assert MonitoringParams.from_params({}) == MonitoringParams()


def test_an_unreadable_log_file_is_skipped_named_and_left_in_the_store(
    log, sample, reference, champion, tmp_path, caplog
):
    """A truncated Parquet file (a full disk) or one of another schema must not stop the
    weekly run, which waits for monitoring before training."""
    held_out, labels = split(sample, "held_out")
    write_log(log, held_out[:30], [CLASSES[label] for label in labels[:30]])
    folder = tmp_path / "prediction_log" / "date=2026-05-29" / "hour=03"
    folder.mkdir(parents=True)
    (folder / f"{START_MS + 5 * HOUR_MS}-{START_MS + 5 * HOUR_MS}-w9.parquet").write_bytes(b"PAR1")
    pd.DataFrame({"label": ["Hand"]}).to_parquet(folder / f"{START_MS + 6 * HOUR_MS}-1-w9.parquet")

    with caplog.at_level("WARNING"):
        summary, metrics, _, state = run(log, champion, reference)

    assert metric(metrics, "predictions") == 30
    assert len(summary["unreadable_files"]) == 2
    assert all(name.startswith("date=2026-05-29/hour=03/") for name in summary["unreadable_files"])
    assert caplog.text.count("which cannot be read") == 2
    assert len(list(folder.iterdir())) == 2  # left in the store
    assert state["read_through"] is not None


def test_new_files_without_a_readable_record_move_the_state_past_them(
    log, reference, champion, tmp_path, caplog
):
    """Measuring nothing stopped the run, so the state never moved and every weekly run
    stopped on the same files."""
    folder = tmp_path / "prediction_log" / "date=2026-05-28" / "hour=20"
    folder.mkdir(parents=True)
    (folder / f"{START_MS}-{START_MS}-w1.parquet").write_bytes(b"PAR1")  # truncated
    empty = pd.DataFrame(columns=["predicted_at", "prediction_id", "model_version", "label",
                                  "confidence", "pixel_hash", "pixels"])  # fmt: skip
    empty.to_parquet(folder / f"{START_MS + 1}-{START_MS + 1}-w2.parquet")  # no rows

    with caplog.at_level("WARNING"):
        summary, metrics, _, state = run(log, champion, reference)

    assert summary["status"] == "no_readable_records"
    assert summary["unreadable_files"] == [f"date=2026-05-28/hour=20/{START_MS}-{START_MS}-w1"]
    assert metric(metrics, "predictions") == 0
    assert state["read_through"].endswith("-w2")
    assert f"{START_MS}-{START_MS}-w1" in summary["message"]
    assert "stay in the store" in caplog.text and "delete monitoring_state.json" in caplog.text
    assert "no readable record" in report_monitoring(summary)[0]
    assert run(log, champion, reference, state=state)[0]["status"] == "no_new_records"
    typed = read_predictions({}, [], 10, np.random.default_rng(0)).records
    assert typed.dtypes["confidence"] == "float64" and typed.dtypes["predicted_at"].tz is not None


def test_a_file_of_other_column_types_or_image_sizes_is_read_as_the_service_writes(
    log, sample, reference, champion, tmp_path, caplog
):
    """Times without a zone or confidences as text stopped the node; a 16,384-byte blob was
    read as four images of one record, misaligning every later image with its record."""
    held_out, labels = split(sample, "held_out")
    write_log(log, held_out[:30], [CLASSES[label] for label in labels[:30]])
    folder = tmp_path / "prediction_log" / "date=2026-05-28" / "hour=21"
    folder.mkdir(parents=True)
    at = START_MS + HOUR_MS
    image = held_out[30].tobytes()
    pd.DataFrame(
        {
            "predicted_at": pd.to_datetime([at, at, at, at, at], unit="ms"),  # no time zone
            "prediction_id": [new_prediction_id(at) for _ in range(5)],
            "model_version": "3",
            "label": "Hand",
            "confidence": ["0.5", "0.5", "0.5", None, "high"],
            "pixel_hash": [content_hash(held_out[30]), "b", "c", "d", "e"],
            "pixels": [image, b"\0" * 1000, b"\0" * 128 * 128, image, None],
        }
    ).to_parquet(folder / f"{at}-{at}-old.parquet")

    with caplog.at_level("WARNING"):
        summary, metrics, _, _ = run(log, champion, reference)
    logged = read_predictions(log.load(), sorted(log.load()), 100, np.random.default_rng(0))

    assert metric(metrics, "predictions") == 33
    assert summary["period"]["last"] == str(pd.to_datetime(at, unit="ms", utc=True))
    assert "left out 2 records whose predicted_at or confidence" in caplog.text
    assert "the pixels of 2 records that are not a 64x64 image" in caplog.text
    assert logged.images_logged == len(logged.pixels) == 31
    hashes = logged.records["pixel_hash"].to_numpy()[logged.pixel_rows]
    assert [content_hash(image) for image in logged.pixels] == list(hashes)


def test_files_written_after_their_hour_was_read_and_older_than_the_grace_are_counted(
    log, sample, reference, champion, caplog
):
    """A writer whose clock is more than the grace behind (or a store down longer) writes
    files no run reads: they were skipped silently."""
    held_out, labels = split(sample, "held_out")
    names = [CLASSES[label] for label in labels]
    write_log(log, held_out[:20], names[:20])  # 20:26:40
    _, _, _, state = run(log, champion, reference, late_write_grace_hours=1)
    skewed = START_MS - HOUR_MS - 10 * 60_000  # 19:16:40: in the hour listed, out of the grace
    write_log(log, held_out[20:25], names[20:25], start_ms=skewed)
    write_log(log, held_out[25:30], names[25:30], start_ms=skewed - HOUR_MS)  # an hour not listed
    write_log(log, held_out[30:], names[30:], start_ms=START_MS + 2 * HOUR_MS)

    with caplog.at_level("WARNING"):
        summary, metrics, _, _ = run(
            log, champion, reference, state=state, late_write_grace_hours=1
        )

    assert metric(metrics, "predictions") == 30
    assert summary["late_files"]["count"] == 1
    (late,) = summary["late_files"]["examples"]
    assert late.startswith(f"date=2026-05-28/hour=19/{skewed}-")
    assert "1 prediction log files" in caplog.text and late in caplog.text
    assert "raise late_write_grace_hours or delete monitoring_state.json" in caplog.text
    before_it_was_kept = {key: state[key] for key in ("read_through", "recent", "history")}
    older, _, _, _ = run(
        log, champion, reference, state=before_it_was_kept, late_write_grace_hours=1
    )
    assert older["late_files"]["count"] == 0  # whether a file was read is not known there
