"""The prediction log: every answer of /predict, appended through the catalog off the request path.

A request only adds its record to this worker's buffer; a background thread writes the buffer
every ``flush_interval_s`` seconds as one Parquet file per hour (``prediction_log`` in the
catalog: local files by default, the bucket in the ``s3`` environment). A crash loses at most
the records of the last interval. The log is also what resolves a ``prediction_id`` in
/feedback, whichever worker, replica or earlier run of the service issued it: the id starts
with its time, which names the hour to read.
"""

import itertools
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

import numpy as np
import pandas as pd
from kedro.io import DatasetError

from medical_ct.datasets import PredictionLogDataset, hour_partition, log_file_times
from medical_ct.preprocessing import content_hash
from medical_ct.serving import metrics

logger = logging.getLogger(__name__)

PREDICTION_LOG = "prediction_log"
OUTCOMES = ("written", "dropped")  # of a record: medical_ct_prediction_log_records_total{outcome}
_TIME_DIGITS = 12  # hex digits of the milliseconds since the epoch: enough until year 10889
_ID_LENGTH = 32
# Records kept in memory while the store refuses writes; past this the oldest are dropped
# (counted in medical_ct_prediction_log_records_total{outcome="dropped"}).
_MAX_PENDING = 200_000
# While the store refuses writes, each retry waits twice as long as the last, up to this:
# a retry rebuilds the whole backlog (0.8 s at 50,000 records) in the process that answers
# /predict, so retrying every second through a long outage would slow every answer.
_MAX_RETRY_WAIT_S = 60.0
_MAX_CLOCK_SKEW_MS = 24 * 3600 * 1000
_FLUSH_DIGITS = 10  # a flush a second for 300 years of one worker before names sort wrong


def new_prediction_id(now_ms: int | None = None) -> str:
    """32 hex digits: the time in milliseconds, then 80 random bits."""
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    return f"{now_ms:0{_TIME_DIGITS}x}{secrets.token_hex((_ID_LENGTH - _TIME_DIGITS) // 2)}"


def prediction_time_ms(prediction_id: str) -> int | None:
    """When the prediction was made, from its id; ``None`` for an id this service never issues.

    An id from the future (more than a day of clock skew between replicas) is forged.
    """
    if len(prediction_id) != _ID_LENGTH:
        return None
    try:
        int(prediction_id, 16)
    except ValueError:
        return None
    time_ms = int(prediction_id[:_TIME_DIGITS], 16)
    return time_ms if time_ms <= time.time_ns() // 1_000_000 + _MAX_CLOCK_SKEW_MS else None


def _covers(partition: str, time_ms: int) -> bool:
    """Whether a file named ``<first ms>-<last ms>-<writer>[-<flush>]`` can hold a record of
    ``time_ms``."""
    first, last = log_file_times(partition)
    return first <= time_ms <= last


class PredictionLog:
    """This worker's writer of the prediction log, and the reader that resolves ids.

    Args:
        dataset: The catalog's ``prediction_log``.
        flush_interval_s: Seconds between writes: the most a crash can lose.
        log_pixels: Keep the preprocessed 64x64 pixels; when off, only their content hash.
        enabled: When off, nothing is logged and no id resolves (to measure the log's cost).
    """

    def __init__(
        self,
        dataset: PredictionLogDataset,
        flush_interval_s: float,
        log_pixels: bool,
        enabled: bool = True,
    ) -> None:
        self._enabled = enabled
        self._dataset = dataset
        self._flush_interval_s = flush_interval_s
        self._log_pixels = log_pixels
        self._writer = f"{socket.gethostname()}_{os.getpid()}_{secrets.token_hex(3)}"
        self._flushes = itertools.count()
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[int, dict[str, Any], np.ndarray]] = {}
        self._writing: dict[str, tuple[int, dict[str, Any], np.ndarray]] = {}
        self._wait_s = flush_interval_s  # until the next write: longer after each refused one
        self._stop = threading.Event()
        # At 0 from the start, so that the first dropped record is a rise Prometheus sees.
        metrics.start_at_zero(metrics.prediction_log_records, outcome=OUTCOMES)
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def append(self, prediction_id: str, result: dict[str, Any], pixels: np.ndarray) -> None:
        """Queue one answer of /predict; written within ``flush_interval_s`` seconds."""
        if not self._enabled:
            return
        time_ms = prediction_time_ms(prediction_id)
        with self._lock:
            self._pending[prediction_id] = (time_ms, result, pixels)

    def _run(self) -> None:
        while not self._stop.wait(self._wait_s):
            self.flush()

    def flush(self) -> int:
        """Write what is queued, one file per hour; return how many records were written."""
        with self._lock:
            batch, self._pending = self._pending, {}
            self._writing = batch
        if not batch:
            return 0
        try:
            self._dataset.save(self._partitions(batch, next(self._flushes)))
        except Exception as error:  # the store is down: keep the records for the next flush
            self._wait_s = min(2 * self._wait_s, max(_MAX_RETRY_WAIT_S, self._flush_interval_s))
            logger.error("Prediction log write failed, retrying in %ss: %r", self._wait_s, error)
            self._requeue(batch)
            return 0
        finally:
            self._writing = {}
        self._wait_s = self._flush_interval_s
        metrics.prediction_log_backlog.set(0)
        metrics.prediction_log_records.labels(outcome="written").inc(len(batch))
        return len(batch)

    def _partitions(
        self, batch: dict[str, tuple[int, dict[str, Any], np.ndarray]], flush: int
    ) -> dict[str, pd.DataFrame]:
        """``{date=.../hour=.../<first ms>-<last ms>-<writer>-<flush>: records}``, one per hour.

        ``flush`` numbers this writer's flushes: two flushes whose records fell in the same
        millisecond had the same name without it, and the second file replaced the first,
        losing its records while counting them written. Zero-padded, so names still sort by
        time, then writer, then flush.

        Built column by column: this runs once a second beside the request path, in the
        same process, so it must hold the interpreter as briefly as it can.
        """
        by_hour: dict[str, list[str]] = {}
        for prediction_id, (time_ms, _, _) in batch.items():
            by_hour.setdefault(hour_partition(time_ms), []).append(prediction_id)
        partitions = {}
        for hour, ids in by_hour.items():
            times = [batch[prediction_id][0] for prediction_id in ids]
            results = [batch[prediction_id][1] for prediction_id in ids]
            images = [batch[prediction_id][2] for prediction_id in ids]
            records = pd.DataFrame(
                {
                    "predicted_at": pd.to_datetime(times, unit="ms", utc=True),
                    "prediction_id": ids,
                    "model_version": [result["model_version"] for result in results],
                    "label": [result["label"] for result in results],
                    "confidence": [result["confidence"] for result in results],
                    # what the caller was told, as the version served it then
                    "needs_review": [result["needs_review"] for result in results],
                    "out_of_distribution": [result["out_of_distribution"] for result in results],
                    "out_of_distribution_ratio": [
                        result["out_of_distribution_ratio"] for result in results
                    ],
                    "class_names": [list(result["probabilities"]) for result in results],
                    "probabilities": [list(result["probabilities"].values()) for result in results],
                    "pixel_hash": [content_hash(image) for image in images],
                    "pixels": [image.tobytes() if self._log_pixels else None for image in images],
                    "writer": self._writer,
                }
            )
            name = f"{hour}/{min(times)}-{max(times)}-{self._writer}-{flush:0{_FLUSH_DIGITS}d}"
            partitions[name] = records
        return partitions

    def _requeue(self, batch: dict[str, tuple[int, dict[str, Any], np.ndarray]]) -> None:
        with self._lock:
            self._pending = {**batch, **self._pending}
            dropped = len(self._pending) - _MAX_PENDING
            for prediction_id in list(self._pending)[: max(dropped, 0)]:
                del self._pending[prediction_id]
            metrics.prediction_log_backlog.set(len(self._pending))
        if dropped > 0:
            metrics.prediction_log_records.labels(outcome="dropped").inc(dropped)
            logger.error("Prediction log: dropped the %d oldest unwritten records", dropped)

    def find(self, prediction_id: str, wait_s: float | None = None) -> dict[str, Any] | None:
        """The logged record of ``prediction_id``, from any worker; ``None`` if there is none.

        A record made moments ago may not be written yet by the worker that made it: the
        store is read again for up to ``wait_s`` seconds (default: two flush intervals and a
        second) after the prediction's time, never longer.
        """
        time_ms = prediction_time_ms(prediction_id)
        if time_ms is None:
            return None
        wait_s = 2 * self._flush_interval_s + 1 if wait_s is None else wait_s
        deadline = min(time_ms / 1000, time.time()) + wait_s
        while True:
            with self._lock:
                queued = self._pending.get(prediction_id) or self._writing.get(prediction_id)
            if queued is not None:
                _, result, pixels = queued
                pixel_hash = content_hash(pixels)
                return {"prediction_id": prediction_id, **result, "pixel_hash": pixel_hash}
            found = self._read(prediction_id, time_ms)
            if found is not None or time.time() > deadline:
                return found
            time.sleep(0.2)

    def _read(self, prediction_id: str, time_ms: int) -> dict[str, Any] | None:
        hour = self._dataset.hour_partitions(hour_partition(time_ms))
        for partition, load in hour.items():
            if not _covers(partition, time_ms):
                continue
            try:
                records = load()
                match = records[records["prediction_id"] == prediction_id]
            except (DatasetError, OSError, ValueError, KeyError) as error:
                # One such file (truncated, another schema) made every /feedback naming an
                # id of its hour answer 500; monitoring skips it the same way.
                logger.warning(
                    "Prediction log file %s cannot be read (%r): looked past it for %s; move it "
                    "aside once looked at",
                    partition,
                    error,
                    prediction_id,
                )
                continue
            if len(match):
                return match.iloc[0].to_dict()
        return None

    def close(self) -> None:
        """Stop the writer thread and write what is left; what the store still refuses is
        lost with the worker, and counted as dropped."""
        self._stop.set()
        self._thread.join(timeout=self._flush_interval_s + 5)
        self.flush()
        with self._lock:
            lost, self._pending = len(self._pending), {}
        if lost:
            metrics.prediction_log_records.labels(outcome="dropped").inc(lost)
            metrics.prediction_log_backlog.set(0)
            logger.error("Prediction log: %d records were not written before shutdown", lost)
