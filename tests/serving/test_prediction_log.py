"""The prediction log in process: records, partitions, ids across writers, a store that fails."""

import shutil
import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from medical_ct.datasets import PredictionLogDataset
from medical_ct.preprocessing import content_hash
from medical_ct.serving.prediction_log import (
    PredictionLog,
    hour_partition,
    new_prediction_id,
    prediction_time_ms,
)
from medical_ct.serving.project import ServingConfig

CLASSES = ["Hand", "CXR"]


def result(label: str = "Hand", version: str = "3") -> dict:
    probabilities = {"Hand": 0.9, "CXR": 0.1} if label == "Hand" else {"Hand": 0.2, "CXR": 0.8}
    return {
        "label": label,
        "confidence": probabilities[label],
        "probabilities": probabilities,
        "model_version": version,
        "needs_review": False,
        "out_of_distribution": False,
        "out_of_distribution_ratio": 0.5,
    }


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64), dtype=np.uint8)


@pytest.fixture
def dataset(tmp_path) -> PredictionLogDataset:
    return PredictionLogDataset(path=str(tmp_path / "prediction_log"))


def open_log(dataset, log_pixels: bool = True, flush_interval_s: float = 60) -> PredictionLog:
    """A log whose thread will not flush during a test: the test flushes."""
    return PredictionLog(dataset, flush_interval_s=flush_interval_s, log_pixels=log_pixels)


def test_ids_carry_their_time_and_name_the_hour():
    at = 1_795_465_510_697  # 2026-11-23 20:25:10.697 UTC

    prediction_id = new_prediction_id(at)

    assert len(prediction_id) == 32 and int(prediction_id, 16) >= 0
    assert prediction_time_ms(prediction_id) == at
    assert hour_partition(at) == "date=2026-11-23/hour=20"
    assert new_prediction_id(at) != prediction_id
    from_the_future = new_prediction_id(int(time.time() * 1000) + 2 * 24 * 3600 * 1000)
    for malformed in ("", "x" * 32, prediction_id[:-1], prediction_id + "0", "f" * 32):
        assert prediction_time_ms(malformed) is None
    assert prediction_time_ms(from_the_future) is None  # forged: would be waited for


def test_a_flush_writes_one_parquet_file_per_hour_with_every_field(dataset):
    log = open_log(dataset)
    first, second = new_prediction_id(), new_prediction_id()
    log.append(first, result("Hand"), pixels(1))
    log.append(second, result("CXR"), pixels(2))

    assert dataset.load() == {}
    assert log.flush() == 2
    log.close()

    (partition, load), *others = dataset.load().items()
    assert others == []
    assert partition.startswith(hour_partition(prediction_time_ms(first)) + "/")
    records = load().set_index("prediction_id")
    assert list(records.index) == [first, second]
    assert list(records["label"]) == ["Hand", "CXR"]
    assert list(records.loc[second, "probabilities"]) == [0.2, 0.8]
    assert list(records.loc[second, "class_names"]) == CLASSES
    assert records.loc[first, "pixels"] == pixels(1).tobytes()
    assert records.loc[first, "pixel_hash"] == content_hash(pixels(1))
    assert records["predicted_at"].dt.tz is not None


def test_pixels_can_be_left_out_and_the_hash_stays(dataset):
    log = open_log(dataset, log_pixels=False)
    log.append(new_prediction_id(), result(), pixels(3))
    log.close()

    records = next(iter(dataset.load().values()))()
    assert records["pixels"].isna().all()
    assert records["pixel_hash"].tolist() == [content_hash(pixels(3))]


def test_an_id_resolves_from_another_writer_only_in_its_hour(dataset):
    worker, other_worker = open_log(dataset), open_log(dataset)
    prediction_id = new_prediction_id()
    worker.append(prediction_id, result("CXR", version="7"), pixels(4))

    assert worker.find(prediction_id)["label"] == "CXR"  # not written yet: from memory
    worker.flush()
    found = other_worker.find(prediction_id)
    assert (found["label"], found["model_version"]) == ("CXR", "7")
    an_hour_earlier = new_prediction_id(prediction_time_ms(prediction_id) - 3_600_000)
    assert other_worker.find(an_hour_earlier) is None
    assert other_worker.find("not an id") is None
    for log in (worker, other_worker):
        log.close()


def test_a_fresh_id_is_waited_for_while_its_writer_has_not_flushed(dataset):
    writer = open_log(dataset, flush_interval_s=0.5)  # its own thread flushes
    reader = open_log(dataset, flush_interval_s=0.5)
    prediction_id = new_prediction_id()
    writer.append(prediction_id, result(), pixels(5))

    started = time.monotonic()
    found = reader.find(prediction_id)

    assert found is not None and found["prediction_id"] == prediction_id
    assert time.monotonic() - started < 2
    started = time.monotonic()
    assert reader.find(new_prediction_id()) is None  # gives up after 2 intervals and a second
    assert 1.5 < time.monotonic() - started < 4
    for log in (writer, reader):
        log.close()


def test_two_flushes_of_one_millisecond_keep_both_files(dataset):
    """Two answers of one worker in the same millisecond (a batch resumed together), flushed
    apart: the second file replaced the first under the same name, losing its record."""
    log = open_log(dataset, log_pixels=False)
    now_ms = int(time.time() * 1000)
    first, second = new_prediction_id(now_ms), new_prediction_id(now_ms)
    log.append(first, result("Hand"), pixels(8))
    assert log.flush() == 1
    log.append(second, result("CXR"), pixels(9))
    assert log.flush() == 1

    names = sorted(dataset.load())
    assert len(names) == 2 and names[0] < names[1]  # in flush order
    assert log.find(first, wait_s=0)["label"] == "Hand"
    assert log.find(second, wait_s=0)["label"] == "CXR"
    log.close()


def test_a_file_not_named_by_the_service_is_left_out_with_a_warning(dataset, tmp_path, caplog):
    """A copy made by hand in the log's hour folder stopped every /feedback of that hour."""
    log = open_log(dataset)
    prediction_id = new_prediction_id()
    log.append(prediction_id, result("CXR"), pixels(10))
    log.flush()
    (written,) = (tmp_path / "prediction_log").rglob("*.parquet")
    shutil.copy(written, written.with_name("backup copy.parquet"))
    shutil.copy(written, written.with_name("0_export.parquet"))  # sorts first

    with caplog.at_level("WARNING"):
        found = log.find(prediction_id, wait_s=0)

    assert found["label"] == "CXR"
    assert "backup copy" in caplog.text and "0_export" in caplog.text
    assert "move them out of" in caplog.text
    assert list(dataset.load()) == [
        written.relative_to(tmp_path / "prediction_log").as_posix()[:-8]
    ]
    log.close()


def test_an_unreadable_log_file_is_looked_past_when_resolving_an_id(dataset, tmp_path, caplog):
    """A file named as the service names them but cut short (a disk error, a hand edit) made
    every /feedback naming an id of its hour answer 500."""
    log = open_log(dataset)
    prediction_id = new_prediction_id()
    log.append(prediction_id, result("CXR"), pixels(11))
    log.flush()
    (written,) = (tmp_path / "prediction_log").rglob("*.parquet")
    first, last = written.name.split("-")[:2]
    broken = written.with_name(f"{first}-{last}-0writer-0000000000.parquet")  # sorts first
    broken.write_bytes(written.read_bytes()[:100])  # and covers the same time

    with caplog.at_level("WARNING"):
        found = log.find(prediction_id, wait_s=0)

    assert found["label"] == "CXR"
    assert f"{broken.name[:-8]} cannot be read" in caplog.text and "move it aside" in caplog.text
    log.close()


def test_a_disabled_log_writes_and_resolves_nothing(dataset):
    log = PredictionLog(dataset, flush_interval_s=60, log_pixels=True, enabled=False)
    prediction_id = new_prediction_id()
    log.append(prediction_id, result(), pixels(7))

    assert log.flush() == 0
    assert log.find(prediction_id, wait_s=0) is None
    log.close()
    assert dataset.load() == {}


def test_records_survive_a_store_that_refuses_writes(tmp_path):
    blocked = tmp_path / "prediction_log"
    blocked.write_text("a file where the log folder should be")
    log = open_log(PredictionLogDataset(path=str(blocked)))
    prediction_id = new_prediction_id()
    log.append(prediction_id, result(), pixels(6))

    assert log.flush() == 0
    assert log.find(prediction_id)["label"] == "Hand"  # still queued
    blocked.unlink()
    assert log.flush() == 1
    log.close()
    assert len(next(iter(PredictionLogDataset(path=str(blocked)).load().values()))()) == 1


def backlog() -> float:
    return REGISTRY.get_sample_value("medical_ct_prediction_log_backlog_records")


def dropped() -> float:
    sample = {"outcome": "dropped"}
    return REGISTRY.get_sample_value("medical_ct_prediction_log_records_total", sample) or 0


def test_a_refused_store_is_retried_less_often_shown_as_a_backlog_and_counted_when_lost(
    tmp_path, caplog
):
    """Each retry rebuilds the whole backlog in the process that answers /predict: through an
    outage they back off (doubling) instead of running every flush interval, /metrics shows
    what waits (the alert MedicalCTPredictionLogNotWritten), and what a shutdown cannot
    write is counted as dropped (MedicalCTPredictionLogRecordsDropped)."""
    blocked = tmp_path / "prediction_log"
    blocked.write_text("a file where the log folder should be")
    log = open_log(PredictionLogDataset(path=str(blocked)), flush_interval_s=0.05)
    for seed in range(3):
        log.append(new_prediction_id(), result(), pixels(seed))
    dropped_before = dropped()

    with caplog.at_level("ERROR", logger="medical_ct.serving.prediction_log"):
        time.sleep(1.6)  # every 0.05 s: 32 tries; backing off: 0.1, 0.2, 0.4, 0.8 s
        tries = caplog.text.count("Prediction log write failed")
        assert 2 <= tries <= 6, caplog.text
        assert backlog() == 3
        blocked.unlink()
        log.close()

    assert backlog() == 0 and dropped() == dropped_before  # written at shutdown
    refused = tmp_path / "refused_at_shutdown"
    refused.write_text("a file where the log folder should be")
    log = open_log(PredictionLogDataset(path=str(refused)))
    log.append(new_prediction_id(), result(), pixels(9))
    log.close()
    assert dropped() == dropped_before + 1 and backlog() == 0
    assert "1 records were not written before shutdown" in caplog.text


def test_a_reader_never_sees_a_half_written_file(dataset, tmp_path):
    """Monitoring, review and /feedback of other workers read the log while a worker flushes:
    a file appears whole or not at all (a half-written Parquet file failed a /feedback)."""
    log = open_log(dataset)
    stop, read_errors, files_read = threading.Event(), [], []

    def read_while_writing() -> None:
        while not stop.is_set():
            for load in dataset.load().values():
                try:
                    files_read.append(len(load()))
                except Exception as error:  # any torn read fails the test
                    read_errors.append(error)

    reader = threading.Thread(target=read_while_writing)
    reader.start()
    try:
        for flush in range(20):
            for seed in range(300):
                log.append(new_prediction_id(), result(), pixels(flush * 300 + seed))
            assert log.flush() == 300
    finally:
        stop.set()
        reader.join()
        log.close()

    assert read_errors == []
    assert files_read and set(files_read) == {300}
    written = [path for path in (tmp_path / "prediction_log").rglob("*") if path.is_file()]
    assert len(written) == 20 and all(path.suffix == ".parquet" for path in written)


LOG = {"flush_interval_s": 1.0, "log_pixels": True, "enabled": True}
SERVING = {
    "model_poll_interval_s": 30,
    "max_batch_size": 64,
    "max_latency_ms": 1000,
    "max_upload_bytes": 1000,
    "workers": 2,
    "prediction_log": {"flush_interval_s": 1.0, "log_pixels": "false", "enabled": True},
}


def test_serving_config_reads_environment_text():
    config = ServingConfig.from_config(SERVING)

    assert config.workers == 2
    assert config.log_pixels is False
    assert config.prediction_log_flush_interval_s == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"workers": 0}, "positive"),
        ({"workers": "two"}, "invalid"),
        ({"prediction_log": {**LOG, "log_pixels": "maybe"}}, "not a boolean"),
        ({"prediction_log": {**LOG, "flush_interval_s": 0}}, "positive"),
        ({"prediction_log": {"log_pixels": True, "enabled": True}}, "flush_interval_s"),
    ],
)
def test_bad_serving_config_is_refused_with_what_is_wrong(change, message):
    with pytest.raises(ValueError, match=message):
        ServingConfig.from_config({**SERVING, **change})
