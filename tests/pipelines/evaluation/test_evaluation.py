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


def test_an_empty_test_split_is_refused_in_words_when_the_champion_is_scored_first():
    champion = registry.RegisteredClassifier(Oracle(), "3", CLASSES, {})
    with pytest.raises(ValueError, match="the test split is empty: add images or raise"):
        evaluate_champion(champion, split([]), CLASSES, {"train": True})
