"""The training-set manifest: every image of a model input, its split, label and origin.

A registered version's dataset fingerprint says *whether* two versions saw the same data;
the manifest says *what* that data was (one row per image: content hash, split, label, the
store and file it came from, the feedback id for corrected labels), so that the model input
can be rebuilt from the stores and checked against the fingerprint.
"""

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from medical_ct.preprocessing import IMAGE_SIZE, InvalidImageError, content_hash, preprocess_image

SPLITS = ("train", "validation", "test")
RAW, FEEDBACK = "raw", "feedback"
MANIFEST_COLUMNS = [
    "split",
    "content_hash",
    "label",
    "source",  # "raw" or "feedback": the store the image was read from
    "file",  # <Class>/<file> in that store
    "feedback_id",  # the service's id of a corrected label; empty for raw images
    "review_decision",  # a reviewer's decision on a feedback image, once reviews exist
]


@dataclass(frozen=True)
class ChosenImage:
    """The copy of an image (one content hash) that goes into the model input."""

    label: str
    source: str
    index: int  # row in the decoded set of ``source``


def choose_images(
    raw_images: Mapping[str, Any], feedback_images: Mapping[str, Any]
) -> tuple[dict[str, ChosenImage], int, int]:
    """One copy per content hash: a feedback label wins over a raw one, then the first file.

    Returns:
        Content hash -> chosen copy, the number of duplicates dropped, and how many of them
        had another label than the chosen copy.
    """
    chosen: dict[str, ChosenImage] = {}
    duplicates = with_another_label = 0
    for source, images in ((FEEDBACK, feedback_images), (RAW, raw_images)):
        for index, (digest, label) in enumerate(
            zip(images["content_hashes"], images["labels"], strict=True)
        ):
            if digest in chosen:
                duplicates += 1
                with_another_label += chosen[digest].label != label
                continue
            chosen[digest] = ChosenImage(label, source, index)
    return chosen, duplicates, with_another_label


def fingerprint(rows: Iterable[tuple[str, str, str]]) -> str:
    """The dataset fingerprint of (content hash, label, split) rows, in model-input order."""
    digest = hashlib.sha256()
    for content, label, split in rows:
        digest.update(f"{content}:{label}:{split}\n".encode())
    return digest.hexdigest()


def model_input_rows(sets: Mapping[str, dict], class_names: list[str]) -> list[tuple[str, ...]]:
    """(content hash, label, split) of every image of the train, validation and test sets."""
    return [
        (content, class_names[label], split)
        for split in SPLITS
        for content, label in zip(
            sets[split]["content_hashes"], sets[split]["labels"].tolist(), strict=True
        )
    ]


def build_manifest(
    sets: Mapping[str, dict],
    class_names: list[str],
    chosen: Mapping[str, ChosenImage],
    files: Mapping[str, list[str]],
    feedback: Mapping[str, Mapping[str, Any]],
) -> pd.DataFrame:
    """One row per image of the model input, in the fingerprint's order.

    Args:
        sets: The train, validation and test sets, by split name.
        class_names: Class names, index = label.
        chosen: From ``choose_images``: which store and row each content hash came from.
        files: The ``files`` of the decoded raw and feedback sets, by source.
        feedback: Accepted feedback file (``<Class>/<file>``) -> its review record
            (``feedback_id``, ``decision``: accept or auto_accept).
    """
    rows = []
    for content, label, split in model_input_rows(sets, class_names):
        image = chosen[content]
        file = files[image.source][image.index]
        record = feedback.get(file, {}) if image.source == FEEDBACK else {}
        rows.append(
            {
                "split": split,
                "content_hash": content,
                "label": label,
                "source": image.source,
                "file": file,
                "feedback_id": record.get("feedback_id", ""),
                "review_decision": record.get("decision", ""),
            }
        )
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def manifest_fingerprint(manifest: pd.DataFrame) -> str:
    """The dataset fingerprint of the model input a manifest describes."""
    columns = (manifest[column].tolist() for column in ("content_hash", "label", "split"))
    return fingerprint(zip(*columns, strict=True))  # lists: iterating Arrow strings is slow


def train_image_counts(manifest: pd.DataFrame) -> dict[str, int]:
    """Images of the training split by source, and of the whole model input."""
    train = manifest[manifest["split"] == "train"]
    return {
        RAW: int((train["source"] == RAW).sum()),
        FEEDBACK: int((train["source"] == FEEDBACK).sum()),
        "model_input": len(manifest),
    }


class ManifestImagesMissingError(RuntimeError):
    """Images of a manifest are missing from the stores or changed; the message lists them."""


def rebuild_model_input(
    manifest: pd.DataFrame, stores: Mapping[str, Mapping[str, Callable[[], bytes]]]
) -> tuple[dict[str, dict], list[str]]:
    """The train, validation and test sets a manifest describes, read again from the stores.

    Every image is read from its store, decoded with the shared preprocessing and checked
    against its content hash, and placed in its split with its label.

    Args:
        manifest: From ``build_manifest`` (as logged with a registered version).
        stores: ``{"raw": partitions, "feedback": partitions}`` of the image stores.

    Returns:
        The sets by split name (``images``, ``labels``, ``content_hashes``, as
        ``build_model_input`` makes them) and the class names.

    Raises:
        ManifestImagesMissingError: Files are missing, unreadable or hold another image.
    """
    class_names = sorted(set(manifest["label"]))
    class_index = {name: index for index, name in enumerate(class_names)}
    problems = []
    sets = {}
    for split in SPLITS:
        rows = manifest[manifest["split"] == split]
        images = np.empty((len(rows), 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        for row, (source, file, expected) in enumerate(
            zip(rows["source"], rows["file"], rows["content_hash"], strict=True)
        ):
            read = stores.get(source, {}).get(file)
            if read is None:
                problems.append(f"{source} store: {file} is missing")
                continue
            try:
                images[row, 0] = preprocess_image(read())
            except InvalidImageError as error:
                problems.append(f"{source} store: {file} cannot be decoded ({error})")
                continue
            if content_hash(images[row, 0]) != expected:
                problems.append(f"{source} store: {file} holds another image than it did")
        sets[split] = {
            "images": images,
            "labels": np.array([class_index[label] for label in rows["label"]], dtype=np.int64),
            "content_hashes": list(rows["content_hash"]),
        }
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise ManifestImagesMissingError(
            f"{len(problems)} of {len(manifest)} images of the manifest cannot be read back "
            f"as they were:\n  {shown}{more}\nRestore them in the stores (or from a backup) "
            "and run the rebuild again."
        )
    return sets, class_names
