"""The training-set manifest: every image of a model input, its split, label and origin.

A registered version's dataset fingerprint says *whether* two versions saw the same data;
the manifest says *what* that data was (one row per image: content hash, split, label, the
store and file it came from, the feedback id for corrected labels), so that the model input
can be rebuilt from the stores and checked against the fingerprint.
"""

import hashlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from medical_ct.preprocessing import IMAGE_SIZE, InvalidImageError, content_hash, preprocess_image
from medical_ct.shards import ModelInputSet, ShardedImages

SPLITS = ("train", "validation", "test")
RAW, FEEDBACK = "raw", "feedback"
MANIFEST_COLUMNS = [
    "split",
    "content_hash",
    "label",
    "source",  # "raw" or "feedback": the store the image was read from
    "file",  # <Class>/<file> in that store
    "feedback_id",  # the service's id of a corrected label; empty for raw images
    "review_decision",  # how its accepted record was decided (accept, auto_accept); empty for raw
]


class Choice(NamedTuple):
    """The dedupe's answer, before any copy of what it chose: which rows of ``copies`` won.

    The model input takes each split straight from ``copies``: a frame of the chosen copies,
    made first and then cut into splits held beside it, raised ``build_model_input``'s peak
    by 80 MiB at a million images.
    """

    copies: pd.DataFrame  # every accepted copy, feedback first (``choose_images``' columns)
    rows: np.ndarray  # positions in ``copies`` of the chosen copies, in content-hash order
    labels: pa.Array  # their labels (class names), in that order
    prefixes: np.ndarray  # their hashes' first 16 hex digits as integers (for the split)
    duplicates: int  # copies dropped
    with_another_label: int  # of those, how many had another label than the chosen copy

    def table(self, where: np.ndarray | slice = slice(None)) -> pd.DataFrame:
        """The chosen copies (those ``where`` selects, in content-hash order), indexed 0..n-1."""
        return self.copies.iloc[self.rows[where]].reset_index(drop=True)


def choose_images(raw_images: ShardedImages, feedback_images: ShardedImages) -> Choice:
    """One copy per content hash: a feedback label wins over a raw one, then the first file.

    Vectorised over the decoded sets' indexes (no Python per image): a weekly rerun redoes
    this over every image, so it must cost little next to what is new. The copies are
    ``content_hash``, ``label``, ``file``, ``shard``, ``row`` and ``source`` (which set).
    """
    copies = pd.concat(
        [
            images.accepted[["content_hash", "label", "file", "shard", "row"]].assign(source=source)
            for source, images in ((FEEDBACK, feedback_images), (RAW, raw_images))
        ],
        ignore_index=True,
    )
    # A stable sort keeps each image's copies in the order above, so the first of a run of
    # equal hashes is the one to keep: no hash table over every image (pandas' ``duplicated``
    # took 0.7 s at 500,000) and no Python string per image.
    order, hashes, prefixes = sort_by_hash(copies["content_hash"])
    first = np.ones(len(order), bool)
    first[1:] = pc.not_equal(hashes[1:], hashes[:-1]).to_numpy(zero_copy_only=False)
    labels = arrow_strings(copies["label"]).take(order)
    kept = np.flatnonzero(first)
    kept_label = labels.take(kept[np.cumsum(first)[~first] - 1])
    other_label = pc.sum(pc.not_equal(labels.filter(~first), kept_label)).as_py() or 0
    return Choice(
        copies,
        order[kept],
        labels.take(kept),
        prefixes[kept],
        int(len(order) - len(kept)),
        int(other_label),
    )


def sort_by_hash(content_hashes: pd.Series) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """A stable sort of content hashes: the order, and the hashes (Arrow strings) and their
    first 16 hex digits as integers (``hash_prefixes``) in it.

    Sorted by those integers (NumPy's stable sort): 0.3 s at a million with the check,
    against 1.25 s for Arrow's sort of the strings. The sorted hashes are checked to be in
    string order, so hashes sharing those digits (or mixing upper and lower case) fall back
    to Arrow's sort of the whole strings: the order is the same.
    """
    hashes = arrow_strings(content_hashes)
    prefixes = hash_prefixes(hashes)
    order = np.argsort(prefixes, kind="stable")
    in_order = hashes.take(order)
    if len(order) > 1 and not pc.all(pc.less_equal(in_order[:-1], in_order[1:])).as_py():
        order = pc.sort_indices(hashes).to_numpy()
        in_order = hashes.take(order)
    return order, in_order, prefixes[order]


_FINGERPRINT_ROWS = 1 << 16  # lines hashed at a time


def fingerprint(table: pd.DataFrame) -> str:
    """The dataset fingerprint: sha256 of ``content_hash:label:split`` lines, in table order.

    ``table`` has those three columns (``label`` the class name) in model-input order.
    """
    digest = hashlib.sha256()
    # Arrow joins each chunk's lines into one buffer, which is hashed as it lies: no Python
    # string per row (those took 0.2 s at 500,000 rows, twice a rerun; now 0.085 s).
    for start in range(0, len(table), _FINGERPRINT_ROWS):
        chunk = table.iloc[start : start + _FINGERPRINT_ROWS]
        content_hash, label, split = (arrow_strings(chunk[name]) for name in FINGERPRINT_COLUMNS)
        split = pc.binary_join_element_wise(split, _LARGE_EMPTY, _LARGE_NEWLINE)
        lines = pc.binary_join_element_wise(content_hash, label, split, _LARGE_COLON)
        digest.update(_joined_bytes(lines))
    return digest.hexdigest()


FINGERPRINT_COLUMNS = ("content_hash", "label", "split")
_LARGE_EMPTY, _LARGE_COLON, _LARGE_NEWLINE = (
    pa.scalar(text, pa.large_string()) for text in ("", ":", "\n")
)


def arrow_strings(column: pd.Series | pa.Array | pa.ChunkedArray) -> pa.Array:
    """A pandas or Arrow column as one Arrow ``large_string`` array (no copy for Arrow
    strings)."""
    if isinstance(column, pa.ChunkedArray):
        strings = column.cast(pa.large_string())
    else:
        strings = pa.array(column, pa.large_string())
    return strings.combine_chunks() if isinstance(strings, pa.ChunkedArray) else strings


def _joined_bytes(strings: pa.Array) -> memoryview:
    """The bytes of every string of an Arrow string array, one after the other."""
    offsets = np.frombuffer(strings.buffers()[1], np.int64)[strings.offset :]
    values = strings.buffers()[2]
    if values is None:  # no characters at all
        return memoryview(b"")
    return memoryview(values)[offsets[0] : offsets[len(strings)]]


_NIBBLES = np.full(256, 16, np.uint8)  # 16: not a hex digit
_NIBBLES[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_NIBBLES[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def hash_prefixes(content_hashes: pd.Series | pa.Array) -> np.ndarray:
    """The first 16 hex digits of each content hash as an unsigned 64-bit integer.

    Read straight from the Arrow buffer of the hashes' first 16 characters: a weekly rerun
    does this for every image (``splits_of`` at 500,000: 0.055 s, against 0.12 s with
    Python's ``bytes.fromhex`` over a list of them).

    Raises:
        ValueError: A hash is shorter than 16 characters or not hex.
    """
    strings = arrow_strings(content_hashes)
    prefixes = pc.utf8_slice_codeunits(strings, 0, 16)
    joined = np.frombuffer(_joined_bytes(prefixes), np.uint8)
    digits = _NIBBLES[joined]
    if strings.null_count or len(joined) != 16 * len(strings) or (digits == 16).any():
        raise ValueError("content hashes must be sha256 hex digests (64 hex digits)")
    digits = digits.reshape(-1, 8, 2)
    packed = (digits[:, :, 0] << 4) | digits[:, :, 1]  # 8 bytes a hash, most significant first
    return np.ascontiguousarray(packed).view(">u8")[:, 0].astype(np.uint64)


def model_input_table(sets: Mapping[str, Mapping], class_names: list[str]) -> pd.DataFrame:
    """``content_hash``, ``label`` (class name) and ``split`` of every image of the model input.

    Arrow strings throughout: the class names are taken by label, a ``ModelInputSet``'s hashes
    are its index column (no list of 500,000 Python strings made and read back).
    """
    names = pa.array(class_names, pa.large_string())
    return pd.concat(
        [
            pd.DataFrame(
                {
                    "content_hash": _content_hashes(sets[split]),
                    "label": pd.Series(names.take(pa.array(sets[split]["labels"])), dtype="str"),
                    "split": split,
                },
                columns=["content_hash", "label", "split"],
            )
            for split in SPLITS
        ],
        ignore_index=True,
    )


def _content_hashes(data: Mapping) -> pd.Series:
    if isinstance(data, ModelInputSet):
        return data.index["content_hash"]
    return pd.Series(data["content_hashes"], dtype="str")


def build_manifest(
    sets: Mapping[str, ModelInputSet],
    class_names: list[str],
    feedback: Mapping[str, Mapping[str, Any]],
) -> pd.DataFrame:
    """One row per image of the model input, in the fingerprint's order.

    Args:
        sets: The train, validation and test sets by split name; their index says where each
            image came from (``source``, ``file``).
        class_names: Class names, index = label.
        feedback: Accepted feedback file (``<Class>/<file>``) -> its review record
            (``feedback_id``, ``decision``: accept or auto_accept).
    """
    origins = pd.concat(
        [sets[split].index[["source", "file"]] for split in SPLITS], ignore_index=True
    )
    manifest = model_input_table(sets, class_names)
    manifest[["source", "file"]] = origins  # both indexed 0..n-1, in the same order
    from_feedback = np.flatnonzero((manifest["source"] == FEEDBACK).to_numpy())
    feedback_files = manifest["file"].iloc[from_feedback]  # a few, among every raw image
    for column, key in (("feedback_id", "feedback_id"), ("review_decision", "decision")):
        values = {file: record.get(key, "") for file, record in feedback.items()}
        manifest[column] = ""
        if len(from_feedback):
            filled = feedback_files.map(values).fillna("").astype("str").to_numpy()
            manifest.iloc[from_feedback, manifest.columns.get_loc(column)] = filled
    return manifest[MANIFEST_COLUMNS]


def manifest_fingerprint(manifest: pd.DataFrame) -> str:
    """The dataset fingerprint of the model input a manifest describes."""
    return fingerprint(manifest)


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
