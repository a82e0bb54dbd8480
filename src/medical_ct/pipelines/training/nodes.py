"""Nodes of the training pipeline: train the classifier with early stopping, then calibrate it."""

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from medical_ct import lifecycle
from medical_ct.augmentation import AugmentationParams, augment_batch, augmentation_problems
from medical_ct.calibration import (
    CalibratedClassifier,
    CalibrationParams,
    choose_review_threshold,
    expected_calibration_error,
    fit_temperature,
)
from medical_ct.checks import is_number
from medical_ct.model import POOLINGS, STEMS, TrainingSkipped, build_classifier
from medical_ct.pipelines.training.stream import ShardStream
from medical_ct.registry import RegisteredClassifier, RegisteredVersion

logger = logging.getLogger(__name__)


def decide_training(
    dataset_fingerprint: str,
    training_manifest: pd.DataFrame,
    champion: RegisteredClassifier | None,
    registered_versions: dict[str, RegisteredVersion],
    retrain_on_same_data: bool,
    min_new_images: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train only when enough is new since the champion's data, and never on data rolled back from.

    A weekly run that finds nothing new, or only a handful of images, costs seconds and
    registers nothing: a new version per stray image would churn the champion for noise.
    What counts toward ``min_new_images`` is every image that changed since the champion's
    training manifest: new, an image (content hash) with a label the manifest does not have (a
    new raw image or an accepted feedback, including a relabelled one); and removed, an image
    the champion learned from (its training or validation split) that the data no longer has,
    such as wrong-modality images a reviewer deleted, which the champion would otherwise keep
    answering from. A class added or removed trains whatever the count: removing one adds no
    image, and the champion would keep answering a class the data no longer has. After a
    rollback the data of the version rolled back away from is refused the same way (the
    champion's tag ``champion.rolled_back_data``), and so is the data of a version registered
    after the champion and not promoted (the ``challenger``): its images would still count as
    new against the champion's, and every week would register another copy of it. Other data
    after a rollback waits too while it still holds accepted feedback that a version rolled
    back from added (``_held_feedback``): bad labels are a common reason to roll back, and
    they would train again with the next new image. ``retrain_on_same_data`` trains anyway.

    Args:
        dataset_fingerprint: This run's model input fingerprint (from the data report).
        training_manifest: This run's model input, one row per image.
        champion: The registry's champion, whose version tag ``dataset_fingerprint`` says what
            it was trained on; ``None`` before the first promotion.
        registered_versions: Every version; the champion's training manifest is read from it,
            and the fingerprints of versions registered after the champion from their tags.
        retrain_on_same_data: Train anyway (e.g. after changing the training parameters).
        min_new_images: New and removed images needed to train.

    Returns:
        ``{"train": bool, "reason": str, "new_images": int | None, "removed_images": int |
        None, "champion_version": str | None}``, and both counts as MLflow metrics
        (``training.new_images``, ``training.removed_images``; -1 when they cannot be counted).
    """
    if not isinstance(retrain_on_same_data, bool):
        raise ValueError(
            f"parameter retrain_on_same_data must be true or false, got {retrain_on_same_data!r}"
        )
    if (
        not isinstance(min_new_images, int)
        or isinstance(min_new_images, bool)
        or min_new_images < 1
    ):
        raise ValueError(
            f"parameter min_new_images must be an integer >= 1, got {min_new_images!r}"
        )
    if champion is None:
        changes, decision = None, {"train": True, "reason": "no champion yet"}
    else:
        trained_on = _manifest_of(registered_versions, champion.version)
        changes = None if trained_on is None else _changed_images(training_manifest, trained_on)
        held = _held_feedback(training_manifest, trained_on, champion, registered_versions)
        classes = set(training_manifest["label"].unique().tolist())
        decision = _decision(
            dataset_fingerprint,
            champion,
            registered_versions,
            changes,
            classes,
            retrain_on_same_data,
            min_new_images,
        )
        if held and decision["train"] and not retrain_on_same_data:
            decision = {"train": False, "reason": _held_reason(held, champion)}
    new, removed = changes or (None, None)
    decision |= {
        "new_images": new,
        "removed_images": removed,
        # evaluation refuses to promote when the champion moved since (a rollback meanwhile)
        "champion_version": champion.version if champion else None,
    }
    logger.info("Training decision: %s", decision["reason"])
    metrics = {
        f"training.{name}": {"value": -1 if count is None else count, "step": 0}
        for name, count in (("new_images", new), ("removed_images", removed))
    }
    return decision, metrics


def _decision(
    fingerprint: str,
    champion: RegisteredClassifier,
    versions: dict[str, RegisteredVersion],
    changes: tuple[int, int] | None,
    classes: set[str],
    retrain: bool,
    minimum: int,
) -> dict[str, Any]:
    rolled_back_from = lifecycle.rolled_back_data(champion.tags)
    if fingerprint in rolled_back_from and not retrain:
        return {
            "train": False,
            "reason": (
                f"dataset fingerprint {fingerprint[:12]} is the one version "
                f"{rolled_back_from[fingerprint]} was trained on, and that version was "
                f"rolled back to champion version {champion.version}: skipping training and "
                "evaluation, registering nothing until new data arrives (or set "
                "retrain_on_same_data=true)"
            ),
        }
    if retrain:
        return {"train": True, "reason": "retrain_on_same_data is true"}
    if champion.tags.get("dataset_fingerprint") == fingerprint:
        return {
            "train": False,
            "reason": (
                f"dataset fingerprint {fingerprint[:12]} is the one champion version "
                f"{champion.version} was trained on: skipping training and evaluation, "
                "registering nothing"
            ),
        }
    refused = _refused_on_same_data(fingerprint, champion, versions)
    if refused is not None:
        return {
            "train": False,
            "reason": (
                f"dataset fingerprint {fingerprint[:12]} is the one version {refused} was "
                f"trained on, registered after champion version {champion.version} and not "
                "promoted: skipping training and evaluation, registering nothing until new "
                "data arrives (or set retrain_on_same_data=true)"
            ),
        }
    if classes != set(champion.class_names):
        return {"train": True, "reason": _class_change(classes, champion)}
    return _enough_changed(champion, changes, minimum)


def _refused_on_same_data(
    fingerprint: str,
    champion: RegisteredClassifier,
    versions: dict[str, RegisteredVersion],
) -> str | None:
    """The latest version registered after the champion on this very data, if any.

    Such a version (the ``challenger``) went through the gate and was not promoted: training
    on the same images again registers a copy of it every week, since the images it added
    are still new against the champion's.
    """
    same = [
        int(number)
        for number, details in versions.items()
        if number.isdigit()
        and int(number) > int(champion.version)
        and details.tags.get(lifecycle.DATASET_FINGERPRINT) == fingerprint
    ]
    return str(max(same)) if same else None


def _enough_changed(
    champion: RegisteredClassifier, changes: tuple[int, int] | None, minimum: int
) -> dict[str, Any]:
    """Same classes, other data: train once ``minimum`` images are new, relabelled or removed."""
    if changes is None:
        return {
            "train": True,
            "reason": f"the data differs from champion version {champion.version}'s "
            "(its run has no training manifest to count the new images)",
        }
    new, removed = changes
    counts = (
        f"{new} new or relabelled and {removed} removed images since champion version "
        f"{champion.version}'s data"
    )
    if new + removed < minimum:
        return {
            "train": False,
            "reason": (
                f"{counts}; min_new_images is {minimum}: skipping training until "
                f"{minimum - new - removed} more are new or removed "
                "(or set retrain_on_same_data=true)"
            ),
        }
    return {"train": True, "reason": f"{counts} (min_new_images {minimum})"}


def _class_change(classes: set[str], champion: RegisteredClassifier) -> str:
    """The classes the data lost or gained since the champion's, in words."""
    removed = sorted(set(champion.class_names) - classes)
    added = sorted(classes - set(champion.class_names))
    changes = [
        f"{', '.join(names)} {what}"
        for names, what in ((removed, "removed"), (added, "added"))
        if names
    ]
    return f"the classes differ from champion version {champion.version}'s: {' and '.join(changes)}"


# The splits a model learns from: the early stopping and the calibration fit on validation.
LEARNED_SPLITS = ("train", "validation")


def _manifest_of(versions: dict[str, RegisteredVersion], version: str) -> pd.DataFrame | None:
    """The training manifest of ``version`` (None when it has none, or is not listed)."""
    try:
        return versions[version].read_manifest()
    except (KeyError, FileNotFoundError):
        return None


def _held_feedback(
    manifest: pd.DataFrame,
    trained_on: pd.DataFrame | None,
    champion: RegisteredClassifier,
    versions: dict[str, RegisteredVersion],
) -> dict[str, list[str]]:
    """``{version: feedback ids}``: the accepted feedback that each version rolled back away
    from (to reach the champion) added over the champion's data and that ``manifest`` still
    holds.

    A rollback for bad labels held only while the fingerprint stayed the same: the next new
    image changed it, and the bad labels trained again and could be promoted. Until those
    labels are revoked, or a person says they are right, they wait. A champion without a
    manifest holds back everything the version rolled back from trained on.
    """
    now = _feedback_ids(manifest)
    if not now:
        return {}
    before = set() if trained_on is None else _feedback_ids(trained_on)
    held = {}
    for version in sorted(set(lifecycle.rolled_back_data(champion.tags).values()), key=int):
        rolled_back = _manifest_of(versions, version)
        if rolled_back is None:
            logger.warning(
                "Version %s was rolled back from, and its training manifest cannot be read: "
                "the feedback it added cannot be held back from training",
                version,
            )
        elif still := sorted((_feedback_ids(rolled_back) - before) & now):
            held[version] = still
    return held


def _feedback_ids(manifest: pd.DataFrame) -> set[str]:
    """The feedback ids of a manifest's images (none for raw images, nor an older manifest)."""
    if "feedback_id" not in manifest:
        return set()
    return set(manifest["feedback_id"].dropna().tolist()) - {""}


def _held_reason(held: dict[str, list[str]], champion: RegisteredClassifier) -> str:
    """Why a run with held-back feedback waits, and the two ways on."""
    ids = sorted({feedback_id for ids in held.values() for feedback_id in ids})
    versions = ", ".join(held)
    why = champion.tags.get(lifecycle.ROLLED_BACK_TO_REASON)
    return (
        f"{len(ids)} accepted feedback label(s) that version(s) {versions} added over champion "
        f"version {champion.version} are still in the data ({', '.join(ids[:10])}"
        f"{', ...' if len(ids) > 10 else ''}), and version(s) {versions} were rolled back"
        f"{f' ({why})' if why else ''}: skipping training until a reviewer revokes the wrong "
        "ones (POST /review/revoke); when the rest are right, set retrain_on_same_data=true "
        "once to train on them"
    )


def _changed_images(manifest: pd.DataFrame, trained_on: pd.DataFrame) -> tuple[int, int]:
    """How many images are new and how many removed since the champion's manifest.

    New: (content hash, label) pairs of ``manifest`` absent from the champion's manifest.
    Removed: images of the champion's training and validation splits whose content hash
    ``manifest`` no longer has; a relabelled image is counted once, as new.
    """
    learned = trained_on["split"].isin(LEARNED_SPLITS).to_numpy()
    columns = trained_on[["content_hash", "label"]]  # not the manifest's five other columns
    seen, held_out, now = map(_pairs, (columns[learned], columns[~learned], manifest))
    new = now - seen - held_out
    gone = {digest for digest, _ in seen - now} - {digest for digest, _ in new}
    return len(new), len(gone)


def _pairs(table: pd.DataFrame) -> set[tuple[str, str]]:
    """The (content hash, label) pairs of a manifest."""
    # lists: iterating Arrow strings is slow
    return set(zip(table["content_hash"].tolist(), table["label"].tolist(), strict=True))


def train_model(
    train_set: dict,
    validation_set: dict,
    class_names: list[str],
    training: dict[str, Any],
    calibration: dict[str, Any],
    training_decision: dict[str, Any] | None = None,
) -> tuple[nn.Module | TrainingSkipped, dict[str, list[dict[str, float]]], dict[str, Any]]:
    """Train a classifier, stopping when validation loss stops improving, then calibrate it.

    Calibration is part of training, not of serving: the returned model divides its logits
    by the temperature fitted on the validation split, so the registered model, and every
    consumer of it, gives calibrated probabilities.

    Args:
        train_set: ``images`` (n, 1, H, W) uint8 and ``labels`` int64.
        validation_set: Same layout, used for early stopping.
        class_names: Class names, index = label.
        training: ``architecture``, ``width``, ``max_epochs``, ``batch_size``,
            ``learning_rate``, ``weight_decay``, ``patience``, ``seed``, ``device``
            (``auto`` picks CUDA when present), ``num_threads`` (0 = torch's default).
        calibration: ``review_target_error_rate``, ``ece_bins`` (see ``CalibrationParams``).
        training_decision: From ``decide_training``; ``None`` trains.

    Returns:
        The calibrated model (``CalibratedClassifier``) with the weights of its best
        validation epoch (on the CPU); the per-epoch history of train/validation loss and
        accuracy, and the validation ECE before and after calibration, for MLflow; and the
        calibration (temperature, review threshold, validation ECE). Or ``TrainingSkipped``,
        no history and ``{"skipped": reason}`` when the decision was not to train.
    """
    if training_decision is not None and not training_decision["train"]:
        reason = training_decision["reason"]
        return TrainingSkipped(reason), {}, {"skipped": reason}
    params = TrainingParams.from_params(training)
    calibration_params = CalibrationParams.from_params(calibration)
    if len(train_set["labels"]) == 0 or len(validation_set["labels"]) == 0:
        raise ValueError(
            f"cannot train with {len(train_set['labels'])} training and "
            f"{len(validation_set['labels'])} validation images; add images to the raw store"
        )
    _seed_everything(params.seed)
    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    device = _select_device(params.device)
    model = build_classifier(
        params.architecture, len(class_names), params.width, params.pooling, params.stem
    )
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=params.learning_rate,
        weight_decay=params.weight_decay,
    )
    max_epochs, batch_size = params.max_epochs, params.batch_size
    generator = torch.Generator().manual_seed(params.seed)
    data_path = params.data_path_for(len(train_set["labels"]))
    if data_path == "stream":
        train_batches = ShardStream(train_set, batch_size, params.shards_in_memory, generator)
    else:
        train_batches = _MemoryBatches(*_to_tensors(train_set, device), batch_size, generator)
    validation_x, validation_y = _to_tensors(validation_set, device)
    # Its own generator: the batches' order is the same with augmentation on or off.
    augmentation_generator = torch.Generator().manual_seed(params.seed + 1)

    def augment(images: torch.Tensor) -> torch.Tensor:
        return augment_batch(images, params.augmentation, augmentation_generator)

    steps = max_epochs * len(train_batches)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=params.learning_rate, total_steps=steps
    )
    history: dict[str, list[dict[str, float]]] = {}
    best_loss, best_state, best_epoch = float("inf"), None, 0
    logger.info(
        "Training %s on %s: %d train (%s, %s) / %d validation images, up to %d epochs",
        params.architecture,
        device,
        len(train_set["labels"]),
        "streamed from shards" if data_path == "stream" else "in memory",
        "augmented" if params.augmentation.active else "not augmented",
        len(validation_y),
        max_epochs,
    )
    for epoch in range(1, max_epochs + 1):
        started = time.perf_counter()
        train_loss, train_accuracy = _train_one_epoch(
            model,
            optimizer,
            scheduler,
            train_batches,
            augment,
            device,
            f"Epoch {epoch}/{max_epochs}",
        )
        validation_loss, validation_accuracy = evaluate_loss(model, validation_x, validation_y)
        for name, value in {
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "val_loss": validation_loss,
            "val_accuracy": validation_accuracy,
            "epoch_seconds": time.perf_counter() - started,
        }.items():
            history.setdefault(name, []).append({"value": value, "step": epoch})
        logger.info(
            "Epoch %d: train loss %.4f acc %.4f | validation loss %.4f acc %.4f",
            epoch,
            train_loss,
            train_accuracy,
            validation_loss,
            validation_accuracy,
        )
        if validation_loss < best_loss:
            best_loss, best_epoch = validation_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= params.patience:
            logger.info("Early stopping: no validation improvement since epoch %d", best_epoch)
            break
    if best_state is None:
        raise ValueError(
            "training diverged: the validation loss was not a number in any epoch; "
            "lower training.learning_rate"
        )
    model.load_state_dict(best_state)
    history["best_epoch"] = [{"value": best_epoch, "step": 0}]
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    calibrated, report = calibrate(model, validation_set, calibration_params)
    for name in ("temperature", "val_ece_uncalibrated", "val_ece", "review_threshold"):
        history[name] = [{"value": report[name], "step": 0}]
    return calibrated, history, report


@torch.inference_mode()
def calibrate(
    model: nn.Module, validation_set: dict, params: CalibrationParams
) -> tuple[CalibratedClassifier, dict[str, Any]]:
    """Fit the temperature and choose the review threshold on the validation split.

    Returns:
        The calibrated model (in eval mode) and what was fitted: ``temperature``,
        ``review_threshold``, ``review_target_error_rate``, the validation ECE before
        (``val_ece_uncalibrated``) and after (``val_ece``), and the validation share of
        images that would need a review.
    """
    labels = validation_set["labels"]
    images = torch.from_numpy(validation_set["images"])
    logits = torch.cat(
        [model(images[start : start + 1024]) for start in range(0, len(images), 1024)]
    )
    logits = logits.double()
    temperature = fit_temperature(logits.numpy(), labels)
    before = torch.softmax(logits, dim=1).numpy()
    after = torch.softmax(logits / temperature, dim=1).numpy()
    threshold = choose_review_threshold(after, labels, params.review_target_error_rate)
    report = {
        "temperature": temperature,
        "review_threshold": threshold,
        "review_target_error_rate": params.review_target_error_rate,
        "ece_bins": params.ece_bins,
        "val_ece_uncalibrated": expected_calibration_error(before, labels, params.ece_bins),
        "val_ece": expected_calibration_error(after, labels, params.ece_bins),
        "val_review_rate": float((after.max(1) < threshold).mean()),
        "validation_images": len(labels),
    }
    logger.info(
        "Calibration: temperature %.3f, validation ECE %.4f -> %.4f; review threshold %.4f "
        "(error rate of answered validation images <= %g, %.1f%% of them to review)",
        temperature,
        report["val_ece_uncalibrated"],
        report["val_ece"],
        threshold,
        params.review_target_error_rate,
        100 * report["val_review_rate"],
    )
    return CalibratedClassifier(model, temperature).eval(), report


@torch.inference_mode()
def evaluate_loss(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on a labelled set."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        batch_labels = labels[start : start + batch_size]
        total_loss += nn.functional.cross_entropy(logits, batch_labels, reduction="sum").item()
        correct += (logits.argmax(1) == batch_labels).sum().item()
    count = max(len(labels), 1)
    return total_loss / count, correct / count


def _train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    augment: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    description: str,
) -> tuple[float, float]:
    model.train()
    total_loss, correct, count = 0.0, 0, 0
    with tqdm(batches, desc=description, unit=" batches", leave=False) as progress:
        for images, labels in progress:
            batch_images = augment(images.to(device)).contiguous(memory_format=torch.channels_last)
            batch_labels = labels.to(device)
            logits = model(batch_images)
            loss = nn.functional.cross_entropy(logits, batch_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(batch_labels)
            correct += (logits.argmax(1) == batch_labels).sum().item()
            count += len(batch_labels)
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return total_loss / count, correct / count


class _MemoryBatches:
    """Shuffled batches of a training split held in memory (one permutation per pass)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.generator = batch_size, generator

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.labels), generator=self.generator).to(self.labels.device)
        for start in range(0, len(self.labels), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.images[index], self.labels[index]


def _to_tensors(data: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(data["images"]).to(device)
    images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.from_numpy(data["labels"]).to(device)


def _select_device(requested: str) -> torch.device:
    """The device ``TrainingParams`` checked: ``auto`` picks CUDA when present."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _device_problems(requested: Any) -> list[str]:
    """Why ``requested`` is no device of this machine to train on (torch's errors come later
    and do not name the parameter: "Expected one of cpu, cuda, ...", "invalid device ordinal")."""
    if requested == "auto":
        return []
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return [f"device must be auto, cpu, cuda or cuda:N, got {requested!r}"]
    if device.type == "cpu":
        return []
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return [f"device is {requested!r} but no CUDA device is available: set auto or cpu"]
    if (device.index or 0) >= count:
        return [
            f"device is {requested!r} but this machine has {count} CUDA device(s): "
            f"set auto, cpu, cuda or cuda:0 to cuda:{count - 1}"
        ]
    return []


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


DATA_PATHS = ("auto", "memory", "stream")


@dataclass(frozen=True)
class TrainingParams:
    """The ``training`` parameters, checked once (every problem listed in one error).

    ``device``: ``auto`` picks CUDA when present; ``num_threads`` 0 keeps torch's default;
    ``data_path``: ``memory``, ``stream`` or ``auto`` (stream above ``stream_above_images``).
    """

    architecture: str
    width: int
    max_epochs: int
    patience: int
    batch_size: int
    learning_rate: float
    seed: int
    weight_decay: float = 0.0
    pooling: str = "avg_max"
    stem: str = "conv_pool"
    device: str = "auto"
    num_threads: int = 0
    data_path: str = "auto"
    stream_above_images: int = 1_000_000
    shards_in_memory: int = 4
    augmentation: AugmentationParams = field(default_factory=AugmentationParams)

    @classmethod
    def from_params(cls, training: dict[str, Any]) -> "TrainingParams":
        problems = []
        positive_ints = ("width", "max_epochs", "patience", "batch_size")
        for key in (*positive_ints, "stream_above_images", "shards_in_memory"):
            value = training.get(key, 1 if key not in positive_ints else None)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{key} must be a positive integer, got {value!r}")
        learning_rate, weight_decay = training.get("learning_rate"), training.get("weight_decay", 0)
        # NaN fails every comparison and inf passes them: both would train to a divergence.
        if not is_number(learning_rate) or not 0 < learning_rate < math.inf:
            problems.append(
                f"learning_rate must be a finite positive number, got {learning_rate!r}"
            )
        if not is_number(weight_decay) or not 0 <= weight_decay < math.inf:
            problems.append(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        for key, default in (("seed", None), ("num_threads", 0)):
            value = training.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{key} must be a non-negative integer, got {value!r}")
        if isinstance(training.get("seed"), int) and training["seed"] >= 2**32:
            problems.append(f"seed must be below 2**32 (numpy's limit), got {training['seed']}")
        if not isinstance(training.get("architecture"), str) or not training["architecture"]:
            problems.append(
                "architecture must be small_cnn or a torchvision model name, got "
                f"{training.get('architecture')!r}"
            )
        for key, choices in (("pooling", POOLINGS), ("stem", STEMS), ("data_path", DATA_PATHS)):
            if training.get(key, cls.__dataclass_fields__[key].default) not in choices:
                problems.append(
                    f"{key} must be one of {', '.join(choices)}, got {training.get(key)!r}"
                )
        problems += _device_problems(training.get("device", "auto"))
        problems += augmentation_problems(training.get("augmentation"))
        unknown = sorted(set(training) - set(cls.__dataclass_fields__))
        if unknown:
            problems.append(f"unknown keys {unknown}; known: {', '.join(cls.__dataclass_fields__)}")
        if problems:
            raise ValueError("invalid parameters training: " + "; ".join(problems))
        values = {key: value for key, value in training.items() if key != "augmentation"}
        augmentation = AugmentationParams.from_params(training.get("augmentation"))
        return cls(**values, augmentation=augmentation)

    def data_path_for(self, train_images: int) -> str:
        """``memory`` or ``stream``: ``data_path``, or by size when it is ``auto``."""
        if self.data_path == "auto":
            return "stream" if train_images > self.stream_above_images else "memory"
        return self.data_path
