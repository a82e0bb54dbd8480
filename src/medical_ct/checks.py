"""What the parameter checks share (each group is checked once, into a typed object)."""

from dataclasses import dataclass
from typing import Any


def is_number(value: Any) -> bool:
    """An int or float, not a bool: ``float(True)`` is 1.0, and YAML's ``true`` is no number."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class ChampionGate:
    """Parameters ``champion_gate``, checked (``validate_gate``) before the first node."""

    min_accuracy: float
    min_improvement: float
    min_class_recall: float = 0.0  # every class's test recall must reach it
    max_ece: float = 1.0  # the calibrated test ECE must not exceed it


def validate_gate(champion_gate: dict[str, float]) -> ChampionGate:
    """The gate's parameters, typed; raise ``ValueError`` saying what to set if unusable.

    ``min_class_recall`` and ``max_ece`` are optional (0 and 1: no limit). Only numbers are
    taken: ``float()`` made ``min_accuracy: true`` 1.0, a gate nothing ever passes, in silence.
    """
    try:
        values = {
            key: champion_gate[key] if default is None else champion_gate.get(key, default)
            for key, default in (
                ("min_accuracy", None),
                ("min_improvement", None),
                ("min_class_recall", 0.0),
                ("max_ece", 1.0),
            )
        }
        if not all(is_number(value) for value in values.values()):
            raise TypeError("not a number")
        gate = ChampionGate(**{key: float(value) for key, value in values.items()})
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(
            "parameters champion_gate need numbers min_accuracy and min_improvement (and "
            f"optionally min_class_recall, max_ece), got {champion_gate!r}"
        ) from error
    if not 0 <= gate.min_accuracy <= 1 or not -1 <= gate.min_improvement <= 1:
        raise ValueError(
            "champion_gate.min_accuracy must be in [0, 1] and min_improvement in [-1, 1], "
            f"got {gate.min_accuracy} and {gate.min_improvement}"
        )
    if not 0 <= gate.min_class_recall <= 1 or not 0 <= gate.max_ece <= 1:
        raise ValueError(
            "champion_gate.min_class_recall and max_ece must be in [0, 1], "
            f"got {gate.min_class_recall} and {gate.max_ece}"
        )
    return gate


# Accuracies and recalls are ratios of counts: within this of a limit they are at it (0.95 +
# 0.01 and 0.96 compare equal), whichever way the float rounds.
RATIO_TOLERANCE = 1e-9


@dataclass(frozen=True)
class GateFailure:
    """One figure of a model beyond one of the champion gate's limits."""

    limit: str  # the parameter it fails: min_accuracy, min_class_recall or max_ece
    bound: float  # the parameter's value
    value: float  # the model's figure
    class_name: str | None = None  # whose recall, for min_class_recall

    @property
    def figure(self) -> str:
        if self.class_name is not None:
            return f"test recall of class {self.class_name}"
        return "test ECE" if self.limit == "max_ece" else "test accuracy"

    @property
    def side(self) -> str:
        return "above" if self.limit == "max_ece" else "below"

    def __str__(self) -> str:
        """As the promotion gate says it: ``class Hand has test recall 0.4000, below ...``."""
        if self.class_name is not None:
            return (
                f"class {self.class_name} has test recall {self.value:.4f}, below "
                f"{self.limit} {self.bound:.4f}"
            )
        return f"{self.figure} {self.value:.4f} is {self.side} {self.limit} {self.bound:.4f}"


def gate_failures(
    gate: ChampionGate,
    accuracy: float | None,
    recalls: dict[str, float | None],
    ece: float | None,
) -> list[GateFailure]:
    """The model's figures that fail the gate's own limits (not the champion comparison).

    One comparison for the promotion gate, which judges a new model's figures, and the
    rollback, which judges a target's recorded ones against today's gate: written twice,
    the two would drift apart and a rollback would serve what the gate refuses. A figure
    that is ``None`` is not known (a class with no test image, a tag never recorded) and
    is not checked. Weak classes come worst first.
    """
    failures = []
    if accuracy is not None and accuracy + RATIO_TOLERANCE < gate.min_accuracy:
        failures.append(GateFailure("min_accuracy", gate.min_accuracy, accuracy))
    weak = sorted(
        (recall, name)
        for name, recall in recalls.items()
        if recall is not None and recall + RATIO_TOLERANCE < gate.min_class_recall
    )
    failures += [
        GateFailure("min_class_recall", gate.min_class_recall, recall, name)
        for recall, name in weak
    ]
    if ece is not None and ece > gate.max_ece + 1e-12:
        failures.append(GateFailure("max_ece", gate.max_ece, ece))
    return failures
