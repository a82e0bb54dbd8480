"""training node: learns the sample, is reproducible, refuses bad parameters."""

import pytest
import torch

from medical_ct.model import build_classifier, predict_probabilities
from medical_ct.pipelines.data_processing.nodes import build_model_input, decode_images
from medical_ct.pipelines.training.nodes import train_model

from .conftest import CLASSES

PARAMS = {
    "architecture": "small_cnn",
    "width": 8,
    "max_epochs": 3,
    "patience": 3,
    "batch_size": 16,
    "learning_rate": 0.005,
    "weight_decay": 0.0,
    "seed": 7,
    "device": "auto",
    "num_threads": 0,
}


@pytest.fixture(scope="module")
def model_input(sample_dir):
    partitions = {
        f"{p.parent.name}/{p.name}": (lambda p=p: p.read_bytes())
        for p in sorted(sample_dir.glob("*/*.jpeg"))
    }
    empty = decode_images({}, CLASSES)
    split = {"validation_fraction": 0.2, "test_fraction": 0.2}
    return build_model_input(decode_images(partitions, CLASSES), empty, split)


def test_training_learns_logs_history_and_returns_a_cpu_model(model_input):
    train, validation, _, class_names, _ = model_input
    model, history = train_model(train, validation, class_names, PARAMS)

    assert next(model.parameters()).device.type == "cpu"
    assert not model.training
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "best_epoch"} <= set(
        history
    )
    assert [point["step"] for point in history["val_accuracy"]] == [1, 2, 3]
    assert history["train_loss"][-1]["value"] < history["train_loss"][0]["value"]
    accuracy = predict_probabilities(model, validation["images"]).argmax(1) == validation["labels"]
    assert accuracy.mean() > 0.6


def test_training_is_reproducible_with_a_seed(model_input):
    train, validation, _, class_names, _ = model_input
    params = {**PARAMS, "max_epochs": 1}
    first, _ = train_model(train, validation, class_names, params)
    second, _ = train_model(train, validation, class_names, params)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"max_epochs": 0}, "max_epochs must be a positive integer"),
        ({"batch_size": "64"}, "batch_size must be a positive integer"),
        ({"learning_rate": -1}, "learning_rate must be a positive number"),
        ({"architecture": "no_such_net"}, "unknown architecture 'no_such_net'"),
        ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "tpu"}, "device"),
    ],
)
def test_bad_training_parameters_are_refused(model_input, override, message):
    train, validation, _, class_names, _ = model_input
    with pytest.raises((ValueError, RuntimeError), match=message):
        train_model(train, validation, class_names, {**PARAMS, **override})


def test_divergence_is_a_clear_error(model_input):
    train, validation, _, class_names, _ = model_input
    with pytest.raises(ValueError, match="training diverged"):
        train_model(train, validation, class_names, {**PARAMS, "learning_rate": 1e30})


def test_torchvision_architectures_take_grayscale_input():
    model = build_classifier("resnet18", num_classes=6).eval()
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    assert predict_probabilities(model, images).shape == (2, 6)
