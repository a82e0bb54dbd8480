"""Prometheus metrics of the service, shown by BentoML's /metrics with its own.

``monitoring/`` holds the scrape config, alert rules and the dashboard that read them.
"""

from collections.abc import Iterable

import bentoml

predictions_total = bentoml.metrics.Counter(
    name="medical_ct_predictions_total",
    documentation="Predictions answered, by predicted class",
    labelnames=["label"],
)
feedback_total = bentoml.metrics.Counter(
    name="medical_ct_feedback_total",
    documentation="Feedback stored, by corrected label",
    labelnames=["label"],
)
serving_model_version = bentoml.metrics.Gauge(
    name="medical_ct_serving_model_version",
    documentation="Registered version of the model each worker serves (label pid)",
    # One series per worker: each follows the champion alias on its own.
    multiprocess_mode="liveall",
)
prediction_confidence = bentoml.metrics.Histogram(
    name="medical_ct_prediction_confidence",
    documentation="Top-class probability of each answer of /predict",
    buckets=(0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0),
)
batch_size = bentoml.metrics.Histogram(
    name="medical_ct_batch_size",
    documentation="Images per forward pass of the adaptive batcher",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
prediction_log_records = bentoml.metrics.Counter(
    name="medical_ct_prediction_log_records",
    documentation="Prediction log records: written to the store, or dropped while it was down",
    labelnames=["outcome"],
)
prediction_log_backlog = bentoml.metrics.Gauge(
    name="medical_ct_prediction_log_backlog_records",
    documentation="Prediction log records a refused write left in this worker's memory for the "
    "next try (0 once a write succeeds): lost if the worker stops, dropped past 200,000",
    multiprocess_mode="livesum",  # each worker holds its own
)
invalid_model_outputs = bentoml.metrics.Counter(
    name="medical_ct_invalid_model_outputs_total",
    documentation="Images the served model gave NaN or infinite probabilities for (answered 500)",
)
needs_review_total = bentoml.metrics.Counter(
    name="medical_ct_needs_review_total",
    documentation="Answers of /predict that need a review: under the served model's review "
    "threshold, or out of distribution",
)
out_of_distribution_total = bentoml.metrics.Counter(
    name="medical_ct_out_of_distribution_total",
    documentation="Answers of /predict for images unlike the training images",
)
feedback_reviews_total = bentoml.metrics.Counter(
    name="medical_ct_feedback_reviews_total",
    documentation="Review decisions on feedback: accept, reject, auto_accept",
    labelnames=["decision"],
)
review_journal_refused = bentoml.metrics.Counter(
    name="medical_ct_review_journal_refused_total",
    documentation="Journal entries a store refused after their record was stored (the record "
    "stands; the service's log has the entry): review_audit, feedback_submissions",
    labelnames=["journal"],
)
feedback_pending = bentoml.metrics.Gauge(
    name="medical_ct_feedback_pending",
    documentation="Feedback items waiting for a review, as the store said at the last look",
    # Every worker reads the same store: the latest count, from whichever worker, stands (a
    # request's count is that worker's view until its next look).
    multiprocess_mode="livemostrecent",
)
feedback_oldest_pending = bentoml.metrics.Gauge(
    name="medical_ct_feedback_oldest_pending_timestamp_seconds",
    documentation="When the oldest feedback item still waiting for a review was sent (Unix "
    "time; 0 when none waits), as the store said at the last look",
    multiprocess_mode="livemostrecent",  # a time, not an age: PromQL takes time() - it
)
feedback_unreadable_records = bentoml.metrics.Gauge(
    name="medical_ct_feedback_unreadable_records",
    documentation="Feedback records the service cannot read and leaves out, by store (see the log)",
    labelnames=["store"],
    multiprocess_mode="livemostrecent",  # every worker reads the same stores
)


def start_at_zero(counter, **label_values: Iterable[str]) -> None:
    """Create ``counter``'s series for every known value of its label, at 0, in this worker.

    A labelled counter has no series until a value is first counted, and the series Prometheus
    then scrapes already holds that count: ``increase()`` and ``rate()`` see no rise, so an
    alert on the first events (``MedicalCTPredictionLogRecordsDropped``,
    ``MedicalCTReviewAuditEntryRefused``) never fired and a panel missed them. Called where the
    service starts what counts them (``.labels()`` without ``inc`` creates the series at 0).
    """
    ((name, values),) = label_values.items()
    for value in values:
        counter.labels(**{name: value})
