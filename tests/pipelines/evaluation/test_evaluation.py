"""evaluate_model, evaluate_champion and register_and_promote on a model whose answers are known."""

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from medical_ct import registry
from medical_ct.calibration import CalibratedClassifier
from medical_ct.model import build_classifier, predict_probabilities
from medical_ct.pipelines.evaluation.nodes import (
    _gate,
    decide_promotion,
    evaluate_champion,
    evaluate_model,
    register_and_promote,
)

CLASSES = ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]
CALIBRATION = {"temperature": 1.0, "review_threshold": 0.5, "ece_bins": 15}
GATE = {"min_accuracy": 0.95, "min_improvement": 0.0, "min_class_recall": 0.98, "max_ece": 0.02}


class Oracle(nn.Module):
    """Answers the class written in each image's first pixel, sure of it."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        answer = images[:, 0, 0, 0].long()
        return 20.0 * nn.functional.one_hot(answer, len(CLASSES)).float()


def split(labels: list[int]) -> dict:
    images = np.zeros((len(labels), 1, 64, 64), dtype=np.uint8)
    images[:, 0, 0, 0] = labels
    return {"images": images, "labels": np.asarray(labels, dtype=np.int64)}


def test_a_class_without_test_images_neither_blocks_the_gate_nor_lowers_macro_f1():
    without_head_ct = split([label for label in range(5) for _ in range(4)])
    evaluation, metrics, *_ = evaluate_model(Oracle(), without_head_ct, CLASSES, CALIBRATION)

    assert evaluation["test_accuracy"] == 1.0 and evaluation["test_macro_f1"] == 1.0
    assert evaluation["per_class"]["HeadCT"] == {"precision": 0.0, "recall": None, "support": 0}
    assert "test_recall.HeadCT" not in metrics and metrics["test_recall.Hand"]["value"] == 1.0
    recalls = {name: scores["recall"] for name, scores in evaluation["per_class"].items()}
    assert decide_promotion(1.0, None, GATE, recalls, evaluation["test_ece"])[0] is True


def test_a_model_registered_from_a_one_image_test_split_takes_batches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the artifacts' default root, ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = CalibratedClassifier(build_classifier("small_cnn", len(CLASSES), 4), 1.0).eval()
    one_image = split([2])
    evaluation, *_ = evaluate_model(model, one_image, CLASSES, CALIBRATION)
    manifest = pd.DataFrame({"split": ["test"], "source": ["raw"]})
    with mlflow.start_run():
        decision, _ = register_and_promote(
            model,
            evaluation,
            {"version": None, "test_accuracy": None},
            one_image,
            CLASSES,
            "f" * 64,
            manifest,
            GATE,
            {**CALIBRATION, "review_target_error_rate": 0.001},
        )

    loaded = registry.load_version(decision["version"], {})
    five = split([0, 1, 2, 3, 4])["images"]
    assert predict_probabilities(loaded.model, five).shape == (5, len(CLASSES))
    # What the gate checked is on the version, for a rollback to check against its gate; a
    # class with no test image (all but CXR here) has no recall to record.
    tags = mlflow.MlflowClient().get_model_version(registry.MODEL_NAME, decision["version"]).tags
    assert float(tags["test_accuracy"]) == evaluation["test_accuracy"]
    assert float(tags["test_ece"]) == pytest.approx(evaluation["test_ece"], abs=1e-6)
    assert {key for key in tags if key.startswith("test_recall.")} == {"test_recall.CXR"}
    assert float(tags["test_recall.CXR"]) == evaluation["per_class"]["CXR"]["recall"]


def test_an_empty_test_split_is_refused_in_words_when_the_champion_is_scored_first():
    champion = registry.RegisteredClassifier(Oracle(), "3", CLASSES, {})
    with pytest.raises(ValueError, match="the test split is empty: add images or raise"):
        evaluate_champion(champion, split([]), CLASSES, {"train": True})


def register(answers: nn.Module, test_set, champion_evaluation, manifest, gate) -> dict:
    """Evaluate a model, then register it and put it through the gate, as the pipeline does."""
    model = CalibratedClassifier(answers, 1.0).eval()
    evaluation, *_ = evaluate_model(model, test_set, CLASSES, CALIBRATION)
    calibration = {**CALIBRATION, "review_target_error_rate": 0.001}
    return register_and_promote(
        model,
        evaluation,
        champion_evaluation,
        test_set,
        CLASSES,
        "f" * 64,
        manifest,
        gate,
        calibration,
    )[0]


class Reader(nn.Module):
    """Answers the class written in pixel (0, ``column``) of each image, sure of it."""

    def __init__(self, column: int) -> None:
        super().__init__()
        self.column = column

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        answer = images[:, 0, 0, self.column].long()
        return 20.0 * nn.functional.one_hot(answer, len(CLASSES)).float()


def test_after_a_change_of_split_fractions_the_gate_compares_on_test_images_the_champion_never_saw(
    tmp_path, monkeypatch
):
    """The champion trained on half of this run's test images (its split had another test
    fraction): it knows all 10 of them and 6 of the 10 others; the new model gets 7 and 8.
    On the whole split the champion leads, 0.80 to 0.75; on the images neither model saw, the
    new model does, 0.8 to 0.6, and that decides."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    test_set = split([label % 6 for label in range(20)])
    truth = test_set["labels"]
    wrong = (truth + 1) % 6
    seen = np.arange(20) < 10
    test_set["images"][:, 0, 0, 1] = np.where(seen | (np.arange(20) < 16), truth, wrong)
    new_model_right = np.isin(np.arange(20), [*range(7), *range(10, 18)])
    test_set["images"][:, 0, 0, 2] = np.where(new_model_right, truth, wrong)
    test_set["content_hashes"] = [f"{index:064x}" for index in range(20)]
    trained_on = pd.DataFrame(
        {
            "content_hash": test_set["content_hashes"],
            "split": np.where(seen, "train", "test"),
            "source": "raw",
        }
    )
    gate = {"min_accuracy": 0.5, "min_improvement": 0.1}
    with mlflow.start_run():  # the champion, registered as a first run registers it
        register(Reader(1), test_set, {"version": None, "test_accuracy": None}, trained_on, gate)
    champion = registry.load_alias()
    versions = {"1": registry.RegisteredVersion("1", None, {}, dict, lambda: trained_on)}
    champion_evaluation = evaluate_champion(champion, test_set, CLASSES, {"train": True}, versions)
    assert champion_evaluation["test_accuracy"] == 0.6
    assert champion_evaluation["compared_images"] == champion_evaluation["seen_by_champion"] == 10

    with mlflow.start_run():
        decision = register(Reader(2), test_set, champion_evaluation, trained_on, gate)

    assert decision["promoted"] is True and decision["test_accuracy"] == 0.75
    assert registry.load_alias().version == decision["version"] == "2"
    assert decision["reason"] == (
        "test accuracy 0.8000 > the champion's 0.6000 + min_improvement 0.1000, on the 10 test "
        "images the champion did not train or validate on"
    )
    assert decision["versus_champion"] == {
        "compared_images": 10,
        "seen_by_champion": 10,
        "challenger_accuracy": 0.8,
        "champion_accuracy": 0.6,
    }
    paired = decision["paired_comparison"]
    assert (paired["errors_only_champion"], paired["errors_only_challenger"]) == (2, 0)
    assert "compared" not in decision["previous_champion"]


def test_a_champion_that_saw_every_test_image_is_kept_in_words(caplog):
    test_set = split([0, 1, 2, 3])
    test_set["content_hashes"] = [f"{index:064x}" for index in range(4)]
    trained_on = pd.DataFrame({"content_hash": test_set["content_hashes"], "split": "validation"})
    versions = {"3": registry.RegisteredVersion("3", None, {}, dict, lambda: trained_on)}
    champion = registry.RegisteredClassifier(Oracle(), "3", CLASSES, {})

    champion_evaluation = evaluate_champion(champion, test_set, CLASSES, {"train": True}, versions)
    assert champion_evaluation["test_accuracy"] is None
    assert champion_evaluation["compared_images"] == 0
    assert _gate({"test_accuracy": 1.0}, champion_evaluation, GATE, {}) == (
        False,
        "none of the 4 test images is unseen by champion version 3 (the split fractions changed "
        "since it trained), so the gate cannot show the new model is better; compare them by "
        "hand and move the champion with the rollback pipeline (rollback.to_version) if it is",
    )
    # A version registered before manifests: the whole split, with a warning saying so.
    without = evaluate_champion(champion, test_set, CLASSES, {"train": True}, {})
    assert without["test_accuracy"] == 1.0 and without["seen_by_champion"] == 0
    assert "has no training manifest" in caplog.text


def use_store(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the artifacts' default root, ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_a_model_other_than_the_evaluated_one_is_not_registered(tmp_path, monkeypatch):
    """A hand `kedro run` beside the weekly DAG wrote its model between the DAG's evaluation
    and registration; the DAG registered that model on the other one's figures and promoted
    it (production hunt of 2026-12-05)."""
    use_store(tmp_path, monkeypatch)
    torch.manual_seed(1)
    evaluated = CalibratedClassifier(build_classifier("small_cnn", len(CLASSES), 4), 1.0)
    other = CalibratedClassifier(build_classifier("small_cnn", len(CLASSES), 4), 1.0)
    test_set = split([0, 1, 2])
    evaluation, *_ = evaluate_model(evaluated.eval(), test_set, CLASSES, CALIBRATION)
    manifest = pd.DataFrame({"split": ["test"], "source": ["raw"]})

    with mlflow.start_run(), pytest.raises(ValueError, match="not the one evaluate_model scored"):
        register_and_promote(
            other.eval(),
            evaluation,
            {"version": None, "test_accuracy": None},
            test_set,
            CLASSES,
            "f" * 64,
            manifest,
            GATE,
            {**CALIBRATION, "review_target_error_rate": 0.001},
        )
    assert mlflow.MlflowClient().search_model_versions(f"name='{registry.MODEL_NAME}'") == []


def test_a_champion_moved_since_the_training_decision_is_not_replaced(tmp_path, monkeypatch):
    """The decision chose the data against champion 2; an operator rolled back to 1 while
    the model trained; the run promoted a model of version 2's data over 1, undoing the
    rollback (production hunt of 2026-12-05). It is registered as challenger."""
    use_store(tmp_path, monkeypatch)
    test_set = split([label % 6 for label in range(12)])
    test_set["images"][:, 0, 0, 1] = (test_set["labels"] + 1) % 6  # Reader(1) is always wrong
    test_set["content_hashes"] = [f"{index:064x}" for index in range(12)]
    gate = {"min_accuracy": 0.5, "min_improvement": 0.0}
    manifest = pd.DataFrame({"split": ["test"] * 12, "source": ["raw"] * 12})
    with mlflow.start_run():  # the champion rolled back to: version 1
        register(Oracle(), test_set, {"version": None, "test_accuracy": None}, manifest, gate)
    champion = registry.load_alias()
    decision = {"train": True, "champion_version": "2"}
    champion_evaluation = evaluate_champion(champion, test_set, CLASSES, decision, {})
    champion_evaluation["test_accuracy"] = 0.5  # worse than the new model on paper

    with mlflow.start_run():
        decided = register(Reader(0), test_set, champion_evaluation, manifest, gate)

    assert decided["promoted"] is False and decided["alias"] == "challenger"
    assert decided["reason"].startswith(
        "the champion moved from version 2 to 1 after this run's training decision"
    )
    assert registry.load_alias().version == "1"


def test_a_registration_retried_in_the_same_run_registers_nothing_again(tmp_path, monkeypatch):
    """An Airflow task killed after its promotion and cleared twice registered the same model
    as versions 2, 3 and 4, and recorded the run as not promoted: the champion had moved,
    by the first attempt (production hunt of 2026-12-05)."""
    use_store(tmp_path, monkeypatch)
    torch.manual_seed(3)
    model = CalibratedClassifier(build_classifier("small_cnn", len(CLASSES), 4), 1.0).eval()
    test_set = split([0, 1, 2])
    evaluation, *_ = evaluate_model(model, test_set, CLASSES, CALIBRATION)
    manifest = pd.DataFrame({"split": ["test"] * 3, "source": ["raw"] * 3})
    gate = {"min_accuracy": 0.0, "min_improvement": 0.0}
    calibration = {**CALIBRATION, "review_target_error_rate": 0.001}
    arguments = (evaluation, {"version": None, "test_accuracy": None}, test_set, CLASSES)

    with mlflow.start_run():
        attempts = [
            register_and_promote(model, *arguments, "f" * 64, manifest, gate, calibration)[0]
            for _ in range(3)
        ]

    assert [(a["version"], a["alias"], a["promoted"]) for a in attempts] == [
        ("1", "champion", True)
    ] * 3
    versions = mlflow.MlflowClient().search_model_versions(f"name='{registry.MODEL_NAME}'")
    assert [str(version.version) for version in versions] == ["1"]
    # written with the version, in one request: a kill cannot leave it without its figures
    assert {"test_accuracy", "model_digest", "dataset_fingerprint"} <= versions[0].tags.keys()
