"""Prometheus metrics of the service, shown by BentoML's /metrics with its own."""

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
    documentation="Registered version of the model being served (0: none yet)",
    multiprocess_mode="mostrecent",
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
