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
