"""Calibrated probabilities and the confidence under which an answer needs a human review.

A network trained to low cross-entropy is overconfident: "HeadCT 99%" for an image it has
never seen the like of. One temperature, fitted on the validation split after training,
divides the logits so that the confidences match the observed accuracy (temperature
scaling, Guo et al. 2017); it changes no prediction, only how sure the model says it is.
The review threshold is then chosen on the same split from those calibrated confidences.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medical_ct.checks import is_number

# Temperatures searched: a log-spaced grid from 1/2 to 20. The validation NLL is convex in the
# inverse temperature, so a fine grid finds its minimum without an optimiser's edge cases.
# The lower bound matters: on a validation split with no error (the 240-image sample, or a
# very accurate model) the NLL keeps falling as T -> 0, which would make every answer "100%
# sure" and leave nothing for the review threshold to separate. A split that few errors
# cannot justify sharpening the logits more than twofold.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.5, 20.0
_TEMPERATURES = np.exp(np.linspace(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE), 501))
# Logits scaled by every temperature at once take 501 x classes float64 per image (24 KB at 6
# classes, twice over with the log-softmax): 1 GB at 20,000 validation images. Fitting sums
# the NLL over chunks of images of at most this many scaled logits (16 MiB) instead.
_CHUNK_ELEMENTS = 2**21


@dataclass(frozen=True)
class CalibrationParams:
    """Parameters ``calibration``, checked once before the first node (see hooks.py).

    Attributes:
        review_target_error_rate: The highest error rate allowed among the answers that do
            not need a review, on the validation split (e.g. 0.001: one error in 1,000).
        ece_bins: Equal-width confidence bins of the expected calibration error and the
            reliability diagram.
    """

    review_target_error_rate: float
    ece_bins: int = 15

    @classmethod
    def from_params(cls, calibration: Any) -> "CalibrationParams":
        """Check ``calibration`` parameters; raise ``ValueError`` saying what to set."""
        if not isinstance(calibration, dict):
            raise ValueError(
                "parameters calibration must be a mapping with review_target_error_rate "
                f"and ece_bins, got {calibration!r}"
            )
        problems = []
        target = calibration.get("review_target_error_rate")
        if not is_number(target) or not 0 < target < 1:
            problems.append(
                "review_target_error_rate must be a number strictly between 0 and 1 "
                f"(e.g. 0.001 for one error in 1,000 answers), got {target!r}"
            )
        bins = calibration.get("ece_bins", 15)
        if not isinstance(bins, int) or isinstance(bins, bool) or not 2 <= bins <= 100:
            problems.append(f"ece_bins must be an integer from 2 to 100, got {bins!r}")
        if problems:
            raise ValueError("invalid parameters calibration: " + "; ".join(problems))
        return cls(review_target_error_rate=float(target), ece_bins=bins)


class CalibratedClassifier(nn.Module):
    """A classifier whose output is calibrated log-probabilities: ``log_softmax(logits / T)``.

    The temperature is a buffer, so it is part of the exported (torch.export) graph that the
    registry stores and every consumer loads. ``output.exp()`` are probabilities that sum to
    1; a softmax of the output gives the same probabilities (softmax of log-probabilities is
    the identity), so code that applies a softmax to a model's output, such as
    ``predict_probabilities``, works with calibrated and uncalibrated models alike.
    """

    def __init__(self, classifier: nn.Module, temperature: float) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"a temperature must be positive, got {temperature}")
        self.classifier = classifier
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.classifier(images) / self.temperature, dim=1)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels``.

    Args:
        logits: ``(n, classes)`` uncalibrated logits of the validation split.
        labels: ``(n,)`` true class indices.
    """
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on an empty validation split")
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    temperatures = torch.as_tensor(_TEMPERATURES)[:, None, None]
    chunk = max(1, _CHUNK_ELEMENTS // (len(_TEMPERATURES) * logits_t.shape[1]))
    nll = torch.zeros(len(_TEMPERATURES), dtype=torch.float64)
    for start in range(0, len(labels_t), chunk):
        scaled = logits_t[None, start : start + chunk] / temperatures
        log_probabilities = torch.log_softmax(scaled, dim=2)
        rows = torch.arange(len(scaled[0]))
        nll -= log_probabilities[:, rows, labels_t[start : start + chunk]].sum(dim=1)
    return float(_TEMPERATURES[int(torch.argmin(nll))])


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """ECE: the mean |accuracy - confidence| over equal-width confidence bins, by image count."""
    confidence, correct = _confidence_and_correct(probabilities, labels)
    table = reliability_table(confidence, correct, bins)
    total = max(len(labels), 1)
    return float(
        sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table) / total
    )


def reliability_table(confidence: np.ndarray, correct: np.ndarray, bins: int) -> list[dict]:
    """Per non-empty confidence bin: its range, image count, mean confidence and accuracy."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for bin_ in range(bins):
        members = index == bin_
        if members.any():
            rows.append(
                {
                    "low": float(edges[bin_]),
                    "high": float(edges[bin_ + 1]),
                    "count": int(members.sum()),
                    "confidence": float(confidence[members].mean()),
                    "accuracy": float(correct[members].mean()),
                }
            )
    return rows


def choose_review_threshold(probabilities: np.ndarray, labels: np.ndarray, target: float) -> float:
    """The lowest confidence threshold whose answered images have an error rate <= ``target``.

    An image is answered when its confidence is at least the threshold; below it, it needs a
    review. Images with equal confidence are answered or reviewed together. When even the
    most confident images miss the target, the threshold is above every confidence seen
    (1.0 or just above the highest): every answer then asks for a review.
    """
    confidence, correct = _confidence_and_correct(probabilities, labels)
    if len(confidence) == 0:
        raise ValueError("cannot choose a review threshold on an empty validation split")
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence = confidence[order]
    errors = np.cumsum(~correct[order])
    answered = np.arange(1, len(order) + 1)
    # Only cut between distinct confidences: the last index of each run of equal values.
    last_of_run = np.append(sorted_confidence[1:] != sorted_confidence[:-1], True)
    acceptable = last_of_run & (errors <= target * answered)
    if not acceptable.any():
        return float(max(1.0, np.nextafter(sorted_confidence[0], np.inf)))
    return float(sorted_confidence[np.flatnonzero(acceptable)[-1]])


def _confidence_and_correct(
    probabilities: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities)
    return probabilities.max(1), probabilities.argmax(1) == np.asarray(labels)
