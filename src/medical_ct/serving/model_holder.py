"""The served model: loaded from the registry alias, and swapped atomically when it moves."""

import functools
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from medical_ct import lifecycle, registry
from medical_ct.model import output_and_features, predict_probabilities
from medical_ct.serving import metrics
from medical_ct.serving.ood import OodCheck

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


# An image whose pixels vary less than this (grey levels, standard deviation) is one flat
# grey: nothing to classify. In features it sits near the class means (a constant grey was
# ChestCT at 0.999996, 0.3 of the distance limit), so it is told by its pixels.
BLANK_MAX_STD = 1.0


@dataclass(frozen=True)
class ServedModel:
    """A registered classifier and what ``GET /model`` tells about it."""

    classifier: registry.RegisteredClassifier
    test_metrics: dict[str, float | None] = field(default_factory=dict)
    ood: OodCheck | None = None  # None: no reference (too few raw images), nothing flagged

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
        """Label, confidence, per-class probabilities and review flags of ``(n, H, W)`` images.

        The probabilities are the registered model's own, calibrated inside it; an answer
        less confident than the version's review threshold needs a review, and so does an
        image unlike the training images (``out_of_distribution``: far from them in the
        model's features, or one flat grey), which a model answers as confidently as any. A
        version registered before calibration has no threshold; without a reference the
        distance is ``None``. An image whose probabilities are not finite gets an
        ``InvalidModelOutputError`` in its place (counted on /metrics, alert
        ``MedicalCTModelOutputInvalid``).
        """
        probabilities, ratios = self._probabilities_and_ratios(images)
        blank = images.reshape(len(images), -1).std(axis=1) < BLANK_MAX_STD
        threshold = self.review_threshold
        results: list[dict[str, Any] | InvalidModelOutputError] = []
        for row, ratio, flat in zip(probabilities, ratios, blank, strict=True):
            if not np.isfinite(row).all():
                metrics.invalid_model_outputs.inc()
                logger.error("Model version %s gave non-finite probabilities %s", self.version, row)
                results.append(InvalidModelOutputError(self.version))
                continue
            best = int(row.argmax())
            confidence = float(row[best])
            far = ratio is not None and not ratio <= self.ood.max_ratio  # NaN too
            unusual = bool(flat or far)
            results.append(
                {
                    "label": self.class_names[best],
                    "confidence": confidence,
                    "needs_review": unusual or (threshold is not None and confidence < threshold),
                    "out_of_distribution": unusual,
                    "out_of_distribution_ratio": ratio,
                    "probabilities": {
                        name: float(p) for name, p in zip(self.class_names, row, strict=True)
                    },
                    "model_version": self.version,
                }
            )
        return results

    def _probabilities_and_ratios(self, images: np.ndarray) -> tuple[np.ndarray, list]:
        """Both from one forward pass when there is a reference (``output_and_features``)."""
        if self.ood is None:
            return predict_probabilities(self.classifier.model, images[:, None]), [None] * len(
                images
            )
        with torch.inference_mode():
            output, features = self._output_and_features(torch.as_tensor(images[:, None]))
        ratios = self.ood.reference.ratios(features.numpy())
        probabilities = torch.softmax(output, dim=1).numpy()
        return probabilities, [float(ratio) for ratio in ratios]

    @functools.cached_property
    def _output_and_features(self) -> Callable:
        return output_and_features(self.classifier.model, len(self.class_names))

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

    def __init__(
        self,
        alias: str = registry.CHAMPION_ALIAS,
        ood_check: Callable[[Any], OodCheck | None] | None = None,
    ) -> None:
        """``ood_check``: builds a version's out-of-distribution reference from its model
        when it is loaded (``ood.check_builder``); None flags nothing."""
        self.alias = alias
        self._ood_check = ood_check
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
        if self._ood_check is not None and served.ood is None:
            served = replace(served, ood=self._ood_check(served.classifier.model))
        self._current = served
        metrics.serving_model_version.set(int(served.version))
        for counter in (metrics.predictions_total, metrics.feedback_total):  # see start_at_zero
            metrics.start_at_zero(counter, label=served.class_names)

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
