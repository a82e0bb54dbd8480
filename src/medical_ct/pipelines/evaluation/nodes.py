"""Nodes of the evaluation pipeline: test metrics, plots, registration and the champion gate."""

import logging
from dataclasses import asdict
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow.compute as pc
from matplotlib.figure import Figure
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from torch import nn

from medical_ct import lifecycle, registry
from medical_ct.calibration import (
    CalibratedClassifier,
    expected_calibration_error,
    reliability_table,
)
from medical_ct.checks import RATIO_TOLERANCE, gate_failures, validate_gate
from medical_ct.manifest import arrow_strings, train_image_counts
from medical_ct.model import TrainingSkipped, model_digest, predict_probabilities
from medical_ct.plots import message_figure

logger = logging.getLogger(__name__)

_MAX_MISCLASSIFIED_SHOWN = 36


def evaluate_model(
    trained_model: nn.Module | TrainingSkipped,
    test_set: dict,
    class_names: list[str],
    calibration: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], Figure, Figure, Figure]:
    """Score the trained model on the test split.

    Args:
        trained_model: The calibrated model from ``train_model``.
        test_set: ``images`` and ``labels``.
        class_names: Class names, index = label.
        calibration: From ``train_model``: ``temperature``, ``review_threshold`` and the
            ``ece_bins`` the validation ECE was computed with (the test ECE uses the same).

    Returns:
        The evaluation (accuracy, macro F1 over the classes the test split has, per-class
        precision/recall (recall ``None`` for a class with no test image), ECE before and after
        calibration, the share of images to review and the error rate of the others), the
        same numbers as MLflow metrics, a confusion-matrix figure, a grid of misclassified
        test images and a reliability diagram. When training was skipped:
        ``{"skipped": reason}``, no metrics and figures saying so.
    """
    if isinstance(trained_model, TrainingSkipped):
        return (
            {"skipped": trained_model.reason},
            {},
            message_figure("Training skipped"),
            message_figure("Training skipped"),
            message_figure("Training skipped"),
        )
    _require_test_images(test_set)
    probabilities = predict_probabilities(trained_model, test_set["images"])
    uncalibrated = (
        predict_probabilities(trained_model.classifier, test_set["images"])
        if isinstance(trained_model, CalibratedClassifier)
        else probabilities
    )
    predicted = probabilities.argmax(1)
    truth = test_set["labels"]
    labels = list(range(len(class_names)))
    precision, recall, _, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0
    )
    # A class with no test image has no recall (not 0): the gate would refuse a perfect
    # model for it, and macro F1 would count it as a class the model never gets right.
    present = [label for label in labels if support[label]]
    evaluation = {
        "test_accuracy": float((predicted == truth).mean()),
        "test_macro_f1": float(f1_score(truth, predicted, labels=present, average="macro")),
        "test_images": len(truth),
        "test_errors": int((predicted != truth).sum()),
        "model_digest": model_digest(trained_model),  # register_and_promote checks it
        **_calibration_scores(uncalibrated, probabilities, truth, calibration),
        "per_class": {
            name: {"precision": float(p), "recall": float(r) if s else None, "support": int(s)}
            for name, p, r, s in zip(class_names, precision, recall, support, strict=True)
        },
    }
    metrics = {
        key: {"value": evaluation[key], "step": 0}
        for key in (
            "test_accuracy",
            "test_macro_f1",
            "test_errors",
            "test_ece_uncalibrated",
            "test_ece",
            "test_review_rate",
            "test_answered_error_rate",
        )
    }
    for name, scores in evaluation["per_class"].items():
        metrics[f"test_precision.{name}"] = {"value": scores["precision"], "step": 0}
        if scores["recall"] is not None:
            metrics[f"test_recall.{name}"] = {"value": scores["recall"], "step": 0}
    logger.info(
        "Test accuracy %.4f, macro F1 %.4f, %d errors in %d images",
        evaluation["test_accuracy"],
        evaluation["test_macro_f1"],
        evaluation["test_errors"],
        len(truth),
    )
    matrix = confusion_matrix(truth, predicted, labels=labels)
    return (
        evaluation,
        metrics,
        plot_confusion_matrix(matrix, class_names),
        plot_misclassified(test_set["images"], truth, probabilities, class_names),
        plot_reliability(uncalibrated, probabilities, truth, calibration),
    )


def _require_test_images(test_set: dict) -> None:
    """Both models are scored on the test split; an empty one fails in numpy ("argmax of an
    empty sequence") unless refused first, whichever node runs first."""
    if len(test_set["labels"]) == 0:
        raise ValueError("the test split is empty: add images or raise test_fraction")


def _calibration_scores(
    uncalibrated: np.ndarray, calibrated: np.ndarray, truth: np.ndarray, calibration: dict
) -> dict[str, float]:
    """Test ECE before and after calibration; what the review threshold does on the test split."""
    bins = int(calibration["ece_bins"])
    answered = calibrated.max(1) >= calibration["review_threshold"]
    wrong = calibrated.argmax(1) != truth
    return {
        "test_ece_uncalibrated": expected_calibration_error(uncalibrated, truth, bins),
        "test_ece": expected_calibration_error(calibrated, truth, bins),
        "test_review_rate": float(1 - answered.mean()),
        "test_answered_error_rate": float(wrong[answered].mean()) if answered.any() else 0.0,
    }


def plot_reliability(
    uncalibrated: np.ndarray, calibrated: np.ndarray, truth: np.ndarray, calibration: dict
) -> Figure:
    """Accuracy against confidence per bin on the test split, before and after calibration.

    A calibrated model's bars follow the diagonal: of the answers given with 80% confidence,
    80% are right. The review threshold is drawn as a vertical line.
    """
    bins = int(calibration["ece_bins"])
    figure = Figure(figsize=(10, 4.5))
    for axes, (title, probabilities) in zip(
        figure.subplots(1, 2),
        (("Before calibration", uncalibrated), ("After calibration", calibrated)),
        strict=True,
    ):
        rows = reliability_table(probabilities.max(1), probabilities.argmax(1) == truth, bins)
        axes.bar(
            [(row["low"] + row["high"]) / 2 for row in rows],
            [row["accuracy"] for row in rows],
            width=1 / bins,
            edgecolor="black",
            alpha=0.7,
            label="accuracy",
        )
        axes.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        axes.axvline(calibration["review_threshold"], color="tab:red", label="review threshold")
        ece = expected_calibration_error(probabilities, truth, bins)
        axes.set_title(f"{title} (test ECE {ece:.4f})")
        axes.set_xlabel("Confidence")
        axes.set_ylabel("Accuracy")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.legend(loc="upper left", fontsize=8)
    figure.suptitle(f"Reliability diagram, temperature {calibration['temperature']:.3f}")
    figure.tight_layout()
    return figure


def evaluate_champion(
    champion: registry.RegisteredClassifier | None,
    test_set: dict,
    class_names: list[str],
    training_decision: dict[str, Any] | None = None,
    registered_versions: dict[str, registry.RegisteredVersion] | None = None,
) -> dict[str, Any]:
    """Score the current champion on the test images it never saw, matching classes by name.

    The split is a function of the content hash and the split fractions, so after a change
    of fractions some of this run's test images were the champion's training or validation
    images: scored on them it looks better than it is, and a better new model can lose the
    gate. Both models are therefore compared on the test images outside the champion's
    training and validation splits (its training manifest says which); with the fractions
    unchanged that is the whole test split.

    Returns:
        ``{"version": None}`` when there is no champion yet, else its version, accuracy and
        per-class recall on the compared images, their count, how many test images were left
        out as seen in training, and which of them it gets right (``correct``, 0/1) and
        which were compared (``compared``, 0/1), both in the test split's order, for the
        paired comparison with the new model. ``test_accuracy`` is ``None`` when training
        was skipped (nothing to compare) or no test image is unseen by the champion.
        ``decided_against``: the champion the training decision counted the new images
        against; the gate refuses to promote over another (``_gate``).
    """
    if training_decision is not None and not training_decision["train"]:
        return {"version": champion.version if champion else None, "test_accuracy": None}
    decided = {}  # the champion the training decision chose the data against
    if training_decision is not None and "champion_version" in training_decision:
        decided = {"decided_against": training_decision["champion_version"]}
    if champion is None:
        logger.info("No champion registered yet")
        return {"version": None, "test_accuracy": None, **decided}
    _require_test_images(test_set)
    compared = _unseen_by(champion.version, registered_versions or {}, test_set["content_hashes"])
    predicted = predict_probabilities(champion.model, test_set["images"]).argmax(1)
    correct = (
        np.asarray(champion.class_names)[predicted] == np.asarray(class_names)[test_set["labels"]]
    )
    true_names = np.asarray(class_names)[test_set["labels"]][compared]
    accuracy = float(correct[compared].mean()) if compared.any() else None
    logger.info(
        "Champion version %s: test accuracy %s on %d of %d test images (%d it trained or "
        "validated on left out)",
        champion.version,
        "n/a" if accuracy is None else f"{accuracy:.4f}",
        compared.sum(),
        len(compared),
        (~compared).sum(),
    )
    return {
        "version": champion.version,
        **decided,
        "test_accuracy": accuracy,
        "compared_images": int(compared.sum()),
        "seen_by_champion": int((~compared).sum()),
        "per_class_recall": {
            name: float(correct[compared][true_names == name].mean())
            for name in class_names
            if (true_names == name).any()
        },
        "correct": correct.astype(int).tolist(),
        "compared": compared.astype(int).tolist(),
    }


def _unseen_by(
    version: str, versions: dict[str, registry.RegisteredVersion], content_hashes: list[str]
) -> np.ndarray:
    """Which test images (0/1 by position) the champion neither trained nor validated on.

    A version registered without a manifest (or one that cannot be read) compares on the
    whole test split, as before manifests, with a warning.
    """
    try:
        manifest = versions[version].read_manifest()
    except (KeyError, FileNotFoundError) as error:
        logger.warning(
            "Champion version %s has no training manifest (%s): compared on the whole test "
            "split, which holds images it trained on if the split fractions changed since",
            version,
            error,
        )
        return np.ones(len(content_hashes), dtype=bool)
    # By Arrow: pandas' isin over a million-row manifest took 5 s, this 0.5 s.
    held_out = pc.equal(arrow_strings(manifest["split"]), "test")
    seen = pc.filter(arrow_strings(manifest["content_hash"]), pc.invert(held_out))
    return ~pc.is_in(arrow_strings(content_hashes), value_set=seen).to_numpy(zero_copy_only=False)


def paired_comparison(champion_correct: list[int], challenger_correct: np.ndarray) -> dict:
    """Errors only one of the two models makes on the same test images, and McNemar's test.

    McNemar's exact test: under "both models are as good", an image that only one of them
    gets wrong is equally likely to be either's; the p-value says how surprising the split
    of those images is.
    """
    champion = np.asarray(champion_correct, dtype=bool)
    only_champion = int((~champion & challenger_correct).sum())
    only_challenger = int((champion & ~challenger_correct).sum())
    discordant = only_champion + only_challenger
    p_value = (
        float(binomtest(min(only_champion, only_challenger), discordant, 0.5).pvalue)
        if discordant
        else 1.0
    )
    return {
        "errors_only_champion": only_champion,
        "errors_only_challenger": only_challenger,
        "errors_both": int((~champion & ~challenger_correct).sum()),
        "mcnemar_p_value": p_value,
    }


def decide_promotion(
    candidate_accuracy: float,
    champion_accuracy: float | None,
    champion_gate: dict[str, float],
    candidate_recalls: dict[str, float] | None = None,
    candidate_ece: float | None = None,
    compared: tuple[float, int] | None = None,
) -> tuple[bool, str]:
    """The champion gate: promote only a model good enough, and better than the champion.

    A candidate needs ``min_accuracy``, every class's recall at least ``min_class_recall``
    (an overall accuracy can hide one weak class; a class with no test image has no recall
    and is not checked), a test ECE of at most ``max_ece``, and, with a champion, more than
    the champion's accuracy plus ``min_improvement``: a tie keeps the champion, since a new
    version that is no better only churns what the service answers.

    ``compared`` is the candidate's accuracy on the test images the champion did not train on
    and their count, when some test images were left out (``evaluate_champion``): the
    champion's accuracy is on those images, so the two are compared on them.

    Returns:
        Whether to promote, and why in words: every figure (and class) beyond a limit
        (``checks.gate_failures``, which the rollback checks its target with too), else the
        comparison with the champion that decided.
    """
    gate = validate_gate(champion_gate)
    min_accuracy, min_improvement = gate.min_accuracy, gate.min_improvement
    failures = gate_failures(gate, candidate_accuracy, candidate_recalls or {}, candidate_ece)
    if failures:
        return False, "; ".join(str(failure) for failure in failures)
    if champion_accuracy is None:
        return True, (
            f"no champion yet and test accuracy {candidate_accuracy:.4f} "
            f">= min_accuracy {min_accuracy:.4f}"
        )
    if compared is None:
        return _beats_champion(candidate_accuracy, champion_accuracy, min_improvement)
    promote, reason = _beats_champion(compared[0], champion_accuracy, min_improvement)
    return promote, (
        f"{reason}, on the {compared[1]} test images the champion did not train or validate on"
    )


def _beats_champion(candidate: float, champion: float, min_improvement: float) -> tuple[bool, str]:
    """Strictly better than the champion by more than ``min_improvement``; a tie is no."""
    required = champion + min_improvement
    versus = f"the champion's {champion:.4f} + min_improvement {min_improvement:.4f}"
    if candidate + RATIO_TOLERANCE < required:
        return False, f"test accuracy {candidate:.4f} is below {versus}"
    if candidate <= required + RATIO_TOLERANCE:
        return False, (
            f"test accuracy {candidate:.4f} ties {versus}: only a better model replaces the "
            "champion"
        )
    return True, f"test accuracy {candidate:.4f} > {versus}"


def register_and_promote(
    trained_model: nn.Module | TrainingSkipped,
    evaluation: dict[str, Any],
    champion_evaluation: dict[str, Any],
    test_set: dict,
    class_names: list[str],
    dataset_fingerprint: str,
    training_manifest: pd.DataFrame,
    champion_gate: dict[str, float],
    calibration: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Register the trained model, then give it alias ``champion`` if it passes the gate.

    A model that does not pass gets alias ``challenger``. Runs last, so nothing is
    registered when an earlier step fails. The version is tagged with what it was trained
    on (fingerprint, images by source), the test figures the gate judged (accuracy, ECE,
    each tested class's recall: a rollback to it checks them against the gate then)
    and, when promoted, with when and why, so that anyone reading the registry (the
    service's ``GET /model``) can tell. The review threshold and temperature travel in the
    model's metadata, with the class names.

    Returns:
        The decision, for the MLflow run's artifacts. When training was skipped nothing is
        registered and the decision says why. And ``training_manifest``, for the registering
        run (``registered_training_manifest``, logged unless the run holds it): a version's
        run must hold its manifest for rebuild, rollback and the next training decision, and a
        ``kedro run --pipeline evaluation`` of its own is not data_processing's run.
    """
    if isinstance(trained_model, TrainingSkipped):
        logger.info("Nothing registered: %s", trained_model.reason)
        return {
            "model_name": registry.MODEL_NAME,
            "version": None,
            "alias": None,
            "promoted": False,
            "skipped": True,
            "reason": trained_model.reason,
            "previous_champion": champion_evaluation,
            "dataset_fingerprint": dataset_fingerprint,
        }, training_manifest
    _check_evaluated(trained_model, evaluation)
    comparison = _comparison(trained_model, test_set, class_names, evaluation, champion_evaluation)
    promote, reason = _gate(evaluation, champion_evaluation, champion_gate, comparison)
    version = _register(trained_model, evaluation, test_set, class_names, dataset_fingerprint,
                        training_manifest, calibration)  # fmt: skip
    champion = champion_evaluation["version"]
    if promote and registry.alias_version() == version:
        logger.info("Version %s was promoted by an earlier attempt of this task", version)
    elif promote:
        try:
            registry.apply_champion_move(lifecycle.promotion_move(version, champion, reason))
        except registry.ChampionMovedError as error:  # a rollback during this run
            promote, champion = False, error.current
            reason = (
                f"{reason}, but champion moved from version {champion_evaluation['version']} "
                f"to {error.current} during this run ({error.moved_by}): not promoted over a "
                "champion the gate did not compare it with"
            )
    alias = registry.CHAMPION_ALIAS if promote else registry.CHALLENGER_ALIAS
    if promote:
        logger.info("Version %s is the new champion: %s", version, reason)
    else:
        registry.set_alias(version, alias)
        logger.warning(
            "Version %s is a challenger, champion stays version %s: %s", version, champion, reason
        )
    return {
        "model_name": registry.MODEL_NAME,
        "version": version,
        "alias": alias,
        "promoted": promote,
        "skipped": False,
        "reason": reason,
        "test_accuracy": evaluation["test_accuracy"],
        "test_ece": evaluation.get("test_ece"),
        "gate": asdict(validate_gate(champion_gate)),
        **comparison,
        "previous_champion": {
            key: value
            for key, value in champion_evaluation.items()
            if key not in ("correct", "compared")
        },
        "dataset_fingerprint": dataset_fingerprint,
    }, training_manifest


def _register(
    trained_model: nn.Module,
    evaluation: dict[str, Any],
    test_set: dict,
    class_names: list[str],
    dataset_fingerprint: str,
    training_manifest: pd.DataFrame,
    calibration: dict[str, Any],
) -> str:
    """Register the model with the tags a version carries; return its version.

    A version this run already registered from this very model (tag ``model_digest``) is
    returned instead: an Airflow task cleared or retried after registering registered the
    same model again each time, and the retry of a task killed after its promotion found the
    champion moved, by itself, and recorded the run as not promoted.
    """
    digest = evaluation.get("model_digest") or model_digest(trained_model)
    run = mlflow.active_run()
    earlier = registry.registered_in_run(run.info.run_id, digest) if run else None
    if earlier is not None:
        logger.warning(
            "Version %s was registered from this model by an earlier attempt in this run: "
            "not registered again",
            earlier,
        )
        return earlier
    counts = train_image_counts(training_manifest)
    return registry.log_and_register(
        trained_model,
        class_names,
        input_example=test_set["images"][:2],
        calibration={
            "review_threshold": calibration["review_threshold"],
            "temperature": calibration["temperature"],
            "review_target_error_rate": calibration["review_target_error_rate"],
        },
        tags={
            lifecycle.DATASET_FINGERPRINT: dataset_fingerprint,
            lifecycle.MODEL_DIGEST: digest,
            "git_commit": registry.git_commit(),
            **lifecycle.gate_figure_tags(
                evaluation["test_accuracy"],
                evaluation.get("test_ece"),
                _tested_recalls(evaluation),
            ),
            lifecycle.TRAIN_IMAGES_RAW: str(counts["raw"]),
            lifecycle.TRAIN_IMAGES_FEEDBACK: str(counts["feedback"]),
            lifecycle.MODEL_INPUT_IMAGES: str(counts["model_input"]),
        },
    )


def _check_evaluated(trained_model: nn.Module, evaluation: dict[str, Any]) -> None:
    """Refuse to register a model other than the one ``evaluate_model`` scored.

    Each node of the weekly DAG is its own task reading the stores: a hand ``kedro run``
    beside it wrote its model between the DAG's evaluation and registration, and the DAG
    registered that model on the other one's figures, and promoted it. An evaluation of
    older code has no digest: nothing to check.
    """
    evaluated = evaluation.get("model_digest")
    if evaluated is not None and evaluated != model_digest(trained_model):
        raise ValueError(
            "the trained model is not the one evaluate_model scored (another run wrote "
            "trained_model since, e.g. a hand `kedro run` beside the weekly DAG): nothing "
            "registered; run training and evaluation again, one run at a time"
        )


def _gate(
    evaluation: dict[str, Any],
    champion_evaluation: dict[str, Any],
    champion_gate: dict[str, float],
    comparison: dict[str, Any],
) -> tuple[bool, str]:
    """``decide_promotion``, against the champion on the test images it never saw."""
    decided = champion_evaluation.get("decided_against", champion_evaluation["version"])
    if decided != champion_evaluation["version"]:
        return False, (
            f"the champion moved from version {decided} to {champion_evaluation['version']} "
            "after this run's training decision (a rollback or another run's promotion): "
            f"its data was chosen against version {decided}, whose move away it would undo; "
            "not promoted (the next run decides against the champion now)"
        )
    if champion_evaluation.get("compared_images") == 0:
        return False, (
            f"none of the {champion_evaluation['seen_by_champion']} test images is unseen by "
            f"champion version {champion_evaluation['version']} (the split fractions changed "
            "since it trained), so the gate cannot show the new model is better; compare "
            "them by hand and move the champion with the rollback pipeline "
            "(rollback.to_version) if it is"
        )
    versus = comparison["versus_champion"]
    return decide_promotion(
        evaluation["test_accuracy"],
        champion_evaluation["test_accuracy"],
        champion_gate,
        candidate_recalls=_tested_recalls(evaluation),
        candidate_ece=evaluation.get("test_ece"),
        compared=(
            (versus["challenger_accuracy"], versus["compared_images"])
            if versus and versus["seen_by_champion"]
            else None
        ),
    )


def _tested_recalls(evaluation: dict[str, Any]) -> dict[str, float]:
    """Recall of each class the test split has images of, as ``evaluate_champion`` gives it."""
    return {
        name: scores["recall"]
        for name, scores in evaluation["per_class"].items()
        if scores["recall"] is not None
    }


def _comparison(
    trained_model: nn.Module,
    test_set: dict,
    class_names: list[str],
    evaluation: dict[str, Any],
    champion_evaluation: dict[str, Any],
) -> dict[str, Any]:
    """Both models on the test images the champion never saw: per-class recall, accuracy and
    the paired comparison (``None`` without a champion to compare with)."""
    if not champion_evaluation.get("compared_images"):
        recalls = {"challenger": _tested_recalls(evaluation)}
        return {"per_class_recall": recalls, "paired_comparison": None, "versus_champion": None}
    compared = np.asarray(champion_evaluation["compared"], dtype=bool)
    labels = test_set["labels"][compared]
    correct = predict_probabilities(trained_model, test_set["images"][compared]).argmax(1) == labels
    paired = paired_comparison(np.asarray(champion_evaluation["correct"])[compared], correct)
    logger.info(
        "Paired comparison with champion version %s on %d test images: %d errors only the "
        "champion makes, %d only the challenger makes, McNemar p = %.3g",
        champion_evaluation["version"],
        len(correct),
        paired["errors_only_champion"],
        paired["errors_only_challenger"],
        paired["mcnemar_p_value"],
    )
    recalls = {
        "challenger": {
            class_names[label]: float(correct[labels == label].mean())
            for label in np.unique(labels)
        },
        "champion": champion_evaluation["per_class_recall"],
    }
    versus = {
        "compared_images": len(correct),
        "seen_by_champion": champion_evaluation["seen_by_champion"],
        "challenger_accuracy": float(correct.mean()),
        "champion_accuracy": champion_evaluation["test_accuracy"],
    }
    return {"per_class_recall": recalls, "paired_comparison": paired, "versus_champion": versus}


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str]) -> Figure:
    """Counts of true (rows) against predicted (columns) classes."""
    figure = Figure(figsize=(7, 6))
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("Predicted")
    axes.set_ylabel("True")
    axes.set_title("Confusion matrix (test split)")
    threshold = matrix.max() / 2 if matrix.size else 0
    for row in ticks:
        for column in ticks:
            count = matrix[row, column]
            axes.text(
                column,
                row,
                str(count),
                ha="center",
                va="center",
                color="white" if count > threshold else "black",
            )
    figure.tight_layout()
    return figure


def plot_misclassified(
    images: np.ndarray, truth: np.ndarray, probabilities: np.ndarray, class_names: list[str]
) -> Figure:
    """A grid of misclassified images, most confident mistakes first."""
    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != truth)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:_MAX_MISCLASSIFIED_SHOWN]
    if len(wrong) == 0:
        return message_figure("No misclassified test images")
    columns = min(6, len(wrong))
    rows = -(-len(wrong) // columns)
    figure = Figure(figsize=(2 * columns, 2.3 * rows))
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for axes, index in zip(grid.flat, wrong, strict=False):
        axes.imshow(images[index, 0], cmap="gray", vmin=0, vmax=255)
        axes.set_title(
            f"true {class_names[truth[index]]}\npred {class_names[predicted[index]]} "
            f"({probabilities[index, predicted[index]]:.2f})",
            fontsize=8,
        )
    figure.suptitle(f"Misclassified test images ({len(wrong)} shown)")
    figure.tight_layout()
    return figure
