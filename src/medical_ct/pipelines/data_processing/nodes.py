"""Nodes of the data_processing pipeline: ingest, decode, dedupe, split and report."""

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from medical_ct.changes import listing_table
from medical_ct.datasets import StoredFiles, collect_records, mark_revoked
from medical_ct.manifest import (
    FEEDBACK,
    RAW,
    SPLITS,
    arrow_strings,
    build_manifest,
    choose_images,
    fingerprint,
    hash_prefixes,
    model_input_table,
)
from medical_ct.mednist import MedNISTDownloadError, fetch_mednist
from medical_ct.preprocessing import (
    IMAGE_SIZE,
    PREPROCESSING_SPEC,
    InvalidImageError,
    content_hash,
    preprocess_image,
)
from medical_ct.redaction import redact_url
from medical_ct.shards import (
    INDEX_COLUMNS,
    INDEX_DTYPES,
    MODEL_INPUT_COLUMNS,
    IndexRow,
    ModelInputSet,
    ShardedImages,
    empty_index,
    shard_name,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataProcessingParams:
    """The ``data_processing`` parameters, checked once.

    ``classes``: accepted class folders (``None``: every folder of the raw store);
    ``validation_fraction``/``test_fraction``: held-out shares by content hash;
    ``full_rescan``: decode every file again instead of reusing last run's decoded pixels
    (and compact the shards); ``shard_images``: images per shard of the decoded sets.
    """

    classes: tuple[str, ...] | None
    validation_fraction: float
    test_fraction: float
    full_rescan: bool = False
    shard_images: int = 4096

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "DataProcessingParams":
        """Check ``params``; one ``ValueError`` names every problem, each with its fix."""
        problems = []
        try:
            validation, test = validate_split(params.get("split") or {})
        except ValueError as error:
            problems.append(str(error))
        full_rescan = params.get("full_rescan", False)
        if not isinstance(full_rescan, bool):
            problems.append(
                f"full_rescan must be true or false, got {full_rescan!r}: "
                "kedro run --params data_processing.full_rescan=true"
            )
        shard_images = params.get("shard_images", 4096)
        if not isinstance(shard_images, int) or isinstance(shard_images, bool) or shard_images < 1:
            problems.append(
                "shard_images must be a positive integer (images per shard of the decoded "
                f"sets, 4096 = 16 MiB), got {shard_images!r}"
            )
        classes = params.get("classes")
        if classes is not None and (
            not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes)
        ):
            problems.append(
                f"classes must be a list of class folder names or null, got {classes!r}"
            )
        if problems:
            raise ValueError("parameters data_processing: " + "; ".join(problems))
        return cls(tuple(classes) if classes else None, validation, test, full_rescan, shard_images)


def ingest_mednist(raw_store_has_files: bool, ingest: dict[str, Any]) -> dict:
    """Fetch MedNIST when the raw store has no images yet; otherwise add nothing.

    Args:
        raw_store_has_files: Whether the raw store holds any file before ingest.
        ingest: ``url`` (http(s), file:// or a local path), ``md5`` and ``timeout_s``.

    Returns:
        ``{"<Class>/<file>": bytes}`` to add to the raw store; empty when it has images.

    Raises:
        MedNISTDownloadError: The archive is unreachable or corrupt. Nothing is written.
    """
    if raw_store_has_files:
        logger.info("Raw store holds images: not downloading MedNIST")
        return {}
    validate_ingest(ingest)
    logger.info("Raw store is empty: downloading MedNIST from %s", redact_url(ingest["url"]))
    try:
        images = fetch_mednist(ingest["url"], ingest["md5"], float(ingest.get("timeout_s", 60)))
    except MedNISTDownloadError as error:
        raise MedNISTDownloadError(
            f"{error}. To provide the images yourself, put them in the raw store as "
            "<Class>/<file>.jpeg (data/01_raw/mednist/ by default), or point the run at a "
            "reachable copy of the tarball: kedro run --params "
            '"ingest.url=/path/to/MedNIST.tar.gz,ingest.md5=<its md5>"'
        ) from error
    logger.info("Fetched %d MedNIST images", len(images))
    return images


def decode_images(
    partitions: dict[str, Callable[[], bytes]],
    previous: ShardedImages | None,
    data_processing: dict[str, Any],
) -> ShardedImages:
    """Decode ``<Class>/<file>`` partitions with the shared preprocessing, reusing last run's.

    Files that cannot be decoded, are empty, lie outside a class folder or under a class not
    in ``classes`` are rejected with a reason, never raised; one deleted since the listing is
    left out with a warning, one that cannot be read stops the run naming it (see
    ``_decoded_row``). A file whose store version (``partition.version``: size and ETag or
    modification time) equals the one in ``previous``'s index is not read again and its pixels
    are not loaded: its index row (shard and row of its pixels, or its rejection by decoding)
    is kept, so a rerun reads and decodes only new or changed files, and writes only their
    shards. ``full_rescan`` decodes every file, as does a rerun whose last index was made by
    another ``PREPROCESSING_SPEC``.

    Args:
        partitions: Partition id to a function returning the file's bytes, with ``version``.
        previous: This node's output of the last run, or ``None``.
        data_processing: The parameters (see ``DataProcessingParams``).

    Returns:
        The decoded set: its index (one row per file, in file order) and the shards of the
        files decoded now.
    """
    params = DataProcessingParams.from_params(data_processing)
    accepted = set(params.classes) if params.classes else None
    if isinstance(partitions, StoredFiles):  # a listing: no StoredFile made per file
        listing, read = partitions.listing, partitions.read
    else:
        versions = [getattr(partitions[file], "version", None) for file in partitions]
        listing, read = listing_table(list(partitions), versions), lambda f: partitions[f]()
    if previous is not None and params.full_rescan:
        logger.info("full_rescan: decoding every file again and compacting the shards")
        previous = None
    if previous is not None and _made_by_other_preprocessing(previous):
        previous = None
    kept, to_read = _reusable_rows(previous, listing, accepted, _missing_shards(previous))
    new_pixels = _Pixels(len(to_read))
    rows = [
        row
        for file, version in tqdm(to_read, desc="Decoding images", unit=" images")
        if (row := _decoded_row(file, version, read, accepted, new_pixels)) is not None
    ]
    index = pd.DataFrame(rows).astype(INDEX_DTYPES) if rows else empty_index()
    new_shards = _cut_into_shards(index, new_pixels, params.shard_images)
    if len(kept):
        reused = previous.index.iloc[kept][INDEX_COLUMNS].assign(reused=True)
        index = _merged_in_file_order(reused, index)
    for _, rejection in index[index["reason"] != ""].iterrows():
        logger.warning("Rejected %s: %s", rejection["file"], rejection["reason"])
    logger.info(
        "Decoded %d files into %d new shards, reused %d decoded by the last run",
        len(rows),
        len(new_shards),
        len(kept),
    )
    in_use = set(index.loc[index["shard"] != "", "shard"].unique()) - set(new_shards)
    shards = {name: previous.shard_loader(name) for name in in_use}
    return ShardedImages(index, shards, new_shards)


def decode_reviewed_feedback(
    partitions: dict[str, Callable[[], bytes]],
    accepted_feedback: dict[str, Callable[[], dict]],
    revoked_feedback: Mapping[str, Callable[[], dict]],
    previous_records: dict[str, dict] | None,
    previous: ShardedImages | None,
    data_processing: dict[str, Any],
) -> tuple[ShardedImages, dict[str, dict]]:
    """Decode the images of the accepted feedback store that an accepted record names.

    A decision writes the accepted image, then its record. One that failed between the two
    (the store refused the record: the service answered 503, "nothing was decided") left an
    image in the accepted store while its item stayed pending, and a reviewer may then have
    rejected it. The record says a person accepted that label, so an image without one is
    left out (the log names it) until a decision writes its record. So is the image of a
    record a reviewer revoked (``POST /review/revoke``): its record is kept, marked
    ``revoked``. Otherwise as ``decode_images``.

    Args:
        accepted_feedback: ``{feedback_id: loader}`` of the review's accepted records; a
            record's ``accepted_as`` is the file of the accepted store it accepted.
        revoked_feedback: ``{feedback_id: loader}`` of the revocations (only their ids are
            used: a revocation is never withdrawn).
        previous_records: This node's records of the last run (``None`` before the first).

    Returns:
        The decoded set, and every readable accepted record (``collect_records``), for the
        manifest, the feedback report and the next run.
    """
    params = DataProcessingParams.from_params(data_processing)
    records = collect_records(accepted_feedback, None if params.full_rescan else previous_records)
    records, revoked = mark_revoked(records, revoked_feedback)
    reviewed = {r.get("accepted_as") for k, r in records.items() if k not in revoked} - {None}
    if revoked:
        logger.info("Not training on %d revoked feedback label(s)", len(revoked))
    unreviewed = sorted(set(partitions) - reviewed)
    if unreviewed:
        logger.warning(
            "Not training on %d accepted feedback image(s) that no accepted record names (a "
            "decision that failed midway: the item waits for a decision again): %s",
            len(unreviewed),
            ", ".join(unreviewed[:10]) + (" ..." if len(unreviewed) > 10 else ""),
        )
    if isinstance(partitions, StoredFiles):
        partitions = partitions.only(reviewed)
    else:
        partitions = {file: partitions[file] for file in partitions if file in reviewed}
    return decode_images(partitions, previous, data_processing), records


NOT_IN_A_CLASS_FOLDER = "not inside a class folder (<Class>/<file>)"
UNKNOWN_CLASS = "unknown class"


def _made_by_other_preprocessing(previous: ShardedImages) -> bool:
    """Whether last run's pixels were made by another ``PREPROCESSING_SPEC`` than this code's,
    with a warning saying so: their hashes and pixels would be stale (a size change failing
    only in training). An index that records none was written before indexes recorded it, by
    this spec as far as anyone knows (it has not changed since): decoding a million images
    again on no evidence would cost hours, and the next save records the spec."""
    made_by = previous.preprocessing
    if made_by is None or made_by == PREPROCESSING_SPEC:
        return False
    changed = {
        key: (made_by.get(key), PREPROCESSING_SPEC.get(key))
        for key in sorted(made_by.keys() | PREPROCESSING_SPEC.keys())
        if made_by.get(key) != PREPROCESSING_SPEC.get(key)
    }
    logger.warning(
        "Last run's decoded set was made by another preprocessing (%s: last run's, this "
        "code's): decoding every file again and compacting the shards",
        ", ".join(f"{key} {before!r} -> {now!r}" for key, (before, now) in changed.items()),
    )
    return True


def _missing_shards(previous: ShardedImages | None) -> set[str]:
    """The shards last run's index names that its folder lacks, with a warning naming them:
    their files are decoded again, so the rerun repairs the set."""
    missing = previous.missing_shards() if previous is not None else set()
    if missing:
        files = int(previous.index["shard"].isin(missing).sum())
        logger.warning(
            "%d shard(s) that last run's decoded index names are missing (deleted or lost): "
            "%s; decoding their %d files again (a file gone from the store too is left out)",
            len(missing),
            ", ".join(sorted(missing)),
            files,
        )
    return missing


def _reusable_rows(
    previous: ShardedImages | None,
    listing: pa.Table,
    accepted: set | None,
    missing_shards: set[str],
) -> tuple[np.ndarray, list[tuple[str, str | None]]]:
    """Rows of last run's index to keep as they are, and the listed files to read now.

    A row is kept when its file is listed with the same version (no version never matches),
    its class is accepted, it was decoded or rejected for its bytes (a rejection for its
    path costs nothing to make again, and ``classes`` may have changed since), and its pixels'
    shard is not in ``missing_shards``. Every other listed file is read, in file order, with
    its version.

    One hash lookup (Arrow's) of the index's files in the listing, whose positions also say
    which listed files are kept: 0.5 s at a million files, against 0.9-1.0 s when a second lookup
    (the kept files in the listing) found the files to read.
    """
    listed, versions = (arrow_strings(listing.column(name)) for name in ("file", "version"))
    kept = np.array([], np.int64)
    if previous is not None and not previous.index.empty:
        index = previous.index
        eligible = ~index["reason"].str.startswith((NOT_IN_A_CLASS_FOLDER, UNKNOWN_CLASS))
        if accepted is not None:
            eligible &= index["label"].isin(accepted)
        if missing_shards:
            eligible &= ~index["shard"].isin(missing_shards)
        position = pc.index_in(arrow_strings(index["file"]), value_set=listed)
        at = np.flatnonzero(pc.is_valid(position).to_numpy(zero_copy_only=False))
        listed_at = position.drop_null().to_numpy()
        before, now = arrow_strings(index["version"]).take(at), versions.take(listed_at)
        same = pc.fill_null(pc.equal(before, now), False)
        _log_local_versions_of_earlier_runs(pc.filter(before, pc.invert(same)))
        keep = same.to_numpy(zero_copy_only=False) & eligible.to_numpy()[at]
        kept = at[keep]
        new = np.ones(len(listed), bool)
        new[listed_at[keep]] = False
        listed, versions = listed.filter(new), versions.filter(new)
    order = pc.sort_indices(listed)
    pairs = zip(listed.take(order).to_pylist(), versions.take(order).to_pylist(), strict=True)
    return kept, list(pairs)


# A local file's version before it held the inode change time: size, then st_mtime (a float,
# so with a dot, which no ETag has); now ``size:mtime:ctime`` (changes.local_versions).
_LOCAL_VERSION_WITHOUT_CTIME = r"^\d+:\d+\.\d+$"


def _log_local_versions_of_earlier_runs(changed: pa.Array) -> None:
    """Say why the first run after the upgrade reads every local file again: their versions
    of the last run lack the inode change time (``changes.local_versions``), so none match."""
    count = pc.sum(pc.match_substring_regex(changed, _LOCAL_VERSION_WITHOUT_CTIME)).as_py()
    if count:
        logger.warning(
            "%d files carry the version an earlier medical_ct gave a local file (size:mtime); "
            "it now holds the inode change time too, which catches a file replaced by one of "
            "the same size and time (cp -p, rsync -a, tar -x, unzip): reading and decoding "
            "them again this once. Their old pixels stay in their shards until a full rescan "
            "(--params data_processing.full_rescan=true) deletes them",
            count,
        )


class _Pixels:
    """The pixels decoded by this run, in one array allocated up front (a row per file to
    read; the rows of files rejected are never written, so never take memory).

    A list of one array per image, stacked into shards at the end, held every image twice
    and a dict per row besides: a full run took 9 KB an image at its peak (9.3 GB at a
    million images), now 4.8 KB (5.2 GB), for 4 KB of pixels.
    """

    def __init__(self, capacity: int) -> None:
        self.array = np.empty((capacity, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        self.count = 0

    def append(self, image: np.ndarray) -> int:
        self.array[self.count] = image
        self.count += 1
        return self.count - 1


def _decoded_row(
    file: str,
    version: str | None,
    read: Callable[[str], bytes],
    accepted: set | None,
    new_pixels: _Pixels,
) -> IndexRow | None:
    """The index row of a file read now: rejected for its path or its bytes, or decoded (its
    pixels appended to ``new_pixels``, the row pointing at them until ``_cut_into_shards``).

    ``None`` for a file deleted since it was listed: it has no row, as in a full rescan run
    after the deletion (a rejection row would be kept by reruns and differ from it).

    Raises:
        PermissionError: The file cannot be read; names it and what to do. Not a rejection:
            its bytes may be a good image, a rejection would be kept while its version is
            unchanged (``chmod`` changes neither size nor time) when a rescan would decode
            it, and a store that refuses every read would train on what is left.
    """
    label, _, name = file.partition("/")
    if not name:
        return IndexRow(file, version, label, reason=NOT_IN_A_CLASS_FOLDER)
    if accepted is not None and label not in accepted:
        return IndexRow(file, version, label, reason=f"{UNKNOWN_CLASS} {label!r}")
    try:
        data = read(file)
    except FileNotFoundError:
        logger.warning(
            "Left out %s: deleted since it was listed; the next run will not list it", file
        )
        return None
    except PermissionError as error:
        raise PermissionError(
            f"cannot read {file} of the image store ({error}): give the pipeline read access "
            "to it, or move it out of the store, and run again"
        ) from error
    try:
        image = preprocess_image(data)
    except InvalidImageError as error:
        return IndexRow(file, version, label, reason=str(error))
    return IndexRow(file, version, label, content_hash(image), row=new_pixels.append(image))


def _merged_in_file_order(reused: pd.DataFrame, decoded: pd.DataFrame) -> pd.DataFrame:
    """Last run's rows with the rows decoded now, in file order (Arrow's sort: 0.02 s at
    500,000 files, whatever order last run's index was saved in)."""
    merged = pd.concat([reused, decoded], ignore_index=True)  # both typed by INDEX_DTYPES
    order = pc.sort_indices(arrow_strings(merged["file"])).to_numpy()
    return merged.iloc[order].reset_index(drop=True)


def _cut_into_shards(
    index: pd.DataFrame, new_pixels: _Pixels, shard_images: int
) -> dict[str, np.ndarray]:
    """Cut the newly decoded pixels into shards; point their index rows at them (in place).

    The shards are consecutive slices of ``new_pixels``, reordered in place: no second copy
    of every image.
    """
    decoded_now = (index["shard"] == "") & (index["reason"] == "")
    new_rows = np.flatnonzero(decoded_now.to_numpy())
    # In content-hash order, not file order: a shard is a random mix of classes, so training
    # that streams a few shards at a time still sees every class in each batch.
    new_rows = new_rows[np.argsort(index["content_hash"].to_numpy()[new_rows], kind="stable")]
    row_column = index["row"].to_numpy(dtype=np.int64).copy()
    pixels = new_pixels.array[: new_pixels.count]
    _reorder_in_place(pixels, row_column[new_rows])
    shards: dict[str, np.ndarray] = {}
    shard_column = index["shard"].to_numpy(dtype=object).copy()
    for start in range(0, len(new_rows), shard_images):
        rows = new_rows[start : start + shard_images]
        shard = pixels[start : start + len(rows)]
        name = shard_name(shard)
        shards[name] = shard
        shard_column[rows] = name
        row_column[rows] = np.arange(len(rows))
    index["shard"] = pd.array(shard_column, dtype=INDEX_DTYPES["shard"])  # as loads type it
    index["row"] = row_column
    return shards


def _reorder_in_place(array: np.ndarray, order: np.ndarray) -> None:
    """``array[:] = array[order]`` (``order`` a permutation) with one row of scratch memory,
    following each cycle of the permutation: 1.6 s a million rows, next to 150 s of decoding
    them, where ``array[order]`` would take a second copy of every image."""
    order = order.tolist()
    placed = bytearray(len(order))
    for start in range(len(order)):
        if placed[start]:
            continue
        first = array[start].copy()
        position = start
        while True:
            placed[position] = 1
            source = order[position]
            if source == start:
                array[position] = first
                break
            array[position] = array[source]
            position = source


def build_model_input(
    raw_images: ShardedImages, feedback_images: ShardedImages, data_processing: dict[str, Any]
) -> tuple[ModelInputSet, ModelInputSet, ModelInputSet, list[str], dict[str, Any]]:
    """Dedupe by content hash and split deterministically by content hash.

    A feedback label wins over a raw label for the same image; among raw copies the first by
    file name wins. An image's split depends only on its hash, so it keeps its split as the
    data grows. No pixels are read or copied: each set is an index of where its images lie
    in the decoded sets' shards (a few tens of bytes per image).

    Args:
        raw_images: Decoded raw store.
        feedback_images: Decoded accepted feedback store (reviewed labels).
        data_processing: The parameters (``split``; see ``DataProcessingParams``).

    Returns:
        The train, validation and test sets (``images`` (n, 1, H, W) uint8 read on first use,
        ``labels`` int64 class indices, ``content_hashes``), the class names, and dedupe
        statistics.
    """
    params = DataProcessingParams.from_params(data_processing)
    choice = choose_images(raw_images, feedback_images)
    class_names = sorted(pc.unique(choice.labels).to_pylist())
    if len(class_names) < 2:
        raise ValueError(
            f"need images of at least 2 classes to train a classifier, found {class_names}; "
            "check the raw store and ingest"
        )
    # Each label's place among the class names, by Arrow (pandas' map: 0.14 s at 500,000).
    labels = pc.index_in(choice.labels, value_set=pa.array(class_names)).to_numpy()
    splits = split_codes(choice.prefixes, params.validation_fraction, params.test_fraction)
    sources = {RAW: raw_images, FEEDBACK: feedback_images}
    loaders = {
        (source, name): images.shard_loader(name)
        for source, images in sources.items()
        for name in {*images.shards, *images.new_shards}
    }
    sets = {}
    for code, name in enumerate(SPLITS):
        where = splits == code
        split = choice.table(where).assign(label=labels[where].astype(np.int64))
        sets[name] = ModelInputSet(split[MODEL_INPUT_COLUMNS], loaders)
    stats = {
        "duplicates": choice.duplicates,
        "duplicates_with_another_label": choice.with_another_label,
    }
    return sets["train"], sets["validation"], sets["test"], class_names, stats


def split_codes(
    prefixes: np.ndarray, validation_fraction: float, test_fraction: float
) -> np.ndarray:
    """Each image's split as its place in ``SPLITS``, from its content hash alone.

    ``prefixes`` are the hashes' first 16 hex digits as integers (``hash_prefixes``). The
    first 15, as a fraction of 16**15, fall in [0, test) for test, then [test, test +
    validation) for validation. Vectorised: a rerun splits every image.
    """
    fractions = (prefixes >> np.uint64(4)) / 16**15
    test = fractions < test_fraction
    validation = ~test & (fractions < test_fraction + validation_fraction)
    return np.select(
        [test, validation],
        [SPLITS.index("test"), SPLITS.index("validation")],
        SPLITS.index("train"),
    )


def splits_of(
    content_hashes: pd.Series, validation_fraction: float, test_fraction: float
) -> np.ndarray:
    """The split ("train", "validation" or "test") of each image, from its content hash alone
    (see ``split_codes``)."""
    codes = split_codes(hash_prefixes(content_hashes), validation_fraction, test_fraction)
    return np.array(SPLITS)[codes]


def split_of(content_hash: str, validation_fraction: float, test_fraction: float) -> str:
    """The split of one image (see ``splits_of``)."""
    return str(splits_of(pd.Series([content_hash]), validation_fraction, test_fraction)[0])


def report_data(
    train_set: dict,
    validation_set: dict,
    test_set: dict,
    class_names: list[str],
    raw_images: ShardedImages,
    feedback_images: ShardedImages,
    dedupe_stats: dict[str, int],
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Summarise the model input: counts per class and split, rejections, duplicates.

    Returns:
        The data report, its headline numbers as MLflow metrics, and the dataset fingerprint:
        a hash of every (content hash, label, split), equal for equal training data.
    """
    sets = dict(zip(SPLITS, (train_set, validation_set, test_set), strict=True))
    counts = {
        split: {
            class_names[label]: int(count)
            for label, count in enumerate(np.bincount(data["labels"], minlength=len(class_names)))
            if count
        }
        for split, data in sets.items()
    }
    rejected = raw_images["rejected"] + [
        {**rejection, "file": f"feedback/{rejection['file']}"}
        for rejection in feedback_images["rejected"]
    ]
    report = {
        "dataset_fingerprint": fingerprint(model_input_table(sets, class_names)),
        "class_names": class_names,
        "images_per_split": {split: len(data["labels"]) for split, data in sets.items()},
        "images_per_class_and_split": counts,
        "raw_images_decoded": len(raw_images.accepted),
        "feedback_images_decoded": len(feedback_images.accepted),
        "files_reused_from_last_run": raw_images.get("reused", 0)
        + feedback_images.get("reused", 0),
        **dedupe_stats,
        "rejected_count": len(rejected),
        "rejected": rejected,
    }
    metrics = {
        f"data.{split}_images": {"value": count, "step": 0}
        for split, count in report["images_per_split"].items()
    }
    metrics["data.rejected_files"] = {"value": len(rejected), "step": 0}
    metrics["data.duplicates"] = {"value": dedupe_stats["duplicates"], "step": 0}
    metrics["data.feedback_images"] = {"value": report["feedback_images_decoded"], "step": 0}
    logger.info(
        "Model input: %s images per split, %d rejected, %d duplicates, fingerprint %s",
        report["images_per_split"],
        len(rejected),
        dedupe_stats["duplicates"],
        report["dataset_fingerprint"][:12],
    )
    return report, metrics, report["dataset_fingerprint"]


def build_training_manifest(
    train_set: ModelInputSet,
    validation_set: ModelInputSet,
    test_set: ModelInputSet,
    class_names: list[str],
    accepted_records: dict[str, dict],
) -> pd.DataFrame:
    """The manifest of the model input: each image's split, label and where it came from.

    Logged with the run (and so with the version it registers), it is what a rebuild of the
    model input reads, and what tells which reviewed feedback a version was trained on.

    Args:
        train_set, validation_set, test_set: The model input.
        class_names: Class names, index = label.
        accepted_records: The review's accepted records, ``{feedback_id: record}``; a
            record's ``accepted_as`` is the file of the accepted store it describes.

    Returns:
        One row per image, in the order of the dataset fingerprint.
    """
    records = {
        record.get("accepted_as", ""): record | {"feedback_id": feedback_id}
        for feedback_id, record in accepted_records.items()
    }
    sets = dict(zip(SPLITS, (train_set, validation_set, test_set), strict=True))
    return build_manifest(sets, class_names, records)


def report_feedback(
    pending: Mapping[str, Callable[[], dict]],
    accepted: dict[str, dict],
    rejected: Mapping[str, Callable[[], dict]],
    raw_images: ShardedImages,
    feedback_images: ShardedImages,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Counts of the review queue, and the accepted feedback that changed a raw image's label.

    A revoked label counts as ``revoked``, not accepted: it no longer trains.

    Only accepted feedback trains; this report shows what is waiting and what a reviewer's
    decisions changed in the ground truth (the raw store keeps its files untouched).

    Returns:
        The report and its counts as MLflow metrics (``feedback.pending`` ...).
    """
    accepted_records = [record for record in accepted.values() if not record.get("revoked")]
    decided = accepted.keys() | rejected.keys()
    feedback_hashes = dict(
        zip(feedback_images["files"], feedback_images["content_hashes"], strict=True)
    )
    digests = [feedback_hashes.get(record.get("accepted_as")) for record in accepted_records]
    # The raw labels of the accepted feedback's images only: a dict of every raw image was
    # 500,000 Python strings (0.2 s, 100 MB) for a few hundred lookups.
    raw = raw_images.accepted
    raw = raw[raw["content_hash"].isin(set(digests) - {None})]
    raw_labels = dict(zip(raw["content_hash"].tolist(), raw["label"].tolist(), strict=True))
    changed = []
    for record, digest in zip(accepted_records, digests, strict=True):
        raw_label = raw_labels.get(digest)
        if raw_label is not None and raw_label != record.get("label"):
            changed.append(
                {"feedback_id": record.get("feedback_id"), "raw_label": raw_label, **_who(record)}
            )
    counts = {
        "pending": len(pending.keys() - decided),
        "accepted": sum(r.get("decision") == "accept" for r in accepted_records),
        "auto_accepted": sum(r.get("decision") == "auto_accept" for r in accepted_records),
        "rejected": len(rejected),
        "revoked": len(accepted) - len(accepted_records),
        "changed_raw_label": len(changed),
    }
    logger.info("Feedback review: %s", counts)
    report = {**counts, "accepted_changing_a_raw_label": changed}
    metrics = {f"feedback.{name}": {"value": value, "step": 0} for name, value in counts.items()}
    return report, metrics


def _who(record: dict) -> dict[str, str]:
    return {key: record.get(key) for key in ("label", "submitted_label", "reviewer", "decided_at")}


def validate_ingest(ingest: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming what is wrong with the ``ingest`` parameters."""
    _require_keys(ingest, ("url", "md5"), "ingest")
    if not re.fullmatch(r"[0-9a-fA-F]{32}", str(ingest["md5"])):
        raise ValueError(
            f"parameters ingest: md5 must be the 32 hex digits of the tarball's md5, "
            f"got {ingest['md5']!r}"
        )


def validate_split(split: dict[str, float]) -> tuple[float, float]:
    """Return the validation and test fractions; raise ``ValueError`` if they are unusable."""
    _require_keys(split, ("validation_fraction", "test_fraction"), "data_processing.split")
    validation, test = float(split["validation_fraction"]), float(split["test_fraction"])
    if not (0 < validation < 1 and 0 < test < 1 and validation + test < 1):
        raise ValueError(
            "data_processing.split: validation_fraction and test_fraction must each be "
            f"between 0 and 1 and leave room for training, got {validation} and {test}"
        )
    return validation, test


def _require_keys(params: dict[str, Any], keys: tuple[str, ...], name: str) -> None:
    missing = [key for key in keys if params.get(key) in (None, "")]
    if missing:
        raise ValueError(f"parameters {name}: missing {', '.join(missing)}")
