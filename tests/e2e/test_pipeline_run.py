"""The whole default `kedro run` on the sample, against a real sqlite MLflow store."""

import json

import mlflow
import numpy as np
import pytest
import torch
import yaml

from medical_ct import registry
from medical_ct.pipeline_registry import default_pipeline
from medical_ct.pipelines import data_processing, evaluation, monitoring, training
from medical_ct.pipelines.data_processing.nodes import split_of
from medical_ct.preprocessing import content_hash, preprocess_image
from tests.conftest import (
    FAST_RUN_PARAMS,
    PROJECT_ROOT,
    assert_ok,
    kedro,
    make_project,
    mlflow_client,
)

WEEKLY = (monitoring, data_processing, training, evaluation)


def champion_version(project) -> str:
    return (
        mlflow_client(project).get_model_version_by_alias(registry.MODEL_NAME, "champion").version
    )


def test_first_run_tracks_everything_and_promotes_a_champion(trained_project):
    client = mlflow_client(trained_project)
    experiment = client.get_experiment_by_name("medical_ct")
    # Other tests may add runs to this shared project: the first one is the first kedro run.
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])[0]
    assert run.info.status == "FINISHED"

    assert run.data.params["training.architecture"] == "small_cnn"
    assert run.data.params["training.batch_size"] == "16"
    assert run.data.params["champion_gate.min_accuracy"] == "0.7"
    epochs = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert len(epochs) >= 2 and [m.step for m in epochs] == list(range(1, len(epochs) + 1))
    for metric in ("train_loss", "val_loss", "test_accuracy", "test_macro_f1", "data.train_images"):
        assert metric in run.data.metrics, metric
    assert any(key.startswith("test_recall.") for key in run.data.metrics)
    assert run.data.metrics["test_accuracy"] >= 0.7
    # Calibration: fitted after training, ECE before (_uncalibrated) and after on both splits.
    for metric in (
        "temperature",
        "review_threshold",
        "val_ece_uncalibrated",
        "val_ece",
        "test_ece_uncalibrated",
        "test_ece",
        "test_review_rate",
    ):
        assert metric in run.data.metrics, metric
    assert run.data.metrics["temperature"] != 1.0
    assert run.data.metrics["val_ece"] < run.data.metrics["val_ece_uncalibrated"]
    # Where the time went (NodeTimingHook): every node and every dataset it saved; the last
    # node's saves come after its end and are sent as the run ends, before it is closed.
    pipelines = {module.__name__.rsplit(".", 1)[-1]: module.create_pipeline() for module in WEEKLY}
    nodes = default_pipeline(pipelines).nodes
    timings = {f"node_seconds.{node.name}" for node in nodes}
    timings |= {f"save_seconds.{output}" for node in nodes for output in node.outputs}
    assert sorted(timings - set(run.data.metrics)) == []

    artifacts = {
        a.path
        for folder in ("plots", "reports")
        for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {
        "plots/confusion_matrix.png",
        "plots/misclassified_images.png",
        "plots/reliability_diagram.png",
        "reports/calibration.json",
        "reports/data_report.json",
        "reports/evaluation.json",
        "reports/promotion.json",
    } <= artifacts

    version = client.get_model_version_by_alias(registry.MODEL_NAME, "champion")
    assert version.run_id == run.info.run_id
    report = json.loads((trained_project / "data/08_reporting/data_report.json").read_text())
    assert version.tags["dataset_fingerprint"] == report["dataset_fingerprint"]
    assert float(version.tags["test_accuracy"]) == pytest.approx(run.data.metrics["test_accuracy"])
    assert version.tags["git_commit"]
    assert report["rejected_count"] == 0
    assert sum(report["images_per_split"].values()) + report["duplicates"] == 240


def test_registered_model_carries_what_a_consumer_needs(trained_project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{trained_project / 'mlflow.db'}")
    info = mlflow.models.get_model_info(registry.model_uri())
    assert info.metadata["class_names"] == sorted(
        ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]
    )
    assert info.metadata["preprocessing"]["image_size"] == 64
    calibration = info.metadata["calibration"]
    assert 0 < calibration["review_threshold"] <= 1
    assert calibration["review_target_error_rate"] == 0.001
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 64, 64)
    assert info.saved_input_example_info is not None

    loaded = registry.load_alias()
    assert loaded.class_names == info.metadata["class_names"]
    assert loaded.review_threshold == calibration["review_threshold"]
    example = np.zeros((1, 1, 64, 64), dtype=np.uint8)
    assert loaded.model(torch.from_numpy(example)).shape == (1, 6)
    # The temperature is inside the exported model: its output is calibrated log-probabilities.
    images = torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(loaded.model(images).exp().sum(1), torch.ones(4))
    assert loaded.model(torch.zeros((5, 1, 64, 64), dtype=torch.uint8)).shape == (5, 6)


def test_a_worse_model_does_not_move_the_champion(trained_project):
    before = champion_version(trained_project)
    result = kedro(
        trained_project,
        "run",
        "--params",
        FAST_RUN_PARAMS + ",training.learning_rate=1e-9,retrain_on_same_data=true",
    )
    assert_ok(result)
    client = mlflow_client(trained_project)
    assert champion_version(trained_project) == before
    challenger = client.get_model_version_by_alias(registry.MODEL_NAME, "challenger")
    assert int(challenger.version) > int(before)
    promotion = json.loads((trained_project / "data/08_reporting/promotion.json").read_text())
    assert promotion["promoted"] is False and promotion["alias"] == "challenger"
    assert "below" in promotion["reason"]
    # Both models on the same test split: per-class recall and the paired comparison.
    assert set(promotion["per_class_recall"]) == {"challenger", "champion"}
    assert set(promotion["per_class_recall"]["champion"]) == set(
        promotion["per_class_recall"]["challenger"]
    )
    paired = promotion["paired_comparison"]
    assert paired["errors_only_challenger"] > paired["errors_only_champion"]
    assert 0 <= paired["mcnemar_p_value"] <= 1
    assert promotion["gate"]["min_class_recall"] == 0.5
    assert "correct" not in promotion["previous_champion"]
    assert "is a challenger, champion stays version" in result.stdout + result.stderr


BAD_PARAMETERS = {
    "training.batch_size=0": "batch_size must be a positive integer",
    "champion_gate.min_accuracy=2": "champion_gate.min_accuracy must be in [0, 1]",
    "data_processing.split.test_fraction=0.95": "leave room for training",
    "data_processing.full_rescan=maybe": "full_rescan must be true or false",
    "training.data_path=disk": "data_path must be one of auto, memory, stream",
    "training.augmentation.max_zoom=0.9": (
        "augmentation.max_zoom must be a number in [0, 0.5], got 0.9"
    ),
    "calibration.review_target_error_rate=1.5": (
        "review_target_error_rate must be a number strictly between 0 and 1"
    ),
}


def test_bad_parameters_fail_the_run_and_register_nothing(tmp_path, sample_dir):
    """One run with a bad value in every group: the check names every problem at once."""
    project = make_project(tmp_path / "project", sample_dir)
    result = kedro(project, "run", "--params", ",".join([FAST_RUN_PARAMS, *BAD_PARAMETERS]))
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert "4 parameter groups are invalid" in output
    missing = [message for message in BAD_PARAMETERS.values() if message not in output]
    assert missing == []
    assert "Running node" not in output, "parameters are checked before the first node"
    assert mlflow_client(project).search_registered_models() == []


def test_a_model_weak_on_one_class_is_refused_by_min_class_recall(tmp_path, sample_dir):
    """Hand's training images mostly removed (its test and validation images kept): the model
    passes min_accuracy overall but not min_class_recall, and the run says it was Hand."""
    split = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_data_processing.yml").read_text())
    split = split["data_processing"]["split"]
    project = make_project(tmp_path / "project", sample_dir)
    hand = sorted((project / "data/01_raw/mednist/Hand").glob("*.jpeg"))
    in_training = [
        path
        for path in hand
        if split_of(
            content_hash(preprocess_image(path.read_bytes())),
            split["validation_fraction"],
            split["test_fraction"],
        )
        == "train"
    ]
    for path in in_training[1:]:  # one Hand image left to train on
        path.unlink()
    assert len(hand) - len(in_training) >= 3, "the test split needs Hand images to measure"

    result = kedro(
        project,
        "run",
        "--params",
        FAST_RUN_PARAMS + ",champion_gate.min_accuracy=0.6,champion_gate.min_class_recall=0.6",
    )
    assert_ok(result)
    output = " ".join((result.stdout + result.stderr).split())
    evaluation = json.loads((project / "data/08_reporting/evaluation.json").read_text())
    promotion = json.loads((project / "data/08_reporting/promotion.json").read_text())
    assert evaluation["test_accuracy"] >= 0.6, "overall accuracy passes the gate"
    assert promotion["promoted"] is False
    assert promotion["reason"].startswith("class Hand has test recall")
    assert "below min_class_recall 0.6000" in promotion["reason"]
    assert evaluation["per_class"]["Hand"]["recall"] < 0.6
    assert promotion["reason"] in output
    assert (
        "champion" not in mlflow_client(project).get_registered_model(registry.MODEL_NAME).aliases
    )
