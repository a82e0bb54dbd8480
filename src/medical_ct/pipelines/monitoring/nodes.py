"""Nodes of the monitoring pipeline: how the champion does in production, without labels.

Reads the prediction log since the last run (only partitions not read before), and compares
what came in with the champion's training data: input drift on per-image features that mean
something for images (the champion's own penultimate-layer embedding, projected on its main
axes, and intensity statistics), tested feature by feature with scipy's two-sample
Kolmogorov-Smirnov test; prediction drift (the predicted class mix against the training class mix, a
chi-square test); confidence (share under the review threshold, and the mean calibrated top
probability as the accuracy expected without labels); and, where reviewers accepted
corrections of predictions, the error rate they measured.
"""

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from kedro.io import DatasetError
from matplotlib.figure import Figure
from scipy.stats import chisquare, ks_2samp
from sklearn.decomposition import PCA

from medical_ct.datasets import collect_records, hour_partition, log_file_times, mark_revoked
from medical_ct.model import embed, feature_extractor
from medical_ct.plots import message_figure
from medical_ct.preprocessing import IMAGE_SIZE
from medical_ct.registry import RegisteredClassifier
from medical_ct.serving.ood import OodReference

from . import report

logger = logging.getLogger(__name__)

INTENSITY_FEATURES = ("intensity_mean", "intensity_std", "intensity_p05", "intensity_p50",
                      "intensity_p95")  # fmt: skip
_HISTORY_RUNS = 104  # two years of weekly runs in the drift-over-time plot
_HOUR_MS = 3600 * 1000
_CONFIDENCE_BINS = 20


@dataclass(frozen=True)
class MonitoringParams:
    """The ``monitoring`` parameters (conf/base/parameters_monitoring.yml), checked once."""

    reference_size: int = 2000
    max_drift_images: int = 10000
    seed: int = 42
    embedding_components: int = 5
    p_value: float = 0.01
    min_ks_statistic: float = 0.1
    drift_share: float = 0.5
    prediction_drift_p_value: float = 0.01
    min_records: int = 30
    max_low_confidence_share: float = 0.2
    max_feedback_error_rate: float = 0.1
    max_out_of_distribution_share: float = 0.02
    fallback_review_threshold: float = 0.9
    unusual_images: int = 16
    late_write_grace_hours: float = 6.0

    @classmethod
    def from_params(cls, monitoring: Any) -> "MonitoringParams":
        """Check ``monitoring`` parameters; raise one ``ValueError`` naming every problem."""
        if not isinstance(monitoring, Mapping):
            raise ValueError(
                "parameters monitoring must be a mapping (see "
                f"conf/base/parameters_monitoring.yml), got {monitoring!r}"
            )
        defaults = cls()
        problems = []
        for key in ("reference_size", "max_drift_images", "min_records", "embedding_components",
                    "unusual_images"):  # fmt: skip
            value = monitoring.get(key, getattr(defaults, key))
            if not _is_int(value) or value < 1:
                problems.append(f"{key} must be a positive integer, got {value!r}")
        seed = monitoring.get("seed", defaults.seed)
        if not _is_int(seed) or seed < 0:
            problems.append(f"seed must be a non-negative integer, got {seed!r}")
        for key in ("p_value", "min_ks_statistic", "drift_share", "prediction_drift_p_value",
                    "max_low_confidence_share", "max_feedback_error_rate",
                    "max_out_of_distribution_share",
                    "fallback_review_threshold"):  # fmt: skip
            value = monitoring.get(key, getattr(defaults, key))
            if not _is_number(value) or not 0 < value <= 1:
                problems.append(f"{key} must be a number in (0, 1], got {value!r}")
        grace = monitoring.get("late_write_grace_hours", defaults.late_write_grace_hours)
        if not _is_number(grace) or grace < 0:
            problems.append(f"late_write_grace_hours must be a number >= 0, got {grace!r}")
        unknown = sorted(set(monitoring) - {field.name for field in fields(cls)})
        if unknown:
            known = ", ".join(field.name for field in fields(cls))
            problems.append(f"unknown keys {unknown}; known: {known}")
        if problems:
            raise ValueError("invalid parameters monitoring: " + "; ".join(problems))
        return cls(**{**asdict(defaults), **monitoring})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---- which partitions are new ----
def partition_first_ms(name: str) -> int:
    """The time of the first record of a partition ``.../<first ms>-<last ms>-<writer>-<flush>``
    (or without ``-<flush>``, as written before): ``PredictionLogDataset`` lists no other."""
    return log_file_times(name)[0]


def listed_partitions(
    prediction_log: Mapping[str, Callable[[], pd.DataFrame]], state: dict[str, Any], grace_ms: int
) -> Mapping[str, Callable[[], pd.DataFrame]]:
    """The log's partitions a run may read: with a state, only those of the hours from
    ``read_through`` less the grace on (``LoggedFiles.since``), where listing the whole log
    grew with its age though only the new files are read; a first run lists them all."""
    read_through = state.get("read_through")
    since = getattr(prediction_log, "since", None)
    if read_through is None or since is None:  # any other mapping is taken as it is
        return prediction_log
    return since(hour_partition(partition_first_ms(read_through) - grace_ms))


def new_partitions(names: list[str], state: dict[str, Any], grace_ms: int) -> list[str]:
    """Partitions not read by earlier runs, in time order.

    Names sort by hour, then by their first record's time, so everything after the last name
    read is new. A writer that could not reach the store keeps its records and writes them
    later under their first record's time: partitions up to ``grace_ms`` before the last one
    read are checked against the names read then (``state["recent"]``).
    """
    read_through = state.get("read_through")
    if read_through is None:
        return sorted(names)
    recent = set(state.get("recent", []))
    since = partition_first_ms(read_through) - grace_ms
    return sorted(
        name
        for name in names
        if name not in recent and (name > read_through or partition_first_ms(name) >= since)
    )


def starting_state(state: dict[str, Any], mlflow_run: str | None) -> dict[str, Any]:
    """The state a run starts from: the one before the last, when the last was written by
    this very MLflow run (an Airflow task cleared or retried after saving it; the DAG's tasks
    share the DAG run's MLflow run). Started from the last, the retry found nothing new and
    logged an empty summary and report over the week's into the same MLflow run."""
    if mlflow_run is not None and state.get("written_by") == mlflow_run:
        return state.get("before") or {}
    return state


def next_state(
    state: dict[str, Any],
    read: list[str],
    grace_ms: int,
    run: dict[str, Any] | None,
    mlflow_run: str | None = None,
) -> dict[str, Any]:
    """The state after reading ``read``: the last name, the names read in the hours the next
    run lists (from the hour of the grace window's start: ``recent_from``, so that run can
    tell a listed file never read, ``too_late``), and the run's figures appended to the
    history (the drift-over-time plot). Written by an MLflow run, it keeps ``state`` as
    ``before``, for a retry of that run to start from (``starting_state``)."""
    recent = sorted({*state.get("recent", []), *read})
    read_through = max([*recent, state.get("read_through") or ""]) or None
    recent_from = None
    if read_through is not None:
        since = partition_first_ms(read_through) - grace_ms
        recent_from = since // _HOUR_MS * _HOUR_MS
        recent = [name for name in recent if partition_first_ms(name) >= recent_from]
    history = [*state.get("history", []), *([run] if run else [])][-_HISTORY_RUNS:]
    new = {
        "read_through": read_through,
        "recent": recent,
        "recent_from": recent_from,
        "history": history,
    }
    if mlflow_run is not None:
        before = {key: value for key, value in state.items() if key not in ("before", "written_by")}
        new.update(written_by=mlflow_run, before=before)
    return new


def too_late(listed: list[str], new: list[str], state: dict[str, Any]) -> list[str]:
    """Listed files never read that no run will read: named before the grace window, in the
    hours whose names read the state keeps (``recent_from`` on; none for a state written
    before it kept them), yet not among them, so written after the run that read that hour.

    A writer whose clock is off by more than the grace, or that could not reach the store
    for longer, writes such files; they were skipped silently. The count is a floor: files
    of earlier hours are not listed (what a listing of the whole log cost, ``LoggedFiles``).
    """
    recent_from = state.get("recent_from")
    if recent_from is None:
        return []
    known = {*state.get("recent", []), *new}
    return [
        name for name in listed if name not in known and partition_first_ms(name) >= recent_from
    ]


# ---- reading records ----
@dataclass(frozen=True)
class LoggedPredictions:
    """The records read: one row each (no pixels), and a uniform sample of their images.

    ``pixels`` holds at most the sample size of the images logged with pixels (records
    logged with ``log_pixels`` off have none), ``pixel_rows`` their positions in
    ``records``, ``images_logged`` how many records had pixels at all, and ``duplicates``
    how many records were left out as read before under the same ``prediction_id``.
    """

    records: pd.DataFrame
    pixels: np.ndarray
    pixel_rows: np.ndarray
    images_logged: int
    unreadable: tuple[str, ...] = ()
    duplicates: int = 0


_RECORD_COLUMNS = [
    "predicted_at",
    "prediction_id",
    "model_version",
    "label",
    "confidence",
    "pixel_hash",
    "out_of_distribution",
]
_LATER_COLUMNS = {"out_of_distribution"}  # written since 2026-12-05: NaN in older files
_RECORD_TYPES = {"predicted_at": "datetime64[ns, UTC]", "confidence": "float64"}


def _no_records() -> pd.DataFrame:
    """The records of a run that read none, typed as read ones are (strings: ``object``)."""
    return pd.DataFrame(
        {column: pd.Series(dtype=_RECORD_TYPES.get(column, object)) for column in _RECORD_COLUMNS}
    )


def read_predictions(
    partitions: Mapping[str, Callable[[], pd.DataFrame]],
    names: list[str],
    max_images: int,
    rng: np.random.Generator,
) -> LoggedPredictions:
    """Load ``names`` one file at a time, keeping the columns monitoring uses and a uniform
    sample of ``max_images`` images.

    The sample is drawn as it goes (each image gets a random key; the ``max_images`` largest
    keys are kept), so memory stays at the sample's 4 KiB an image however many records a
    run reads: 100,000 images would otherwise be 400 MiB, twice over while joined.

    A ``prediction_id`` read before is left out (the first kept, in name order), and counted
    in a warning: a write the store kept but answered with an error (an S3 PUT that landed,
    then timed out) is retried, with newer records, under another name, so its records are
    in two files and were counted twice.
    """
    tables, offset, logged = [], 0, 0
    kept: list[np.ndarray] = []
    kept_rows: list[np.ndarray] = []
    kept_keys: list[np.ndarray] = []
    buffered = 0
    unreadable = []
    seen: set[str] = set()
    duplicates = 0
    for name in names:
        table = _read_partition(partitions, name)
        if table is None:
            unreadable.append(name)
            continue
        ids = table["prediction_id"]
        repeated = (ids.isin(seen) | ids.duplicated()).to_numpy()
        if repeated.any():
            duplicates += int(repeated.sum())
            table = table[~repeated].reset_index(drop=True)
        seen.update(table["prediction_id"])
        pixels = table["pixels"].to_numpy()
        has_pixels = np.flatnonzero(pd.notna(pixels))
        if len(has_pixels):
            images = np.frombuffer(b"".join(pixels[has_pixels]), np.uint8)
            kept.append(images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE))
            kept_rows.append(has_pixels + offset)
            kept_keys.append(rng.random(len(has_pixels)))
            logged += len(has_pixels)
            buffered += len(has_pixels)
            if buffered > 2 * max_images:  # reduce now and then: copies stay ~2 per image
                kept, kept_rows, kept_keys = _largest_keys(kept, kept_rows, kept_keys, max_images)
                buffered = max_images
        tables.append(table.reindex(columns=_RECORD_COLUMNS))
        offset += len(table)
    if kept:
        kept, kept_rows, kept_keys = _largest_keys(kept, kept_rows, kept_keys, max_images)
    images = np.concatenate(kept) if kept else np.empty((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    rows = np.concatenate(kept_rows) if kept_rows else np.empty(0, np.int64)
    records = pd.concat(tables, ignore_index=True) if tables else _no_records()
    records["model_version"] = records["model_version"].astype(str)
    if duplicates:
        logger.warning(
            "Monitoring: %d records read again under another file name were counted once (a "
            "write the store kept but reported failed is written again by the service)",
            duplicates,
        )
    order = np.argsort(rows)
    return LoggedPredictions(
        records, images[order], rows[order], logged, tuple(unreadable), duplicates
    )


def _read_partition(
    partitions: Mapping[str, Callable[[], pd.DataFrame]], name: str
) -> pd.DataFrame | None:
    """One log file, or ``None`` with a warning when it cannot be read (truncated by a full
    disk, written by a writer of another schema): one bad file must not stop the weekly run
    (training waits for monitoring), and it stays in the store for a person to look at.
    What it holds is read as the service writes it (``_as_written``)."""
    try:
        table = partitions[name]()
        missing = sorted({*_RECORD_COLUMNS, "pixels"} - _LATER_COLUMNS - set(table.columns))
        if missing:
            raise ValueError(f"columns {missing} missing")
    except (DatasetError, OSError, ValueError) as error:
        logger.warning(
            "Monitoring: skipped prediction log file %s, which cannot be read (%s); it is "
            "left in the store: move it aside once looked at",
            name,
            error,
        )
        return None
    return _as_written(table, name)


def _as_written(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """``table`` with UTC times, float confidences and only 64x64 images as pixels.

    A file of another writer version or edited by hand has the right columns of other
    types: times without a time zone or confidences as text stopped the node, and pixel
    blobs of another length misaligned the image sample with its records (a 16,384-byte
    blob became four images of one record). Times without a zone are taken as UTC; a record
    whose time or confidence cannot be read is left out, and a blob that is not
    ``IMAGE_SIZE`` squared bytes is taken as no pixels (its record kept), both counted in a
    warning.
    """
    predicted_at = pd.to_datetime(table["predicted_at"], utc=True, errors="coerce")
    confidence = pd.to_numeric(table["confidence"], errors="coerce").astype(float)
    pixels = table["pixels"]
    size = IMAGE_SIZE * IMAGE_SIZE
    is_image = np.array([isinstance(blob, bytes) and len(blob) == size for blob in pixels], bool)
    other_pixels = int((pd.notna(pixels).to_numpy() & ~is_image).sum())
    unusable = (predicted_at.isna() | confidence.isna()).to_numpy()
    table = table.assign(
        predicted_at=predicted_at, confidence=confidence, pixels=pixels.where(is_image, None)
    )
    if unusable.any() or other_pixels:
        logger.warning(
            "Monitoring: prediction log file %s: left out %d records whose predicted_at or "
            "confidence is not a time and a number, and the pixels of %d records that are not "
            "a %dx%d image of %d bytes (those records are kept without an image); a writer of "
            "another version or a hand edit wrote it: look at it",
            name,
            int(unusable.sum()),
            other_pixels,
            IMAGE_SIZE,
            IMAGE_SIZE,
            size,
        )
    return table[~unusable].reset_index(drop=True)


def _largest_keys(
    images: list[np.ndarray], rows: list[np.ndarray], keys: list[np.ndarray], limit: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The ``limit`` images of the largest random keys (all of them when fewer)."""
    all_keys = np.concatenate(keys)
    top = np.argpartition(-all_keys, limit - 1)[:limit] if len(all_keys) > limit else slice(None)
    return [np.concatenate(images)[top]], [np.concatenate(rows)[top]], [all_keys[top]]


# ---- features and tests ----
def intensity_features(images: np.ndarray) -> pd.DataFrame:
    """Mean, standard deviation and 5th/50th/95th percentiles of each image's pixels.

    Brightness, contrast and window changes of a scanner or protocol show here first, in
    units a person reads (grey levels 0-255).
    """
    flat = images.reshape(len(images), -1).astype(np.float32)
    percentiles = np.percentile(flat, [5, 50, 95], axis=1) if len(flat) else np.empty((3, 0))
    return pd.DataFrame(
        {
            "intensity_mean": flat.mean(axis=1),
            "intensity_std": flat.std(axis=1),
            "intensity_p05": percentiles[0],
            "intensity_p50": percentiles[1],
            "intensity_p95": percentiles[2],
        }
    )


def embedding_frame(projected: np.ndarray) -> pd.DataFrame:
    """Embedding components as columns ``embedding_1``, ``embedding_2``..."""
    return pd.DataFrame(
        projected, columns=[f"embedding_{i + 1}" for i in range(projected.shape[1])]
    )


def input_drift(
    reference: pd.DataFrame, current: pd.DataFrame, params: MonitoringParams
) -> dict[str, Any]:
    """Each per-image feature tested with the two-sample Kolmogorov-Smirnov test; input drift
    when at least ``drift_share`` of the features drifted.

    A feature drifts when the test rejects (p-value under ``p_value``) and its statistic,
    the largest gap between the two cumulative distributions, is at least
    ``min_ks_statistic``: with thousands of images every irrelevant shift is significant,
    so the size of the shift must count too. The score logged is the share of features that
    drifted.
    """
    features = {}
    for name in reference.columns:
        test = ks_2samp(reference[name].to_numpy(), current[name].to_numpy())
        features[name] = {
            "statistic": float(test.statistic),
            "p_value": float(test.pvalue),
            "drifted": bool(
                test.pvalue < params.p_value and test.statistic >= params.min_ks_statistic
            ),
        }
    score = sum(feature["drifted"] for feature in features.values()) / max(len(features), 1)
    return {
        "tested": True,
        "score": score,
        "detected": score >= params.drift_share,
        "features": features,
        "p_value": params.p_value,
        "min_ks_statistic": params.min_ks_statistic,
        "reference_images": len(reference),
        "current_images": len(current),
    }


def prediction_drift(
    predicted: pd.Series, class_names: list[str], training_shares: np.ndarray, p_value: float
) -> dict[str, Any]:
    """Chi-square test of the predicted class counts against the training class mix.

    Answers in classes ``class_names`` lacks (a version trained on other classes) leave it
    untested: dropping them would test what is left as if it were every answer.
    """
    all_counts = predicted.value_counts()
    other = {str(label): int(n) for label, n in all_counts.items() if label not in class_names}
    counts = all_counts.reindex(class_names, fill_value=0).to_numpy()
    if other:
        return {
            "class_counts": dict(zip(class_names, counts.tolist(), strict=True)),
            "other_classes": other,
            "p_value": None,
            "detected": False,
            "reason": f"answers in classes the champion does not have ({', '.join(other)}): "
            "a version trained on other classes, not tested against this training mix",
        }
    expected = np.maximum(training_shares, 1e-9)
    expected = expected / expected.sum() * counts.sum()
    test = chisquare(counts, expected)
    return {
        "class_counts": dict(zip(class_names, counts.tolist(), strict=True)),
        "p_value": float(test.pvalue),
        "detected": bool(test.pvalue < p_value),
    }


def low_confidence_share(confidence: np.ndarray, threshold: float) -> float:
    """Share of answers under the review threshold: those a person should check."""
    return float(np.mean(confidence < threshold)) if len(confidence) else float("nan")


def out_of_distribution_share(flags: pd.Series) -> float | None:
    """Share of answers the service flagged ``out_of_distribution`` (images unlike the
    training images), of those logged with the flag; None when none was. Such images come
    with confident answers, so neither the confidence nor the class mix shows a minority of
    them: 60 non-medical images among 600 raised no alert before this."""
    known = flags.dropna()
    return float(known.astype(bool).mean()) if len(known) else None


def estimated_accuracy(confidence: np.ndarray) -> float:
    """The accuracy expected without labels: the mean calibrated top probability.

    A calibrated model's top probability is its chance of being right, so the mean over a
    stream estimates the stream's accuracy as long as the images look like the calibration
    (validation) images; under input drift it is optimistic, which is why both are reported.
    """
    return float(np.mean(confidence)) if len(confidence) else float("nan")


def feedback_errors(accepted: list[dict[str, Any]], version: str) -> dict[str, Any]:
    """Accepted feedback that corrected an answer of ``version``: how often the answer was wrong.

    A reviewer accepted the label; the answer was an error when it differs. People send
    feedback mostly when an answer looks wrong, so this rate is an upper estimate of the
    error rate, not the accuracy on the stream. A label revoked since is no correction.
    """
    corrections = [
        record
        for record in accepted
        if str(record.get("corrected_model_version")) == version
        and record.get("corrected_label")
        and not record.get("revoked")
    ]
    errors = sum(record["label"] != record["corrected_label"] for record in corrections)
    return {
        "accepted_corrections": len(corrections),
        "errors": errors,
        "error_rate": errors / len(corrections) if corrections else None,
    }


def confidence_histogram(confidence: np.ndarray) -> dict[str, list]:
    counts, edges = np.histogram(confidence, bins=_CONFIDENCE_BINS, range=(0.0, 1.0))
    return {"edges": edges.round(4).tolist(), "counts": counts.tolist()}


def sample_positions(size: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` of ``range(size)``, drawn without replacement, in order."""
    return np.sort(rng.choice(size, limit, replace=False)) if size > limit else np.arange(size)


# ---- the node ----
def monitor_predictions(
    prediction_log: Mapping[str, Callable[[], pd.DataFrame]],
    previous_state: dict[str, Any] | None,
    mlflow_run: str | None,
    champion: RegisteredClassifier | None,
    reference_set: Mapping[str, Any] | None,
    reference_classes: list[str] | None,
    accepted_feedback: Mapping[str, Callable[[], dict[str, Any]]],
    kept_records: dict[str, dict] | None,
    revoked_feedback: Mapping[str, Callable[[], dict[str, Any]]],
    monitoring: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], Figure, dict[str, Any]]:
    """Measure the prediction log's new records against the champion's training data.

    Args:
        prediction_log: ``{partition: loader}`` of the service's prediction log (the
            catalog's ``LoggedFiles``: only the hours a run may read are listed).
        previous_state: The last run's state (``None`` before the first run).
        mlflow_run: This run's MLflow run id (``None`` outside one): a retry of the run that
            wrote ``previous_state`` starts from the state before it (``starting_state``).
        champion: The registry's champion; ``None`` before the first promotion.
        reference_set: The model input's train split (``None`` before data_processing).
        reference_classes: The model input's class names, which its labels index (``None``
            before data_processing).
        accepted_feedback: ``{feedback id: loader}`` of the accepted feedback records.
        kept_records: The readable ones data_processing kept last run (``accepted_records``;
            ``None`` before it ran): only records listed since are read (``collect_records``).
        revoked_feedback: ``{feedback id: loader}`` of the revocations: a label revoked is no
            correction, from the moment it is revoked (``mark_revoked``).
        monitoring: The ``monitoring`` parameters.

    Returns:
        The summary (what the report shows), the MLflow metrics (``monitoring.*``), a grid
        of the most unusual images and the new state: last, because the runner saves a
        node's outputs in order, and a state saved before a save that then failed had moved
        past the files this run read, so the next run found nothing new and that week's
        measurement was lost.
    """
    params = MonitoringParams.from_params(monitoring)
    state = starting_state(previous_state or {}, mlflow_run)
    grace_ms = int(params.late_write_grace_hours * 3600 * 1000)
    summary: dict[str, Any] = {"run_at": datetime.now(UTC).isoformat(), "alerts": []}
    if champion is None:
        message = "Monitoring: no champion in the registry yet, nothing to monitor"
        return _nothing(summary, state, "no_champion", message)
    listed = listed_partitions(prediction_log, state, grace_ms)
    names = new_partitions(list(listed), state, grace_ms)
    summary["champion_version"] = champion.version
    summary["late_files"] = _warn_too_late(too_late(list(listed), names, state), params)
    if not names:
        message = (
            f"Monitoring: no new prediction log records since the last run "
            f"(read through {state.get('read_through') or 'nothing yet'})"
        )
        return _nothing(summary, state, "no_new_records", message)
    rng = np.random.default_rng(params.seed)
    logged = read_predictions(listed, names, params.max_drift_images, rng)
    records = logged.records
    logger.info("Monitoring: %d new records in %d partitions", len(records), len(names))
    if records.empty:
        return _nothing_readable(
            summary, next_state(state, names, grace_ms, None, mlflow_run), logged, names
        )
    threshold = champion.review_threshold or params.fallback_review_threshold
    training_shares = _training_shares(reference_set, reference_classes, champion.class_names)
    accepted, _ = mark_revoked(collect_records(accepted_feedback, kept_records), revoked_feedback)
    accepted = list(accepted.values())
    summary.update(
        status="measured",
        records=len(records),
        partitions=len(names),
        unreadable_files=list(logged.unreadable),
        duplicate_records=logged.duplicates,
        period={
            "first": str(records["predicted_at"].min()),
            "last": str(records["predicted_at"].max()),
        },
        review_threshold=threshold,
        training_class_mix=dict(zip(champion.class_names, training_shares.tolist(), strict=True)),
        confidence_histogram=confidence_histogram(records["confidence"].to_numpy()),
        versions={
            version: _version_summary(group, champion, training_shares, threshold, accepted, params)
            for version, group in records.groupby("model_version")
        },
    )
    summary["overall"] = _version_summary(
        records, champion, training_shares, threshold, accepted, params
    )
    summary["overall"]["feedback"] = feedback_errors(accepted, champion.version)
    drift, unusual_figure = _input_drift(logged, champion, reference_set, params, rng)
    summary["input_drift"] = drift.pop("result")
    summary["unusual"] = drift["unusual"]
    summary["alerts"] = alerts(summary, params)
    for alert in summary["alerts"]:
        logger.warning("Monitoring alert (champion version %s): %s", champion.version, alert)
    run = _history_point(summary)
    summary["history"] = [*state.get("history", []), run][-_HISTORY_RUNS:]
    new_state = next_state(state, names, grace_ms, run, mlflow_run)
    return summary, metrics_of(summary), unusual_figure, new_state


def _warn_too_late(late: list[str], params: MonitoringParams) -> dict[str, Any]:
    """A warning naming a few ``too_late`` files and what to do; their count and those few."""
    if late:
        logger.warning(
            "Monitoring: %d prediction log files (%s) are older than late_write_grace_hours "
            "(%s h) allows and were written after the run that read their hour: they are not "
            "read. A service worker's clock is off by more than that, or it could not reach "
            "the store for longer: fix its clock (or the store), then, to read them, raise "
            "late_write_grace_hours or delete monitoring_state.json (the whole log is read "
            "again). Files of earlier hours are not listed, so there may be more",
            len(late),
            ", ".join(late[:5]) + (", ..." if len(late) > 5 else ""),
            params.late_write_grace_hours,
        )
    return {"count": len(late), "examples": late[:5]}


def _nothing(
    summary: dict[str, Any],
    state: dict[str, Any],
    status: str,
    message: str,
    level: int = logging.INFO,
) -> tuple[dict[str, Any], dict[str, Any], Figure, dict[str, Any]]:
    """A run with nothing to measure: zero predictions, no alert, ``state`` as the new state
    (the last one, unless files were read that held nothing)."""
    logger.log(level, message)
    summary.update(status=status, message=message, records=0, history=state.get("history", []))
    return summary, metrics_of(summary), message_figure(message), state


def _nothing_readable(
    summary: dict[str, Any], state: dict[str, Any], logged: LoggedPredictions, names: list[str]
) -> tuple[dict[str, Any], dict[str, Any], Figure, dict[str, Any]]:
    """New files, none with a readable record (unreadable, or empty): nothing to measure, and
    the state moves past them. Measuring nothing stopped the run (a histogram of no
    confidences), so the state never moved and every weekly run stopped on the same files,
    with training waiting for monitoring."""
    message = f"Monitoring: no readable record in the {len(names)} new prediction log files"
    level = logging.INFO
    if logged.unreadable:
        level = logging.WARNING
        message += (
            f"; {len(logged.unreadable)} cannot be read ({', '.join(logged.unreadable[:10])}"
            f"{', ...' if len(logged.unreadable) > 10 else ''}): they stay in the store and "
            "later runs do not read them again; look at them, and to read them once mended, "
            "delete monitoring_state.json (the whole log is read again)"
        )
    summary.update(partitions=len(names), unreadable_files=list(logged.unreadable))
    return _nothing(summary, state, "no_readable_records", message, level)


def _training_shares(
    reference_set: Mapping[str, Any] | None,
    reference_classes: list[str] | None,
    class_names: list[str],
) -> np.ndarray:
    """The share of each of the champion's classes in the train split, matched by name.

    The split's labels index the model input's classes, which are not the champion's when
    the data gained or lost a class since it was trained, or after a rollback: matched by
    position, one class's share went to another. A champion's class the data no longer has
    gets 0.
    """
    uniform = np.full(len(class_names), 1 / len(class_names))
    if reference_set is None or reference_classes is None or not len(reference_set["labels"]):
        return uniform
    counts = np.bincount(reference_set["labels"], minlength=len(reference_classes))
    shares = pd.Series(counts, index=reference_classes).reindex(class_names, fill_value=0)
    total = shares.sum()
    return shares.to_numpy(dtype=float) / total if total else uniform


def _version_summary(
    records: pd.DataFrame,
    champion: RegisteredClassifier,
    training_shares: np.ndarray,
    threshold: float,
    accepted: list[dict[str, Any]],
    params: MonitoringParams,
) -> dict[str, Any]:
    confidence = records["confidence"].to_numpy(dtype=float)
    summary = {
        "records": len(records),
        "low_confidence_share": low_confidence_share(confidence, threshold),
        "out_of_distribution_share": out_of_distribution_share(records["out_of_distribution"]),
        "estimated_accuracy": estimated_accuracy(confidence),
        "feedback": feedback_errors(accepted, str(records["model_version"].iloc[0])),
    }
    mix = prediction_drift(
        records["label"], champion.class_names, training_shares, params.prediction_drift_p_value
    )
    if len(records) < params.min_records:
        mix.update(detected=False, p_value=None)
    summary["prediction_drift"] = mix
    return summary


def _input_drift(
    logged: LoggedPredictions,
    champion: RegisteredClassifier,
    reference_set: Mapping[str, Any] | None,
    params: MonitoringParams,
    rng: np.random.Generator,
) -> tuple[dict[str, Any], Figure]:
    """Embed the sample of new images and one of the training images, test, find the unusual."""
    untested = {"tested": False, "score": None, "detected": False}
    images_with_pixels = logged.images_logged
    if reference_set is None or len(reference_set["labels"]) < 2:
        reason = "no model input to take reference images from: run data_processing"
    elif images_with_pixels < params.min_records:
        reason = (
            f"{images_with_pixels} new images with pixels, fewer than min_records "
            f"({params.min_records}): too few to test"
        )
    else:
        reason = None
    if reason is not None:
        if not images_with_pixels and len(logged.records):
            reason = (
                "the prediction log holds no pixels (the service runs with log_pixels false): "
                "input drift cannot be tested, only the out-of-distribution share"
            )
        level = logging.INFO if images_with_pixels else logging.WARNING
        logger.log(level, "Monitoring: input drift not tested: %s", reason)
        message = f"Input drift not tested: {reason}"
        result = {"result": {**untested, "reason": reason}, "unusual": []}
        return result, message_figure(message)
    reference_rows = sample_positions(len(reference_set["labels"]), params.reference_size, rng)
    reference_images = reference_set.gather(reference_rows)[:, 0]
    reference_labels = reference_set["labels"][reference_rows]
    current_images = logged.pixels
    extractor = feature_extractor(champion.model)
    reference_embedding = embed(extractor, reference_images[:, None])
    current_embedding = embed(extractor, current_images[:, None])
    components = min(params.embedding_components, *reference_embedding.shape)
    pca = PCA(n_components=components, random_state=params.seed).fit(reference_embedding)
    reference_features = pd.concat(
        [embedding_frame(pca.transform(reference_embedding)), intensity_features(reference_images)],
        axis=1,
    )
    current_features = pd.concat(
        [embedding_frame(pca.transform(current_embedding)), intensity_features(current_images)],
        axis=1,
    )
    result = input_drift(reference_features, current_features, params)
    ratios = OodReference.fit(reference_embedding, reference_labels).ratios(current_embedding)
    top = np.argsort(-ratios)[: params.unusual_images]
    rows = logged.records.iloc[logged.pixel_rows[top]]
    unusual = [
        {
            "prediction_id": row.prediction_id,
            "predicted_at": str(row.predicted_at),
            "model_version": row.model_version,
            "label": row.label,
            "confidence": float(row.confidence),
            "distance_ratio": float(ratio),
        }
        for row, ratio in zip(rows.itertuples(), ratios[top], strict=True)
    ]
    figure = report.unusual_images_figure(current_images[top], unusual)
    return {"result": result, "unusual": unusual}, figure


def alerts(summary: dict[str, Any], params: MonitoringParams) -> list[str]:
    """What crossed a threshold, in words: the warning lines and the run's alert tag."""
    found = []
    drift = summary.get("input_drift", {})
    if drift.get("detected"):
        drifted = [name for name, feature in drift["features"].items() if feature["drifted"]]
        found.append(
            f"input drift: {len(drifted)} of {len(drift['features'])} image features drifted "
            f"({', '.join(drifted)}; Kolmogorov-Smirnov p < {drift['p_value']}, statistic >= "
            f"{drift['min_ks_statistic']})"
        )
    for version, figures in summary.get("versions", {}).items():
        mix = figures["prediction_drift"]
        if mix["detected"]:
            found.append(
                f"prediction drift: version {version}'s predicted class mix "
                f"{mix['class_counts']} differs from the training mix (chi-square p = "
                f"{mix['p_value']:.2g} < {params.prediction_drift_p_value})"
            )
    overall = summary.get("overall", {})
    share = overall.get("low_confidence_share")
    enough = overall.get("records", 0) >= params.min_records  # a share of 2 answers says little
    if enough and share is not None and share > params.max_low_confidence_share:
        found.append(
            f"low confidence: {share:.1%} of answers under the review threshold "
            f"{summary['review_threshold']:.3f} (max_low_confidence_share "
            f"{params.max_low_confidence_share:.0%})"
        )
    unusual = overall.get("out_of_distribution_share")
    if enough and unusual is not None and unusual > params.max_out_of_distribution_share:
        found.append(
            f"out of distribution: {unusual:.1%} of answers were for images unlike the "
            f"training images (max_out_of_distribution_share "
            f"{params.max_out_of_distribution_share:.0%}); the grid of unusual images shows some"
        )
    feedback = overall.get("feedback", {})
    rate = feedback.get("error_rate")
    if rate is not None and rate > params.max_feedback_error_rate:
        found.append(
            f"feedback: reviewers corrected {feedback['errors']} of "
            f"{feedback['accepted_corrections']} answers of version "
            f"{summary['champion_version']} ({rate:.1%} > {params.max_feedback_error_rate:.0%})"
        )
    return found


def metrics_of(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The run's MLflow metrics; a figure that could not be measured is left out, not NaN."""
    overall = summary.get("overall", {})
    drift = summary.get("input_drift", {})
    values = {
        "monitoring.predictions": summary.get("records", 0),
        "monitoring.input_drift_score": drift.get("score"),
        # untested (no pixels logged, too few): left out, not 0, "no drift" being untrue
        "monitoring.input_drift_detected": int(bool(drift["detected"]))
        if drift.get("tested")
        else None,
        "monitoring.prediction_drift_detected": int(
            any(v["prediction_drift"]["detected"] for v in summary.get("versions", {}).values())
        ),
        "monitoring.low_confidence_share": overall.get("low_confidence_share"),
        "monitoring.out_of_distribution_share": overall.get("out_of_distribution_share"),
        "monitoring.estimated_accuracy": overall.get("estimated_accuracy"),
        "monitoring.feedback_error_rate": overall.get("feedback", {}).get("error_rate"),
        "monitoring.alerts": len(summary.get("alerts", [])),
    }
    return {
        name: {"value": float(value), "step": 0}
        for name, value in values.items()
        if value is not None and not np.isnan(value)
    }


def _history_point(summary: dict[str, Any]) -> dict[str, Any]:
    overall = summary["overall"]
    return {
        "run_at": summary["run_at"],
        "last_record_at": summary["period"]["last"],
        "champion_version": summary["champion_version"],
        "records": summary["records"],
        "input_drift_score": summary["input_drift"].get("score"),
        "estimated_accuracy": overall["estimated_accuracy"],
        "low_confidence_share": overall["low_confidence_share"],
    }


def report_monitoring(
    summary: dict[str, Any],
) -> tuple[str, Figure, Figure, Figure, dict[str, str]]:
    """The report a person reads, and the run's tag ``monitoring.alert`` when anything alerted.

    Returns:
        The HTML page (figures inline, so it reads on its own), the drift-over-time, class
        mix and confidence plots, and ``{"monitoring.alert": "<what crossed a threshold>"}``
        (``{}`` when nothing did).
    """
    figures = {
        "drift_history": report.history_figure(summary.get("history", [])),
        "class_mix": report.class_mix_figure(summary),
        "confidence": report.confidence_figure(summary),
    }
    page = report.html_page(summary, figures)
    tags = {"monitoring.alert": "; ".join(summary["alerts"])} if summary.get("alerts") else {}
    return page, figures["drift_history"], figures["class_mix"], figures["confidence"], tags
