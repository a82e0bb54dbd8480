"""The served model: loaded from the registry alias, and swapped atomically when it moves."""

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient

from medical_ct import lifecycle, registry
from medical_ct.model import predict_probabilities
from medical_ct.serving import metrics

logger = logging.getLogger(__name__)


class InvalidModelOutputError(RuntimeError):
    """The served version gave NaN or infinite probabilities for an image: no answer at all.

    Such a row's argmax is class 0 and its confidence NaN, which is under no review
    threshold: it was answered as a confident first class, not flagged, and made ``GET
    /review`` answer 500 (JSON has no NaN). Only that image's request fails.
    """

    def __init__(self, version: str) -> None:
        super().__init__(
            f"model version {version} gave NaN or infinite probabilities for this image, so it "
            "was not classified: the version is broken; roll back with `kedro run --pipelines "
            "rollback --params rollback.reason=...` (README: Rollback)"
        )


@dataclass(frozen=True)
class ServedModel:
    """A registered classifier and what ``GET /model`` tells about it."""

    classifier: registry.RegisteredClassifier
    test_metrics: dict[str, float | None] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.classifier.version

    @property
    def class_names(self) -> list[str]:
        return self.classifier.class_names

    @property
    def review_threshold(self) -> float | None:
        return self.classifier.review_threshold

    def classify(self, images: np.ndarray) -> list[dict[str, Any] | InvalidModelOutputError]:
        """Label, confidence, per-class probabilities and review flag of ``(n, H, W)`` images.

        The probabilities are the registered model's own, calibrated inside it; an answer
        less confident than the version's review threshold needs a review. A version
        registered before calibration has no threshold: its answers never do. An image whose
        probabilities are not finite gets an ``InvalidModelOutputError`` in its place
        (counted on /metrics, alert ``MedicalCTModelOutputInvalid``).
        """
        probabilities = predict_probabilities(self.classifier.model, images[:, None])
        threshold = self.review_threshold
        results: list[dict[str, Any] | InvalidModelOutputError] = []
        for row in probabilities:
            if not np.isfinite(row).all():
                metrics.invalid_model_outputs.inc()
                logger.error("Model version %s gave non-finite probabilities %s", self.version, row)
                results.append(InvalidModelOutputError(self.version))
                continue
            best = int(row.argmax())
            confidence = float(row[best])
            results.append(
                {
                    "label": self.class_names[best],
                    "confidence": confidence,
                    "needs_review": threshold is not None and confidence < threshold,
                    "probabilities": {
                        name: float(p) for name, p in zip(self.class_names, row, strict=True)
                    },
                    "model_version": self.version,
                }
            )
        return results

    def describe(self) -> dict[str, Any]:
        """``GET /model``; ``lineage`` comes from the version's tags, read when it was loaded.

        Promotions and rollbacks tag a version before moving the alias to it, so the tags a
        worker loads with a version already say how it became champion.
        """
        return {
            "model_name": registry.MODEL_NAME,
            "version": self.version,
            "classes": self.class_names,
            "review_threshold": self.review_threshold,
            "test_metrics": self.test_metrics,
            "tags": self.classifier.tags,
            "lineage": lifecycle.lineage(self.classifier.tags),
        }


def load_served_model(alias: str = registry.CHAMPION_ALIAS) -> ServedModel | None:
    """The version ``alias`` points to, with its run's test metrics; ``None`` when unset."""
    classifier = registry.load_alias(alias)
    if classifier is None:
        return None
    client = MlflowClient()
    run_id = client.get_model_version(registry.MODEL_NAME, classifier.version).run_id
    metrics = client.get_run(run_id).data.metrics if run_id else {}
    test_metrics = {  # JSON has no NaN: a metric MLflow holds as NaN is shown as null
        name: value if math.isfinite(value) else None
        for name, value in metrics.items()
        if name.startswith("test_")
    }
    return ServedModel(classifier=classifier, test_metrics=test_metrics)


class ModelHolder:
    """Holds the served model; a background thread follows the registry alias.

    Requests read ``current`` once and use that object to the end: a swap replaces the
    reference in one assignment, so a request never sees half of two versions.
    """

    def __init__(self, alias: str = registry.CHAMPION_ALIAS) -> None:
        self.alias = alias
        self._current: ServedModel | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> ServedModel | None:
        return self._current

    def classify(self, images: np.ndarray) -> list[dict[str, Any] | InvalidModelOutputError]:
        """Preprocessed ``(n, 64, 64)`` uint8 images -> one prediction each, by one version."""
        served = self._current
        if served is None:
            raise RuntimeError("no model is loaded yet")
        metrics.batch_size.observe(len(images))
        return served.classify(images)

    def set(self, served: ServedModel) -> None:
        self._current = served
        metrics.serving_model_version.set(int(served.version))

    def refresh(self) -> bool:
        """Load the alias's version if it is not the one served; return whether it swapped."""
        try:
            version = registry.alias_version(self.alias)
            current = self._current
            if version is None or (current is not None and current.version == version):
                return False
            served = load_served_model(self.alias)
        except Exception as error:  # the registry may be down: keep serving what we have
            logger.warning("Checking %s@%s failed: %s", registry.MODEL_NAME, self.alias, error)
            return False
        if served is None:
            return False
        self.set(served)
        logger.info("Serving %s version %s", registry.MODEL_NAME, served.version)
        return True

    def start_polling(self, interval_s: float) -> None:
        """Check the alias every ``interval_s`` seconds in a daemon thread."""

        def poll() -> None:
            while not self._stop.wait(interval_s):
                self.refresh()

        self._thread = threading.Thread(target=poll, name="champion-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
