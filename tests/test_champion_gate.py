"""The champion gate's decision, on its own."""

import pytest

from medical_ct.pipelines.evaluation.nodes import decide_promotion

GATE = {"min_accuracy": 0.9, "min_improvement": 0.01}


@pytest.mark.parametrize(
    ("candidate", "champion", "promoted", "reason"),
    [
        (0.95, None, True, "no champion yet"),
        (0.85, None, False, "below min_accuracy"),
        (0.97, 0.95, True, ">= the champion's"),
        (0.96, 0.95, True, ">= the champion's"),
        (0.955, 0.95, False, "below the champion's"),
        (0.85, 0.80, False, "below min_accuracy"),
    ],
)
def test_gate(candidate, champion, promoted, reason):
    decision, why = decide_promotion(candidate, champion, GATE)
    assert decision is promoted
    assert reason in why


@pytest.mark.parametrize(
    "gate",
    [
        {},
        {"min_accuracy": 1.5, "min_improvement": 0},
        {"min_accuracy": "high", "min_improvement": 0},
    ],
)
def test_bad_gate_parameters_are_refused(gate):
    with pytest.raises(ValueError, match="champion_gate"):
        decide_promotion(0.9, None, gate)
