"""training node: learns the sample, is reproducible, refuses bad parameters."""

import numpy as np
import pandas as pd
import pytest
import torch

from medical_ct import augmentation as augmentation_module
from medical_ct.augmentation import AugmentationParams, augment_batch
from medical_ct.calibration import (
    CalibratedClassifier,
    CalibrationParams,
    choose_review_threshold,
    expected_calibration_error,
    fit_temperature,
)
from medical_ct.model import (
    AvgMaxPool,
    build_classifier,
    feature_extractor,
    predict_probabilities,
)
from medical_ct.pipelines.data_processing.nodes import build_model_input, decode_images
from medical_ct.pipelines.training import nodes as training_nodes
from medical_ct.pipelines.training.nodes import TrainingParams, decide_training, train_model
from medical_ct.pipelines.training.stream import ShardStream
from medical_ct.registry import RegisteredClassifier, RegisteredVersion
from medical_ct.shards import ModelInputDataset, ShardedImagesDataset
from tests.conftest import CLASSES

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
SOURCES = ("raw", "feedback")
CALIBRATION = {"review_target_error_rate": 0.001, "ece_bins": 15}


@pytest.fixture(scope="module")
def model_input(sample_dir):
    partitions = {
        f"{p.parent.name}/{p.name}": (lambda p=p: p.read_bytes())
        for p in sorted(sample_dir.glob("*/*.jpeg"))
    }
    params = {"classes": CLASSES, "split": {"validation_fraction": 0.2, "test_fraction": 0.2}}
    empty = decode_images({}, None, params)
    return build_model_input(decode_images(partitions, None, params), empty, params)


def test_training_learns_logs_history_and_returns_a_cpu_model(model_input):
    """Six epochs: after three the sample's model is right on 65-70% of the validation split,
    underconfident beyond what the temperature grid's floor (0.5) can sharpen, and whether
    the floor's temperature lowers the ECE of 49 images is then a coin toss."""
    train, validation, _, class_names, _ = model_input
    params = {**PARAMS, "max_epochs": 6, "patience": 6}
    model, history, calibration = train_model(train, validation, class_names, params, CALIBRATION)

    assert isinstance(model, CalibratedClassifier)
    assert model.temperature.item() == pytest.approx(calibration["temperature"])
    assert {"temperature", "val_ece_uncalibrated", "val_ece", "review_threshold"} <= set(history)
    assert calibration["val_ece"] <= calibration["val_ece_uncalibrated"] + 1e-9
    assert 0 < calibration["review_threshold"] <= 1
    assert next(model.parameters()).device.type == "cpu"
    assert not model.training
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "best_epoch"} <= set(
        history
    )
    assert [point["step"] for point in history["val_accuracy"]] == [1, 2, 3, 4, 5, 6]
    assert history["train_loss"][-1]["value"] < history["train_loss"][0]["value"]
    accuracy = predict_probabilities(model, validation["images"]).argmax(1) == validation["labels"]
    assert accuracy.mean() > 0.6


def test_training_is_reproducible_with_a_seed(model_input):
    train, validation, _, class_names, _ = model_input
    params = {**PARAMS, "max_epochs": 1}
    first, _, _ = train_model(train, validation, class_names, params, CALIBRATION)
    second, _, _ = train_model(train, validation, class_names, params, CALIBRATION)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def sharded_model_input(sample_dir, tmp_path_factory):
    """The sample's model input saved and read back through the catalog's datasets, with 16
    images per shard: the training split spans 9 shards."""
    root = tmp_path_factory.mktemp("sharded")
    partitions = {
        f"{p.parent.name}/{p.name}": (lambda p=p: p.read_bytes())
        for p in sorted(sample_dir.glob("*/*.jpeg"))
    }
    params = {
        "classes": CLASSES,
        "split": {"validation_fraction": 0.2, "test_fraction": 0.2},
        "shard_images": 16,
    }
    stores = {source: ShardedImagesDataset(path=str(root / source)) for source in SOURCES}
    stores["raw"].save(decode_images(partitions, None, params))
    stores["feedback"].save(decode_images({}, None, params))
    *sets, class_names, _ = build_model_input(
        stores["raw"].load(), stores["feedback"].load(), params
    )
    loaded = []
    for name, data in zip(("train", "validation", "test"), sets, strict=True):
        dataset = ModelInputDataset(
            path=str(root / name), shards_from={s: str(root / s) for s in SOURCES}
        )
        dataset.save(data)
        loaded.append(dataset.load())
    return (*loaded, class_names)


def test_streaming_mixes_shards_and_yields_every_image_once_per_pass(sharded_model_input):
    train = sharded_model_input[0]
    generator = torch.Generator().manual_seed(1)
    stream = ShardStream(train, batch_size=16, shards_in_memory=2, generator=generator)
    shard_of = {int(p): shard for shard, group in enumerate(train.shard_groups()) for p in group}
    assert sorted(shard_of) == list(range(len(train["labels"])))
    assert len(set(shard_of.values())) > 4

    batches = list(stream)

    assert len(batches) == len(stream) == -(-len(train["labels"]) // 16)
    assert all(len(labels) == 16 for _, labels in batches[:-1])
    images = torch.cat([batch for batch, _ in batches]).numpy()
    by_bytes = {image.tobytes(): i for i, image in enumerate(train["images"])}
    order = [by_bytes[image.tobytes()] for image in images]
    assert sorted(order) == list(range(len(train["labels"])))
    first_batch_shards = {shard_of[i] for i in order[:16]}
    assert len(first_batch_shards) == 2, "a batch mixes the shards in memory"
    assert [b.tolist() for _, b in batches] != [b.tolist() for _, b in list(stream)]


def test_streaming_refuses_dataloader_workers_which_would_each_yield_every_image(
    sharded_model_input,
):
    stream = ShardStream(sharded_model_input[0], 16, 2, torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)

    with pytest.raises(RuntimeError, match="in DataLoader workers each would yield every image"):
        next(iter(loader))


def test_streaming_training_reaches_the_in_memory_test_accuracy(sharded_model_input):
    train, validation, test, class_names = sharded_model_input
    params = {**PARAMS, "max_epochs": 6, "patience": 6}
    correct = {}
    for data_path in ("memory", "stream"):
        model, _, _ = train_model(
            train,
            validation,
            class_names,
            {**params, "data_path": data_path, "shards_in_memory": 2},
            CALIBRATION,
        )
        predicted = predict_probabilities(model, test["images"]).argmax(1)
        correct[data_path] = int((predicted == test["labels"]).sum())
    print(f"test images right of {len(test['labels'])}: {correct}")
    assert correct["memory"] >= 0.8 * len(test["labels"])
    assert abs(correct["stream"] - correct["memory"]) <= 1


def test_auto_streams_above_the_threshold(sharded_model_input, caplog):
    train, validation, _, class_names = sharded_model_input
    params = {**PARAMS, "max_epochs": 1, "data_path": "auto", "stream_above_images": 10}
    with caplog.at_level("INFO"):
        train_model(train, validation, class_names, params, CALIBRATION)
    assert "streamed from shards" in caplog.text


def test_training_parameters_are_checked_once_into_a_typed_object():
    params = TrainingParams.from_params({**PARAMS, "augmentation": {"enabled": True}})
    assert params.max_epochs == 3 and params.learning_rate == 0.005
    assert params.augmentation.enabled and params.data_path == "auto"
    assert params.data_path_for(params.stream_above_images + 1) == "stream"
    assert params.data_path_for(10) == "memory"
    with pytest.raises(ValueError) as refused:
        TrainingParams.from_params({**PARAMS, "batch_size": 0, "learning_rate": "fast"})
    assert "batch_size must be a positive integer" in str(refused.value)
    assert "learning_rate must be a finite positive number" in str(refused.value)  # every problem


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"max_epochs": 0}, "max_epochs must be a positive integer"),
        ({"batch_size": "64"}, "batch_size must be a positive integer"),
        ({"learning_rate": -1}, "learning_rate must be a finite positive number"),
        ({"architecture": "no_such_net"}, "unknown architecture 'no_such_net'"),
        ({"data_path": "disk"}, "data_path must be one of auto, memory, stream, got 'disk'"),
        ({"shards_in_memory": 0}, "shards_in_memory must be a positive integer"),
        ({"stream_above_images": "big"}, "stream_above_images must be a positive integer"),
        (
            {"augmentation": {"enabled": True, "max_rotation_degrees": 400}},
            r"augmentation.max_rotation_degrees must be a number in \[0, 180\], got 400",
        ),
        ({"augmentation": {"enabled": "yes"}}, "augmentation.enabled must be true or false"),
        ({"augmentation": {"max_shear": 0.1}}, "augmentation has unknown keys \\['max_shear'\\]"),
        ({"augmentation": [10, 4]}, "augmentation must be a mapping"),
        ({"max_epoch": 3}, r"unknown keys \['max_epoch'\]; known: architecture, width"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0, got -0.1"),
        ({"width": "16"}, "width must be a positive integer, got '16'"),
        ({"pooling": "median"}, "pooling must be one of avg, avg_max, got 'median'"),
        ({"stem": "pool"}, "stem must be one of conv_pool, conv, got 'pool'"),
        ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "tpu"}, "device"),
    ],
)
def test_bad_training_parameters_are_refused(model_input, override, message):
    train, validation, _, class_names, _ = model_input
    with pytest.raises((ValueError, RuntimeError), match=message):
        train_model(train, validation, class_names, {**PARAMS, **override}, CALIBRATION)


# A champion's training manifest: 60 images, 10 of each class, the last 12 held out for test.
TRAINED_ON = pd.DataFrame(
    {
        "split": ["train"] * 42 + ["validation"] * 6 + ["test"] * 12,
        "content_hash": [f"{i:064x}" for i in range(60)],
        "label": CLASSES * 10,
    }
)
CHAMPION = RegisteredClassifier(None, "4", CLASSES, {"dataset_fingerprint": "a" * 64})


def decide(manifest: pd.DataFrame, min_new_images: int = 10) -> tuple[dict, dict]:
    versions = {"4": RegisteredVersion("4", "run", {}, dict, lambda: TRAINED_ON)}
    return decide_training("b" * 64, manifest, CHAMPION, versions, False, min_new_images)


def test_a_class_removed_or_added_trains_though_no_image_is_new():
    removed, _ = decide(TRAINED_ON[TRAINED_ON["label"] != "HeadCT"])
    assert removed["train"] is True and removed["new_images"] == 0
    assert removed["reason"] == "the classes differ from champion version 4's: HeadCT removed"
    new_class = pd.DataFrame({"split": ["train"], "content_hash": ["f" * 64], "label": ["Knee"]})
    added, _ = decide(pd.concat([TRAINED_ON[TRAINED_ON["label"] != "Hand"], new_class]))
    assert added["reason"].endswith(": Hand removed and Knee added")


def test_images_the_champion_learned_from_that_are_removed_count_toward_training():
    """A reviewer deleting wrong-modality images the champion trained on adds no (hash, label)
    pair: counting only new pairs, the run skipped and the champion kept what it learned from
    them. Removed test images change nothing the champion learned; a relabelled image counts
    once, as new."""
    learned = TRAINED_ON.index[TRAINED_ON["split"] != "test"]
    ten_gone = TRAINED_ON.drop(index=[*learned[:10], 50, 51])  # and two test images

    decision, metrics = decide(ten_gone)

    assert decision["train"] is True
    assert (decision["new_images"], decision["removed_images"]) == (0, 10)
    assert decision["reason"] == (
        "0 new or relabelled and 10 removed images since champion version 4's data "
        "(min_new_images 10)"
    )
    assert metrics["training.removed_images"] == {"value": 10, "step": 0}
    relabelled = ten_gone.assign(label=ten_gone["label"].replace({"CXR": "Hand", "Hand": "CXR"}))
    # 9 of the 28 images kept relabelled; the 10 removed and 10 more learned from (and 10 test)
    waiting, _ = decide(relabelled.iloc[:28], min_new_images=40)
    assert (waiting["train"], waiting["new_images"], waiting["removed_images"]) == (False, 9, 20)
    assert waiting["reason"].startswith(
        "9 new or relabelled and 20 removed images since champion version 4's data; "
        "min_new_images is 40: skipping training until 11 more are new or removed"
    )


def test_the_data_of_a_refused_challenger_is_not_trained_on_again():
    """Two images new against champion 4 trained version 5, which the gate refused; with the
    same data the next weeks counted the two images against the champion again and each
    registered another copy of version 5. Other data, or retrain_on_same_data, still trains."""
    two_new = pd.concat([TRAINED_ON, TRAINED_ON.iloc[:2].assign(content_hash=["e" * 64] * 2)])
    versions = {
        "4": RegisteredVersion("4", "run", {}, dict, lambda: TRAINED_ON),
        "5": RegisteredVersion("5", "run5", {"dataset_fingerprint": "b" * 64}, dict, dict),
    }

    def decide_on(fingerprint: str, retrain: bool = False) -> dict:
        return decide_training(fingerprint, two_new, CHAMPION, versions, retrain, 1)[0]

    again = decide_on("b" * 64)
    assert again["train"] is False
    assert again["reason"] == (
        "dataset fingerprint bbbbbbbbbbbb is the one version 5 was trained on, registered "
        "after champion version 4 and not promoted: skipping training and evaluation, "
        "registering nothing until new data arrives (or set retrain_on_same_data=true)"
    )
    assert decide_on("c" * 64)["train"] is True
    assert decide_on("b" * 64, retrain=True)["train"] is True


def test_feedback_a_version_rolled_back_from_added_waits_until_revoked_or_confirmed():
    """Version 5 trained on 12 bad feedback labels (f0..f11) and was rolled back to 4. The
    next week skipped (same fingerprint); the week after one new image changed the
    fingerprint, and the 12 labels trained again and were promoted (hunt of 2026-12-04). They
    now wait until revoked, or until a person says the rest are right."""
    with_feedback = TRAINED_ON.assign(feedback_id="")
    bad = with_feedback.iloc[:12].assign(
        content_hash=[f"{i:064x}" for i in range(100, 112)],
        feedback_id=[f"f{i}" for i in range(12)],
    )
    new_image = TRAINED_ON.iloc[:1].assign(content_hash=["e" * 64], feedback_id="")
    champion = RegisteredClassifier(
        None,
        "4",
        CLASSES,
        {
            "dataset_fingerprint": "a" * 64,
            "champion.rolled_back_data": "5:" + "b" * 64,
            "champion.rolled_back_to_reason": "bad labels in batch 12",
        },
    )
    versions = {
        "4": RegisteredVersion("4", "run", {}, dict, lambda: with_feedback),
        "5": RegisteredVersion("5", "run5", {}, dict, lambda: pd.concat([with_feedback, bad])),
    }

    def decide_on(manifest: pd.DataFrame, retrain: bool = False) -> dict:
        return decide_training("c" * 64, manifest, champion, versions, retrain, 1)[0]

    held = decide_on(pd.concat([with_feedback, bad, new_image]))
    assert held["train"] is False
    assert held["reason"] == (
        "12 accepted feedback label(s) that version(s) 5 added over champion version 4 are "
        "still in the data (f0, f1, f10, f11, f2, f3, f4, f5, f6, f7, ...), and version(s) 5 "
        "were rolled back (bad labels in batch 12): skipping training until a reviewer "
        "revokes the wrong ones (POST /review/revoke); when the rest are right, set "
        "retrain_on_same_data=true once to train on them"
    )
    assert decide_on(pd.concat([with_feedback, bad.iloc[:2], new_image]))["train"] is False
    assert decide_on(pd.concat([with_feedback, bad, new_image]), retrain=True)["train"] is True
    all_revoked = decide_on(pd.concat([with_feedback, new_image]))
    assert all_revoked["train"] is True and all_revoked["new_images"] == 1
    # feedback that came after version 5 was never rolled back from
    later = bad.assign(feedback_id=[f"g{i}" for i in range(12)])
    assert decide_on(pd.concat([with_feedback, later]))["train"] is True


CUDA_DEVICES = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"learning_rate": float("nan")}, "learning_rate must be a finite positive number"),
        ({"learning_rate": float("inf")}, "learning_rate must be a finite positive number"),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0, got nan"),
        ({"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0, got inf"),
        ({"seed": 2**32}, r"seed must be below 2\*\*32"),
        ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ({"device": ""}, "device must be auto, cpu, cuda or cuda:N, got ''"),
        ({"device": f"cuda:{CUDA_DEVICES}"}, "CUDA device"),
    ],
)
def test_parameters_that_would_fail_later_are_refused_up_front(override, message):
    with pytest.raises(ValueError, match=message):
        TrainingParams.from_params({**PARAMS, **override})


def test_every_usable_device_is_accepted():
    usable = ["auto", "cpu"] + (["cuda", f"cuda:{CUDA_DEVICES - 1}"] if CUDA_DEVICES else [])
    for device in usable:
        assert TrainingParams.from_params({**PARAMS, "device": device}).device == device


AUGMENTATION = {
    "enabled": True,
    "max_rotation_degrees": 10,
    "max_shift_pixels": 4,
    "max_zoom": 0.15,
    "max_gain": 0.2,
    "max_gamma": 0.3,
    "invert_probability": 0.1,
    "probability": 0.8,
}


def test_augmentation_varies_a_batch_reproducibly_and_off_is_the_identity():
    images = torch.randint(0, 256, (32, 1, 64, 64), dtype=torch.uint8)
    params = AugmentationParams.from_params(AUGMENTATION)

    first = augment_batch(images, params, torch.Generator().manual_seed(3))
    again = augment_batch(images, params, torch.Generator().manual_seed(3))

    assert first.shape == images.shape and first.dtype == torch.float32
    assert first.min() >= 0 and first.max() <= 255
    torch.testing.assert_close(first, again)
    changed = (first != images.float()).flatten(1).any(1)
    assert 16 <= changed.sum() < 32, "about 80% of the images are varied, the rest kept"
    for off in (None, {**AUGMENTATION, "enabled": False}, {"enabled": True}):
        kept = augment_batch(
            images, AugmentationParams.from_params(off), torch.Generator().manual_seed(3)
        )
        torch.testing.assert_close(kept, images.float())


def test_a_moved_image_keeps_its_surround_instead_of_black_corners():
    image = torch.full((1, 1, 64, 64), 90, dtype=torch.uint8)  # a grey CT-like surround
    image[0, 0, 30:34, 30:34] = 200
    geometry = AugmentationParams(
        enabled=True, max_rotation_degrees=30, max_shift_pixels=8, max_zoom=0.2
    )
    moved = augment_batch(image, geometry, torch.Generator().manual_seed(0))[0, 0]
    assert not torch.equal(moved, image[0, 0].float())
    assert moved.min() >= 89.9, "pixels from outside the image repeat its edge"
    assert moved.max() > 150, "the bright square is still there"


def test_a_framed_image_is_a_smaller_picture_on_a_plain_surround():
    hand = torch.zeros((4, 1, 64, 64), dtype=torch.uint8)  # a dark film with a bright bone
    hand[:, 0, 20:44, 28:36] = 250
    framing = AugmentationParams(enabled=True, frame_probability=1, frame_size=0.4)
    framed = augment_batch(hand, framing, torch.Generator().manual_seed(1))[:, 0]

    for image in framed:
        bright_bone = (image > 200).sum()
        assert 0 < bright_bone < (hand[0, 0] > 200).sum(), "the picture is smaller"
        border = torch.cat([image[0], image[-1], image[:, 0], image[:, -1]])
        assert border.max() - border.min() < 1, "the surround is one plain grey"
    surrounds = {round(float(image[0, 0])) for image in framed}
    assert len(surrounds) == 4, "each image gets its own surround grey"
    assert augment_batch(hand, framing, torch.Generator().manual_seed(1)).equal(framed[:, None])


@pytest.mark.parametrize("data_path", ["memory", "stream"])
def test_only_training_batches_are_augmented_in_memory_and_streamed(
    sharded_model_input, monkeypatch, data_path
):
    train, validation, _, class_names = sharded_model_input
    seen = []

    def spy(images, params, generator):
        seen.append(images.clone())
        return augmentation_module.augment_batch(images, params, generator)

    monkeypatch.setattr(training_nodes, "augment_batch", spy)
    params = {**PARAMS, "max_epochs": 2, "data_path": data_path, "shards_in_memory": 2}
    _, history, _ = train_model(
        train, validation, class_names, {**params, "augmentation": AUGMENTATION}, CALIBRATION
    )

    assert sum(len(batch) for batch in seen) == 2 * len(train["labels"])
    trained_on = {image.numpy().tobytes() for batch in seen for image in batch}
    assert trained_on == {image.tobytes() for image in train["images"]}
    assert not trained_on & {image.tobytes() for image in validation["images"]}
    assert history["train_loss"][-1]["value"] < history["train_loss"][0]["value"]


def test_divergence_is_a_clear_error(model_input):
    train, validation, _, class_names, _ = model_input
    with pytest.raises(ValueError, match="training diverged"):
        train_model(train, validation, class_names, {**PARAMS, "learning_rate": 1e30}, CALIBRATION)


def test_torchvision_architectures_take_grayscale_input():
    model = build_classifier("resnet18", num_classes=6).eval()
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    assert predict_probabilities(model, images).shape == (2, 6)


@pytest.mark.parametrize(
    ("stem", "sides"), [("conv", [64, 32, 16, 8]), ("conv_pool", [64, 16, 8, 4])]
)
def test_a_pooling_stem_gives_blocks_two_to_four_a_quarter_of_the_pixels(stem, sides):
    model = build_classifier("small_cnn", num_classes=6, width=4, stem=stem).eval()
    seen = []
    for layer in model.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.register_forward_hook(lambda _, inputs, __: seen.append(inputs[0].shape[-1]))

    logits = model(torch.zeros(2, 1, 64, 64, dtype=torch.uint8))

    assert seen == sides  # the side of each block's input
    assert logits.shape == (2, 6)


def test_avg_max_pooling_keeps_a_small_objects_response_that_averaging_dilutes():
    features = torch.zeros(1, 2, 8, 8)
    features[0, 0, 3, 4] = 64.0  # one strong response: a small object
    features[0, 1] = 1.0  # a response everywhere: the background

    pooled = AvgMaxPool()(features)

    assert pooled.tolist() == [[1.0, 1.0, 64.0, 1.0]]  # averages, then maxima
    model = build_classifier("small_cnn", num_classes=6, width=4, pooling="avg_max").eval()
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    assert predict_probabilities(model, images).shape == (2, 6)


def test_features_of_an_avg_max_model_are_its_average_pooling_as_module_and_exported():
    """Review's out-of-distribution flag and monitoring's drift measure these features."""
    model = build_classifier("small_cnn", num_classes=6, width=4, pooling="avg_max").eval()
    images = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    pool = next(module for module in model.modules() if isinstance(module, AvgMaxPool))
    averages = []
    pool.register_forward_hook(lambda _m, inputs, _o: averages.append(inputs[0].mean((2, 3))))

    from_module = feature_extractor(model)(images)
    from_graph = feature_extractor(torch.export.export(model, (images,)).module())(images)

    assert from_module.shape == (3, 32)  # the last block's 32 channels, not 64
    torch.testing.assert_close(from_module, averages[0])
    torch.testing.assert_close(from_graph, from_module)


def overconfident_logits(seed: int = 0, images: int = 2000, accuracy: float = 0.7):
    """Logits of a model that is right 70% of the time but always says it is ~99.9% sure."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, images)
    wrong = rng.random(images) > accuracy
    predicted = np.where(wrong, (labels + rng.integers(1, 6, images)) % 6, labels)
    logits = rng.normal(0, 0.5, (images, 6))
    logits[np.arange(images), predicted] += 8.0
    return logits, labels


def test_the_temperature_is_learned_and_lowers_the_ece_of_an_overconfident_model():
    logits, labels = overconfident_logits()
    temperature = fit_temperature(logits, labels)
    before = torch.softmax(torch.from_numpy(logits), 1).numpy()
    after = torch.softmax(torch.from_numpy(logits / temperature), 1).numpy()

    assert temperature > 2, "an overconfident model must be cooled down, not left at 1.0"
    ece_before = expected_calibration_error(before, labels, 15)
    ece_after = expected_calibration_error(after, labels, 15)
    assert ece_before > 0.25
    assert ece_after < ece_before / 4
    # Scaling never changes the predicted class.
    assert (after.argmax(1) == before.argmax(1)).all()


def test_the_temperature_is_fitted_in_bounded_memory_to_the_same_value(monkeypatch):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (20_000, 6))
    mostly_right = np.where(rng.random(20_000) < 0.8, logits.argmax(1), rng.integers(0, 6, 20_000))
    largest = []
    log_softmax = torch.log_softmax

    def measured(tensor, *args, **kwargs):
        largest.append(tensor.numel() * tensor.element_size())
        return log_softmax(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "log_softmax", measured)
    # The grid points the all-at-once fit (501 x 20,000 x 6 float64, 481 MB) chose.
    assert fit_temperature(logits, mostly_right) == 1.5346037025787944
    assert fit_temperature(logits[:777] * 3, mostly_right[:777]) == 4.641028539758684
    assert max(largest) <= 16 * 2**20


def test_the_calibrated_model_outputs_log_probabilities_of_the_scaled_logits():
    backbone = build_classifier("small_cnn", num_classes=6, width=4).eval()
    calibrated = CalibratedClassifier(backbone, temperature=2.5).eval()
    images = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        expected = torch.softmax(backbone(images) / 2.5, 1)
        output = calibrated(images)
    torch.testing.assert_close(output.exp(), expected)
    torch.testing.assert_close(output.exp().sum(1), torch.ones(3))
    # predict_probabilities (a softmax of the output) gives the same probabilities.
    np.testing.assert_allclose(predict_probabilities(calibrated, images), expected, rtol=1e-5)


def test_the_review_threshold_is_the_lowest_confidence_that_meets_the_target():
    # Confidence of 10 answers, most confident first; the 4th and 8th are wrong.
    confidence = np.array([0.99, 0.98, 0.97, 0.96, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = np.ones(10, dtype=bool)
    correct[[3, 7]] = False
    rest = (1 - confidence) / 2
    probabilities = np.stack([confidence, rest, rest], axis=1)
    labels = np.where(correct, 0, 1)

    # No error allowed: only the 3 answers above the first error are answered.
    assert choose_review_threshold(probabilities, labels, 0.001) == 0.97
    # 15% allowed: down to the 7th answer (1 error in 7); 2 in 8, 9 or 10 is too many.
    assert choose_review_threshold(probabilities, labels, 0.15) == 0.7
    # Two errors in 10 allowed: everything is answered.
    assert choose_review_threshold(probabilities, labels, 0.2) == 0.4
    # The most confident answer is wrong: every answer needs a review.
    assert choose_review_threshold(probabilities, 1 - labels, 0.001) >= 0.99


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        ({"review_target_error_rate": 0}, "strictly between 0 and 1"),
        ({"review_target_error_rate": 1.5}, "strictly between 0 and 1"),
        ({"review_target_error_rate": "0.1%"}, "strictly between 0 and 1"),
        ({"review_target_error_rate": 0.01, "ece_bins": 1}, "ece_bins must be an integer"),
        (None, "must be a mapping"),
    ],
)
def test_bad_calibration_parameters_are_refused(calibration, message):
    with pytest.raises(ValueError, match=message):
        CalibrationParams.from_params(calibration)
