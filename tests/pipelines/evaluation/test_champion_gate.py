"""The champion gate's decision, on its own, and the paired comparison of two models."""

import numpy as np
import pytest

from medical_ct.pipelines.evaluation.nodes import decide_promotion, paired_comparison

GATE = {"min_accuracy": 0.9, "min_improvement": 0.01}


@pytest.mark.parametrize(
    ("candidate", "champion", "promoted", "reason"),
    [
        (0.95, None, True, "no champion yet"),
        (0.85, None, False, "below min_accuracy"),
        (0.97, 0.95, True, "> the champion's"),
        (0.96, 0.95, False, "ties the champion's 0.9500 + min_improvement 0.0100"),
        (0.955, 0.95, False, "below the champion's"),
        (0.85, 0.80, False, "below min_accuracy"),
    ],
)
def test_gate(candidate, champion, promoted, reason):
    decision, why = decide_promotion(candidate, champion, GATE)
    assert decision is promoted
    assert reason in why


@pytest.mark.parametrize("champion", [0.97, 0.97 - 1e-12, 0.97 + 1e-12])
def test_a_tie_keeps_the_champion_only_a_better_model_replaces_it(champion):
    gate = {"min_accuracy": 0.9, "min_improvement": 0.0}
    decision, why = decide_promotion(0.97, champion, gate)
    assert decision is False
    assert "only a better model replaces the champion" in why
    assert decide_promotion(0.97 + 1 / 3000, 0.97, gate)[0] is True  # one more right of 3000


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


RECALLS = {"AbdomenCT": 1.0, "BreastMRI": 0.99, "CXR": 1.0, "ChestCT": 0.97, "Hand": 0.4}


def test_a_weak_class_is_refused_even_when_overall_accuracy_passes():
    gate = {**GATE, "min_class_recall": 0.9}
    decision, why = decide_promotion(0.97, 0.95, gate, candidate_recalls=RECALLS)

    assert decision is False
    assert "class Hand has test recall 0.4000, below min_class_recall 0.9000" in why
    # The same model passes a gate that does not look at classes.
    assert decide_promotion(0.97, 0.95, GATE, candidate_recalls=RECALLS)[0] is True


def test_an_uncalibrated_model_is_refused_by_max_ece():
    gate = {**GATE, "max_ece": 0.02}
    decision, why = decide_promotion(0.97, None, gate, candidate_ece=0.08)
    assert decision is False
    assert "test ECE 0.0800 is above max_ece 0.0200" in why
    assert decide_promotion(0.97, None, gate, candidate_ece=0.01)[0] is True


def test_a_refusal_names_every_figure_beyond_a_limit_weakest_class_first():
    """The reason said only the first limit failed: fixing it left the next refusal a
    surprise. A rollback's check of recorded figures uses the same comparison."""
    gate = {**GATE, "min_class_recall": 0.98, "max_ece": 0.02}
    decision, why = decide_promotion(0.85, None, gate, candidate_recalls=RECALLS, candidate_ece=0.3)

    assert decision is False
    assert why == (
        "test accuracy 0.8500 is below min_accuracy 0.9000; "
        "class Hand has test recall 0.4000, below min_class_recall 0.9800; "
        "class ChestCT has test recall 0.9700, below min_class_recall 0.9800; "
        "test ECE 0.3000 is above max_ece 0.0200"
    )


@pytest.mark.parametrize(
    "gate",
    [
        {**GATE, "min_class_recall": 1.2},
        {**GATE, "max_ece": -0.1},
        {**GATE, "max_ece": "low"},
        {**GATE, "min_accuracy": True},  # float(True) was 1.0: nothing would ever pass
        {**GATE, "min_improvement": "0.01"},
    ],
)
def test_bad_class_recall_and_ece_limits_are_refused(gate):
    with pytest.raises(ValueError, match="champion_gate"):
        decide_promotion(0.9, None, gate)


def test_paired_comparison_counts_errors_only_one_model_makes():
    champion = [1, 1, 0, 0, 1, 1, 1, 0]
    challenger = np.array([1, 0, 1, 1, 1, 1, 1, 0], dtype=bool)
    paired = paired_comparison(champion, challenger)

    assert paired["errors_only_champion"] == 2  # images 2 and 3
    assert paired["errors_only_challenger"] == 1  # image 1
    assert paired["errors_both"] == 1  # image 7
    assert paired["mcnemar_p_value"] == pytest.approx(1.0)  # 2 against 1 proves nothing
    lopsided = paired_comparison([0] * 20 + [1] * 5, np.ones(25, dtype=bool))
    assert lopsided["errors_only_champion"] == 20
    assert lopsided["mcnemar_p_value"] < 1e-5
    assert paired_comparison([1, 1], np.ones(2, dtype=bool))["mcnemar_p_value"] == 1.0
