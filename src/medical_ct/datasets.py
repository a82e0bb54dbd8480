"""Kedro datasets of this project: image folders, reports
copied to MLflow from any store, and registered models."""

import contextlib
import json
import logging
import os
import posixpath
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, KeysView, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import cached_property, partial
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem
from kedro.io import AbstractDataset, DatasetError
from kedro_datasets.partitions import PartitionedDataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.types import ColSpec, DataType, Schema

from medical_ct import manifest, registry
from medical_ct.changes import (
    ChangeFeed,
    FolderTimes,
    listing_table,
    listing_versions,
    local_versions,
    object_version,
)
from medical_ct.shards import PARTIAL_SUFFIX, whole_file, write_file

logger = logging.getLogger(__name__)
UNFINISHED_SAVE_SUFFIX = ".unfinished-save.json"  # beside an image folder (save_unfinished)


def read_record(load: Callable[[], Any]) -> tuple[dict | None, str | None]:
    """A feedback record (one JSON object of a record store), or what is wrong with it.

    The review service and data_processing both leave out a record they cannot read, saying
    so, rather than stop on it: one file edited by hand into broken JSON stopped every
    /feedback and /review, and would stop the weekly run.
    """
    try:
        record = load()
    except DatasetError as error:
        return None, str(error.__cause__ or error).splitlines()[-1]
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    return record, None


def readable_records(partitions: Mapping[str, Callable[[], Any]], store: str) -> dict[str, dict]:
    """``{feedback_id: record}`` of a record store, leaving out, with an error naming each,
    the records that are not JSON objects (``read_record``): as the review service does."""
    records = {}
    for feedback_id, load in partitions.items():
        record, problem = read_record(load)
        if record is None:
            logger.error(
                "Feedback record %s of %s cannot be read (%s): left out, and the image it "
                "accepted does not train, until it is mended (restore it from a backup: "
                "review_audit keeps who decided what and when)",
                feedback_id,
                store,
                problem,
            )
        else:
            records[feedback_id] = record
    return records


def collect_records(
    partitions: Mapping[str, Callable[[], Any]], kept: dict[str, dict] | None
) -> dict[str, dict]:
    """``{feedback_id: record}`` of the readable accepted records, each read once across runs.

    The service never rewrites a record, so the ones data_processing kept last run (``kept``:
    ``accepted_records.json``) stand for those still listed, and only the ones listed since
    are read (``readable_records``): at 10,000 accepted records, reading them all took 0.4-0.5
    s on a local disk and a GET each on S3, in each node that needed them (monitoring's
    included), every week. ``None`` reads them all (a full rescan: a record edited by hand);
    one that cannot be read is tried again next time.
    """
    known = kept or {}
    still_listed = {key: known[key] for key in partitions if key in known}
    new = readable_records(
        fetched(partitions, [key for key in partitions if key not in known]),
        "accepted_feedback_records",
    )
    logger.info(
        "Accepted feedback records: %d read now, %d kept from the last data_processing run",
        len(new),
        len(still_listed),
    )
    return still_listed | new


def mark_revoked(
    records: dict[str, dict], revocations: Mapping[str, Any]
) -> tuple[dict[str, dict], set[str]]:
    """``records`` with those a reviewer revoked (``POST /review/revoke``) marked ``revoked``,
    and their ids. Only the revocations' ids are used (a revocation is never withdrawn), so
    listing the store is enough: data_processing and monitoring both read it now, rather than
    monitoring trusting the marks of the last data_processing, a week old."""
    revoked = records.keys() & revocations.keys()
    return records | {key: {**records[key], "revoked": True} for key in revoked}, revoked


def inside(folder: str, name: str) -> str:
    """``name``, checked to name a file under ``folder`` (a store's path, for the message): a
    record's id or image path comes from a file a person can edit.

    Raises:
        DatasetError: ``name`` is absolute or climbs out with ``..``.
    """
    if name.startswith("/") or ".." in name.split("/"):
        raise DatasetError(f"{name!r} would leave {folder}")
    return name


def open_store(path: str, **options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of a catalog path (``options``: credentials, fs_args) and the path on
    it; on a local disk, folders are made as files are written into them."""
    protocol, _ = fsspec.core.split_protocol(path)
    local = {"auto_mkdir": True} if protocol in (None, "file") else {}
    filesystem, on_it = fsspec.core.url_to_fs(path, **local, **options)
    return filesystem, on_it.rstrip("/")


def write_json(
    filesystem: fsspec.AbstractFileSystem,
    path: str,
    data: Any,
    *,
    durable: bool = False,
    exclusive: bool = False,
) -> None:
    """``data`` as indented JSON, written whole (``shards.write_file``)."""
    text = json.dumps(data, indent=2).encode()
    write_file(
        filesystem, path, lambda file: file.write(text), durable=durable, exclusive=exclusive
    )


class StoredFile:
    """One file of an image folder: call it for its bytes.

    ``version`` comes from the store's listing (size and ETag on S3, size, modification and
    inode change time on a local disk): it changes when the content does, so decoded pixels
    can be reused without reading the file again. A plain class with slots, not a frozen
    dataclass: a listing makes one per image, and a frozen dataclass's ``__init__`` alone took
    1.7 s per 100,000 files.
    """

    __slots__ = ("read", "version")

    def __init__(self, version: str, read: Callable[[], bytes]) -> None:
        self.version = version
        self.read = read

    def __call__(self) -> bytes:
        return self.read()

    def __repr__(self) -> str:
        return f"StoredFile(version={self.version!r})"


class StoredFiles(Mapping[str, StoredFile]):
    """The files of one listing of an image folder: ``{"<Class>/<file>": StoredFile}``.

    Holds the listing as Arrow columns (``listing``: ``file``, ``version``), which the decode
    node joins with last run's index as they are, and makes a ``StoredFile`` when one is asked
    for, instead of two objects per file up front: at 500,000 files those objects took 2.5 s
    to make, most of it the cycle collector walking them again and again as they piled up.
    A ``{partition: version}`` dict (``versions``) is made only for a lookup by name: it held
    94 MiB at 500,000 files, against 29 MiB for the columns. ``read`` gives a file's bytes
    without it. Iterates in the listing's order (not sorted).
    """

    def __init__(self, listing: pa.Table, read: Callable[[str], bytes], root: str) -> None:
        self.listing = listing
        self._read = read
        self._root = root

    @cached_property
    def versions(self) -> dict[str, str]:
        return listing_versions(self.listing)

    def read(self, partition: str) -> bytes:
        return self._read(f"{self._root}/{partition}")

    def __getitem__(self, partition: str) -> StoredFile:
        return StoredFile(self.versions[partition], partial(self.read, partition))

    def __iter__(self) -> Iterator[str]:
        return iter(self.versions)

    def __len__(self) -> int:
        return self.listing.num_rows

    def only(self, files: set[str]) -> "StoredFiles":
        """The files of this listing that are in ``files``, in the same order."""
        names = pa.array(list(files), pa.string())
        kept = self.listing.filter(pc.is_in(self.listing.column("file"), value_set=names))
        return StoredFiles(kept, self._read, self._root)


class ImageFolderDataset(AbstractDataset[dict[str, Any], StoredFiles]):
    """Image files as ``{"<Class>/<file>": StoredFile}``, on any fsspec store (local, S3...).

    An empty or missing folder loads as ``{}``: a raw store before ingest and a feedback store
    nobody wrote to yet are normal states, not errors. The listing gives every file and its
    version without reading a byte; it runs one class folder per thread (``listing_threads``),
    since on S3 each folder is its own paginated listing of 1,000 keys a request and a store
    of millions of images is mostly waiting on those requests; with ``changes`` (an SQS queue
    of the bucket's events, ``medical_ct.changes``) the last listing is patched instead. On a
    local disk it is one ``stat`` per file, or per changed folder's file with ``changes:
    {folder_times: true}``. Bytes are read only when a
    ``StoredFile`` is called. Saving takes ``{"<Class>/<file>": bytes or a function returning
    bytes}`` and writes each file whole (``shards.write_file``: a listing never sees half an
    image, nor the ``.partial`` name it is written under); files already there and not in the
    dict are left alone. ``durable: true`` (the feedback stores: images a person sent) syncs
    each file to the disk before ``save`` returns; off for the raw store, whose ingest writes
    tens of thousands of images it can fetch again.
    """

    def __init__(
        self,
        *,
        path: str,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        listing_threads: int = 8,
        changes: dict[str, Any] | None = None,
        durable: bool = False,
    ) -> None:
        self._path = path
        self._filesystem, self._root = open_store(path, **(credentials or {}), **(fs_args or {}))
        self._listing_threads = listing_threads
        self._changes = self._change_feed(changes or {})
        self._durable = durable

    def _change_feed(self, changes: dict[str, Any]) -> ChangeFeed | FolderTimes | None:
        """``changes: {queue_url | folder_times, filepath, ...}`` (``medical_ct.changes``):
        patch the last listing (kept at ``filepath``, a key Kedro resolves like any dataset
        path) instead of listing every file: with the bucket's events on S3 (``queue_url``),
        with the folders' modification times on a local disk (``folder_times: true``).
        Neither (the default) lists every file."""
        settings = dict(changes)
        queue_url, folder_times = settings.get("queue_url"), settings.pop("folder_times", False)
        if not isinstance(folder_times, bool):
            raise DatasetError(
                f"{self._path}: `changes.folder_times` must be true or false, got {folder_times!r}"
            )
        if not queue_url and not folder_times:
            return None
        local = isinstance(self._filesystem, LocalFileSystem)
        if (queue_url and local) or (folder_times and not local) or not settings.get("filepath"):
            raise DatasetError(
                f"{self._path}: `changes` needs `queue_url` with an S3 path, or `folder_times: "
                "true` with a local one, and `changes.filepath` (where the last listing is "
                "kept, e.g. ${globals:root}/02_intermediate/raw_listing.parquet)"
            )
        listing = fsspec.core.split_protocol(settings.pop("filepath"))[1]
        if folder_times:
            settings.pop("queue_url", None)
        feed = FolderTimes if folder_times else ChangeFeed
        try:
            return feed(filesystem=self._filesystem, root=self._root, listing=listing, **settings)
        except TypeError as error:
            raise DatasetError(
                f"{self._path}: a `changes` setting is not one of {feed.__name__}'s ({error}); "
                "see medical_ct/changes.py"
            ) from None

    def load(self) -> StoredFiles:
        if isinstance(self._changes, FolderTimes):
            listing = self._changes.versions()
        elif isinstance(self._filesystem, LocalFileSystem):
            listing = local_versions(self._root)[0]
        elif self._changes is not None:
            listing = self._changes.versions(self._store_versions)
        else:
            listing = self._store_versions()
        return StoredFiles(listing, self._filesystem.cat_file, self._root)

    def _store_versions(self) -> pa.Table:
        """The store's listing (``size:ETag``; ``listing_table``), one class folder a thread."""
        filesystem = self._filesystem
        filesystem.invalidate_cache(self._root)  # another process (the service) adds files
        try:
            top = filesystem.ls(self._root, detail=True)
        except FileNotFoundError:
            return listing_table([], [])
        folders = [entry["name"] for entry in top if entry["type"] == "directory"]
        listing = {entry["name"]: entry for entry in top if entry["type"] != "directory"}
        with ThreadPoolExecutor(max(1, min(self._listing_threads, len(folders)))) as pool:
            for found in pool.map(lambda folder: filesystem.find(folder, detail=True), folders):
                listing.update(found)
        prefix = len(self._root) + 1
        files = [path for path, info in listing.items() if info.get("type") != "directory"]
        return listing_table(
            [path[prefix:] for path in files], [object_version(listing[path]) for path in files]
        )

    def save(self, data: dict[str, Any]) -> None:
        """Write each ``<Class>/<file>``; a save of several files is marked unfinished beside
        the folder until its last file is written (``save_unfinished``): ingest's 44,204
        files one by one, and a retry after a failure part-way found files and wrote no more.
        """
        many = len(data) > 1
        if many:
            started = {"files": len(data), "started_at": datetime.now(UTC).isoformat()}
            write_json(self._filesystem, self._unfinished_marker, started)
        for partition, content in data.items():
            image = content() if callable(content) else content
            write_file(
                self._filesystem,
                posixpath.join(self._root, partition),
                lambda file, image=image: file.write(image),
                durable=self._durable,
            )
        if many:
            self._filesystem.rm_file(self._unfinished_marker)

    @property
    def _unfinished_marker(self) -> str:
        return f"{self._root}{UNFINISHED_SAVE_SUFFIX}"  # beside the folder: never listed

    def save_unfinished(self) -> bool:
        """Whether a save of several files into the folder stopped before its last file."""
        self._filesystem.invalidate_cache(self._unfinished_marker)
        return self._filesystem.exists(self._unfinished_marker)

    def read(self, partition: str) -> bytes:
        """One file's bytes (``<Class>/<file>``), without listing the store: the review reads
        the few images its records name, where a listing of every image ever sent cost about
        5 µs a file on every /review, image shown and accept (50 ms at 10,000 pending).

        Raises:
            DatasetError: ``partition`` would leave the folder (a record edited by hand).
            FileNotFoundError: No such file.
        """
        return self._filesystem.cat_file(f"{self._root}/{inside(self._path, partition)}")

    def has_files(self) -> bool:
        """Whether any file lies under the folder, found without listing all of it (nor
        reading the event queue): on an object store a folder exists only while a key lies
        under it, so one listing of the top level answers (one request on S3); on a local
        disk, where empty folders exist, the walk stops at the first file."""
        if isinstance(self._filesystem, LocalFileSystem):
            return _local_has_file(self._root)
        self._filesystem.invalidate_cache(self._root)
        try:
            return bool(self._filesystem.ls(self._root, detail=False))
        except FileNotFoundError:
            return False

    def _exists(self) -> bool:
        return self.has_files()

    def _describe(self) -> dict[str, Any]:
        changes = self._changes.describe() if self._changes else {}
        return {"path": self._path, **changes}


class FolderHasFilesDataset(ImageFolderDataset):
    """Whether an image folder holds any file at all (``ImageFolderDataset.has_files``), and
    False while a save into it is unfinished (``save_unfinished``).

    Ingest only needs to know whether the raw store is empty; listing a store of millions of
    images to learn that would cost as much as the run's real listing. Read-only.
    """

    def load(self) -> bool:  # type: ignore[override]
        if self.save_unfinished():
            logger.warning(
                "A save into %s stopped part-way (%s%s is left): the folder counts as empty, "
                "so ingest writes every file again",
                self._path,
                self._path,
                UNFINISHED_SAVE_SUFFIX,
            )
            return False
        return self.has_files()

    def save(self, data: Any) -> None:
        raise DatasetError(f"{type(self).__name__} is read-only: save to the ImageFolderDataset")


def _local_file_names(folder: str, prefix: str = "") -> list[str]:
    """The names of the files under a local folder (``prefix`` + the path below it); the
    entries' types come with the listing (``d_type``), so no file is asked its ``stat``."""
    names = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    names += _local_file_names(entry.path, f"{prefix}{entry.name}/")
                elif entry.is_file():
                    names.append(prefix + entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return names


def _local_has_file(folder: str) -> bool:
    """Whether a file lies under a local folder: ``os.scandir`` reads entries as they come,
    so this stops at the first file (fsspec's ``walk`` listed a whole class folder first).
    What a killed ingest left half-written (``*.partial``) is not a file of the store."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file() and not entry.name.endswith(PARTIAL_SUFFIX):
                    return True
                if entry.is_dir(follow_symlinks=False) and _local_has_file(entry.path):
                    return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    return False


class MlflowReportDataset(AbstractDataset[Any, Any]):
    """A report saved with any Kedro dataset (local or S3) and copied into the active MLflow run.

    kedro-mlflow's ``MlflowArtifactDataset`` logs the saved file's path, which only works for
    local files; this copies the saved bytes to a temporary file first, so reports can live
    in the bucket and in MLflow alike.

    The wrapped dataset is made on first use: kedro-mlflow makes every dataset of the catalog
    when a run starts, and making a plot's ``MatplotlibDataset`` imports matplotlib's pyplot
    (0.4 s), which data_processing and most tasks of the weekly DAG never use.
    """

    def __init__(self, *, dataset: dict[str, Any], artifact_path: str = "") -> None:
        self._dataset_config = dict(dataset)
        self._artifact_path = artifact_path

    @cached_property
    def _dataset(self) -> AbstractDataset:
        return AbstractDataset.from_config("report", dict(self._dataset_config))

    def load(self) -> Any:
        return self._dataset.load()

    def save(self, data: Any) -> None:
        self._dataset.save(data)
        if mlflow.active_run() is None:
            return
        filepath = self._dataset_config["filepath"]
        with tempfile.TemporaryDirectory() as folder:
            copy = Path(folder) / PurePosixPath(filepath).name
            with fsspec.open(filepath, "rb") as stored:
                copy.write_bytes(stored.read())
            mlflow.log_artifact(str(copy), self._artifact_path or None)

    def _exists(self) -> bool:
        return self._dataset.exists()

    def _describe(self) -> dict[str, Any]:
        return {"dataset": self._dataset_config, "artifact_path": self._artifact_path}


class RegisteredModelDataset(AbstractDataset[None, registry.RegisteredClassifier | None]):
    """A model version of the MLflow Model Registry, by alias; ``None`` when the alias is unset.

    Read-only: versions are registered and aliases moved by the evaluation pipeline's gate.
    """

    def __init__(self, alias: str = registry.CHAMPION_ALIAS, model_name: str = registry.MODEL_NAME):
        self._alias = alias
        self._model_name = model_name

    def load(self) -> registry.RegisteredClassifier | None:
        return registry.load_alias(self._alias, self._model_name)

    def save(self, data: None) -> None:
        raise DatasetError(f"{type(self).__name__} is read-only")

    def _describe(self) -> dict[str, Any]:
        return {"model_uri": registry.model_uri(self._alias, self._model_name)}


class OptionalPartitionedDataset(PartitionedDataset):
    """``PartitionedDataset`` that loads an empty or missing folder as ``{}``, and whose saved
    files appear whole or not at all.

    For stores another process fills in (the prediction log; the review's records are
    ``RecordsDataset``): having nothing there yet is normal, not an error; and a reader
    (another worker, the review, monitoring) lists them while a writer adds files. A local
    file is written under a name no listing takes (``filename_suffix``, then ``.partial``) and
    renamed into place, which is atomic; an object store's PUT already is. ``durable`` (the
    default: what the service logged cannot be made again) syncs each file to the disk before
    ``save`` returns (``shards.whole_file``).
    """

    def __init__(self, *, durable: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._durable = durable

    def load(self) -> dict[str, Callable[[], Any]]:
        self.release()  # drops the cached listing: another process adds files
        if not self.exists():
            return {}
        return super().load()

    def save(self, data: dict[str, Any]) -> None:
        # Without a suffix a temporary name would be listed too; overwrite removes the folder.
        in_place = self._overwrite or not self._filename_suffix
        if in_place or not isinstance(self._filesystem, LocalFileSystem):
            super().save(data)
            return
        for partition_id, content in data.items():
            lazy = callable(content) and self._save_lazily
            path = self._partition_to_path(partition_id)
            with whole_file(self._filesystem, path, durable=self._durable) as temporary:
                config = {**self._dataset_config, self._filepath_arg: temporary}
                self._dataset_type(**config).save(content() if lazy else content)
        self._invalidate_caches()


class RecordLoaders(Mapping[str, Callable[[], Any]]):
    """``{id: loader}`` of one listing of a ``RecordsDataset``; a loader is made when asked
    for. A ``partial`` per record at every listing cost more than the listing itself (0.12 s
    at 50,000 records, most of it the garbage collector walking the new objects)."""

    def __init__(self, paths: dict[str, str], filesystem: fsspec.AbstractFileSystem) -> None:
        self._paths = paths
        self._filesystem = filesystem

    def __getitem__(self, record_id: str) -> Callable[[], Any]:
        return partial(self._load, self._paths[record_id])

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._paths

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def keys(self) -> KeysView[str]:
        return self._paths.keys()

    def fetched(self, record_ids: Iterable[str]) -> dict[str, Callable[[], Any]]:
        """Loaders of ``record_ids`` whose files are read now, together: on an object store
        fsspec's ``cat`` of a list gathers the GETs (s3fs: 128 at a time), where one record at
        a time waited out the store's latency once a record (the service's first look, a full
        rescan, monitoring's first run: tens of thousands). On moto's server with 20 ms added
        to each request, 1,000 records took 28.9 s one at a time and 4.5 s gathered
        (``benchmarks/bench_records_s3.py``). A local disk gains nothing: its records are read
        when their loaders are called, as before.
        """
        loaders = {record_id: self[record_id] for record_id in record_ids}
        if isinstance(self._filesystem, LocalFileSystem) or not loaders:
            return loaders
        paths = [self._paths[record_id] for record_id in loaders]
        contents = self._filesystem.cat(paths, on_error="return")
        for record_id, path in zip(loaders, paths, strict=True):
            content = contents.get(path)
            if isinstance(content, bytes):  # else (an error, a name fsspec globbed) read alone
                loaders[record_id] = partial(self._load, path, content)
            elif isinstance(content, FileNotFoundError):  # none: asking again finds none
                loaders[record_id] = partial(_raise, content)
        return loaders

    def _load(self, path: str, content: bytes | None = None) -> Any:
        try:
            return json.loads(self._filesystem.cat_file(path) if content is None else content)
        except ValueError as error:
            raise DatasetError(f"{path} is not JSON") from error


def _raise(error: Exception) -> None:
    raise error


def fetched(
    loaders: Mapping[str, Callable[[], Any]], record_ids: Iterable[str]
) -> Mapping[str, Callable[[], Any]]:
    """The loaders of ``record_ids``, their files read together where the store allows it
    (``RecordLoaders.fetched``); any other mapping of loaders is taken as it is."""
    if isinstance(loaders, RecordLoaders):
        return loaders.fetched(record_ids)
    return {record_id: loaders[record_id] for record_id in record_ids}


class RecordsDataset(AbstractDataset[dict[str, Any], RecordLoaders]):
    """A store of JSON records, one file each (``<path>/<id>.json``): the review's pending,
    accepted and rejected records and its audit log.

    Loads as ``{id: loader}`` (``{}`` while the folder is missing: nobody wrote yet), listing
    the folder afresh each time (the service's workers and the review add records) and
    reading a record only when its loader is called. Saves ``{id: record}``, each file whole
    (``shards.write_file``: a listing never sees half a record) and, with ``durable`` (the
    default: records nobody can make again), synced to the disk before ``save`` returns.

    Kedro's ``PartitionedDataset`` made a ``JSONDataset`` per file at every listing (about 0.1
    ms each): at 10,000 pending and 10,000 accepted records the service spent 1.6 s of every
    /feedback and /review listing them.
    """

    SUFFIX = ".json"

    def __init__(
        self, *, path: str, credentials: dict[str, Any] | None = None, durable: bool = True
    ) -> None:
        self._path = path
        self._filesystem, self._root = open_store(path, **(credentials or {}))
        self._durable = durable

    def load(self) -> RecordLoaders:
        paths = {record_id: f"{self._root}/{record_id}{self.SUFFIX}" for record_id in self.ids()}
        return RecordLoaders(paths, self._filesystem)

    def ids(self, under: str = "") -> list[str]:
        """The ids of the records under the subfolder ``under`` (all by default), listed
        afresh, without reading one: the burst limit lists the last two minutes of the
        submissions store (``<minute>/...``), not every submission ever sent."""
        prefix = f"{inside(self._path, under)}/" if under else ""
        folder = f"{self._root}/{prefix}".rstrip("/")
        end = -len(self.SUFFIX)
        return [
            prefix + name[:end]
            for name in self._names(folder)
            if name.endswith(self.SUFFIX)  # not a *.partial being written
        ]

    def _names(self, folder: str) -> list[str]:
        """Every file's name under ``folder``, relative to it (``[]`` while it is missing).

        On a local disk from ``os.scandir``'s names alone: fsspec's ``find`` asks every file
        its ``stat`` and builds a dict of it, about 7 µs a record, which the service paid on
        every /feedback and /review (0.14 s at 10,000 pending and 10,000 accepted records).
        """
        if isinstance(self._filesystem, LocalFileSystem):
            return _local_file_names(folder)
        self._filesystem.invalidate_cache(folder)  # other processes add records
        try:
            paths = self._filesystem.find(folder)
        except FileNotFoundError:
            return []
        return [path[len(folder) + 1 :] for path in paths]

    def save(self, data: dict[str, Any]) -> None:
        for record_id, record in data.items():
            write_json(self._filesystem, self._path_of(record_id), record, durable=self._durable)

    def create(self, record_id: str, record: Any) -> bool:
        """Store ``record`` as ``record_id`` only if no record has that id; whether it did.

        The store decides, not a check before the write: of two processes creating the same
        id at once, exactly one gets True (a hard link on a disk, ``If-None-Match`` on S3).
        """
        path = self._path_of(record_id)
        try:
            write_json(self._filesystem, path, record, durable=self._durable, exclusive=True)
        except FileExistsError:
            return False
        return True

    def delete(self, record_id: str) -> None:
        """Remove record ``record_id`` (nothing if it is not there)."""
        with contextlib.suppress(FileNotFoundError):
            self._filesystem.rm_file(self._path_of(record_id))

    def has(self, record_id: str) -> bool:
        """Whether record ``record_id`` is stored, asked of the store (a HEAD on S3, a ``stat``
        on a disk) and not of a listing: a decision checks the one id it decides, where a
        listing of every record ever decided grows by a LIST request every 1,000 on S3."""
        path = self._path_of(record_id)
        self._filesystem.invalidate_cache(path)  # other processes add records
        return self._filesystem.exists(path)

    def loaders(self, record_ids: Iterable[str]) -> RecordLoaders:
        """The loaders of ``record_ids``, found by their names, not by a listing (calling one
        raises ``FileNotFoundError`` when there is none); an id that would leave the store
        (a name edited by hand in a journal) is left out."""
        paths = {}
        for record_id in record_ids:
            with contextlib.suppress(DatasetError):
                paths[record_id] = self._path_of(record_id)
        return RecordLoaders(paths, self._filesystem)

    def _path_of(self, record_id: str) -> str:
        return f"{self._root}/{inside(self._path, record_id)}{self.SUFFIX}"

    def _exists(self) -> bool:
        return self._filesystem.exists(self._root)

    def _describe(self) -> dict[str, Any]:
        return {"path": self._path, "durable": self._durable}


class TableInput(MetaDataset):
    """A table of strings as an MLflow input dataset: source, digest, schema and row count.

    ``mlflow.data.from_pandas`` infers the schema by looking at every value of every object
    column: 28 s for a manifest of 500,000 rows, the largest cost of a weekly rerun at that
    size. The manifest's columns are all strings, so the schema is known without reading it.
    """

    def __init__(
        self, source: DatasetSource, *, name: str, digest: str, columns: list[str], rows: int
    ) -> None:
        schema = Schema([ColSpec(DataType.string, column) for column in columns])
        super().__init__(source, name=name, digest=digest, schema=schema)
        self._rows, self._elements = rows, rows * len(columns)

    @property
    def profile(self) -> dict[str, int]:
        return {"num_rows": self._rows, "num_elements": self._elements}

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


class MlflowInputDataset(MlflowReportDataset):
    """A table saved with any Kedro dataset, copied into the active MLflow run as an artifact
    and logged as the run's input dataset (``mlflow.log_input``), so the MLflow UI lists it
    under the run's (and so the registered version's) datasets.

    The MLflow dataset's digest and tag ``dataset_fingerprint`` are the model input's
    fingerprint, the one registered versions are tagged with.

    ``unless_logged``: save nothing when the active run already holds the artifact. For the
    run that registers a version, which must hold its manifest: a ``kedro run`` of the whole
    pipeline (or an Airflow DAG run: one MLflow run) logged it in data_processing already,
    while a ``kedro run --pipelines evaluation`` of its own did not.
    """

    def __init__(
        self,
        *,
        dataset: dict[str, Any],
        artifact_path: str = "",
        name: str,
        context: str,
        unless_logged: bool = False,
    ) -> None:
        super().__init__(dataset=dataset, artifact_path=artifact_path)
        self._name = name
        self._context = context
        self._unless_logged = unless_logged

    def logged_in_active_run(self) -> bool:
        """Whether the active MLflow run holds this dataset's artifact (``False``: no run)."""
        run = mlflow.active_run()
        if run is None:
            return False
        name = PurePosixPath(self._dataset_config["filepath"]).name
        path = posixpath.join(self._artifact_path, name)
        listed = mlflow.MlflowClient().list_artifacts(run.info.run_id, self._artifact_path or None)
        return any(artifact.path == path for artifact in listed)

    def save(self, data: pd.DataFrame) -> None:
        if self._unless_logged and self.logged_in_active_run():
            return
        super().save(data)
        if mlflow.active_run() is None:
            return
        fingerprint = manifest.manifest_fingerprint(data)
        logged = TableInput(
            resolve_dataset_source(str(self._dataset_config["filepath"])),
            name=self._name,
            digest=fingerprint[:32],  # MLflow keeps at most 36 characters
            columns=list(data.columns),
            rows=len(data),
        )
        mlflow.log_input(logged, context=self._context, tags={"dataset_fingerprint": fingerprint})

    def _describe(self) -> dict[str, Any]:
        return {
            **super()._describe(),
            "name": self._name,
            "context": self._context,
            "unless_logged": self._unless_logged,
        }


class RegisteredVersionsDataset(AbstractDataset[None, dict[str, registry.RegisteredVersion]]):
    """Every version of the registered model, by version number; metadata read on demand.

    Read-only. ``manifest_artifact`` is where ``training_manifest`` is logged in a run.
    """

    def __init__(self, *, manifest_artifact: str, model_name: str = registry.MODEL_NAME):
        self._manifest_artifact = manifest_artifact
        self._model_name = model_name

    def load(self) -> dict[str, registry.RegisteredVersion]:
        return registry.registered_versions(self._manifest_artifact, self._model_name)

    def save(self, data: None) -> None:
        raise DatasetError(f"{type(self).__name__} is read-only")

    def _describe(self) -> dict[str, Any]:
        return {"model_name": self._model_name, "manifest_artifact": self._manifest_artifact}


class ChampionAliasDataset(AbstractDataset[dict[str, Any], str | None]):
    """The ``champion`` alias: loads the version it points to (``None`` when unset); saving a
    move (see ``pipelines.rollback``) tags the versions involved, then moves the alias."""

    def __init__(self, model_name: str = registry.MODEL_NAME):
        self._model_name = model_name

    def load(self) -> str | None:
        return registry.alias_version(registry.CHAMPION_ALIAS, self._model_name)

    def save(self, data: dict[str, Any]) -> None:
        registry.apply_champion_move(data, self._model_name)

    def _describe(self) -> dict[str, Any]:
        return {"model_uri": registry.model_uri(registry.CHAMPION_ALIAS, self._model_name)}


# What the service writes (PredictionLog._partitions); <flush> since names could collide.
LOG_PARTITION = re.compile(r"date=\d{4}-\d{2}-\d{2}/hour=\d{2}/(\d+)-(\d+)-[\w.-]+", re.ASCII)


def log_file_times(partition: str) -> tuple[int, int]:
    """The times (ms) of the first and last record of a prediction log file, from its name:
    one reading of ``LOG_PARTITION`` for the listing, monitoring and ``/feedback``."""
    first, last = LOG_PARTITION.fullmatch(partition).groups()
    return int(first), int(last)


def hour_partition(time_ms: int) -> str:
    """The prediction log's folder of the hour ``time_ms`` falls in: ``date=YYYY-MM-DD/hour=HH``.

    These names sort in time order, so the hours from one on are the names from it on."""
    moment = datetime.fromtimestamp(time_ms / 1000, UTC)
    return f"date={moment:%Y-%m-%d}/hour={moment:%H}"


class PredictionLogDataset(OptionalPartitionedDataset):
    """The service's prediction log: Parquet files that are only ever added, never rewritten.

    Partitions are ``date=YYYY-MM-DD/hour=HH/<first ms>-<last ms>-<writer>-<flush>.parquet``:
    one file per flush of one service worker, so workers and replicas never write the same
    object, and a reader (monitoring, review) takes only the hours it has not read yet. Saving
    takes ``{partition: DataFrame}`` and adds those files; loading returns ``{partition:
    loader}`` (``{}`` before the first prediction) like ``PartitionedDataset``, listed when
    first looked into (``LoggedFiles``), so a reader can list only the hours it needs.
    """

    def __init__(self, *, path: str, **kwargs: Any) -> None:
        kwargs.setdefault("dataset", {"type": "pandas.ParquetDataset"})
        kwargs.setdefault("filename_suffix", ".parquet")
        super().__init__(path=path, **kwargs)

    def load(self) -> "LoggedFiles":
        return LoggedFiles(self)

    def partitions(self, since_hour: str | None = None) -> dict[str, Callable[[], Any]]:
        """The partitions of the hours from ``since_hour`` (``date=YYYY-MM-DD/hour=HH``) on;
        every one without it. Lists the ``date=`` folders, then the hours of the dates from
        ``since_hour``'s on, then the files of those hours: a reader that needs the last days
        of a log of years lists those days, not every file ever written."""
        root = self._normalized_path.rstrip("/")
        self._filesystem.invalidate_cache(root)  # the service's workers add files
        since_date = since_hour.split("/", 1)[0] if since_hour else ""
        partitions: dict[str, Callable[[], Any]] = {}
        for date in self._folders(root):
            if date < since_date:
                continue
            for hour in self._folders(f"{root}/{date}"):
                if f"{date}/{hour}" >= (since_hour or ""):
                    partitions.update(self.hour_partitions(f"{date}/{hour}"))
        return partitions

    def _folders(self, path: str) -> list[str]:
        """The names of the folders in ``path``, sorted (``[]`` while it is missing)."""
        try:
            entries = self._filesystem.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            posixpath.basename(entry["name"].rstrip("/"))
            for entry in entries
            if entry["type"] == "directory"
        )

    def hour_partitions(self, hour: str) -> dict[str, Callable[[], Any]]:
        """The partitions of one ``hour`` (``date=YYYY-MM-DD/hour=HH``), listing nothing else.

        Each loader makes its Parquet dataset when called: making one per file as it was
        listed cost 206 µs and 1.8 KB a file. A file not named as the service names them
        (``LOG_PARTITION``: a copy made by hand, an export) is left out with a warning: its
        name says nothing of its records' times, which monitoring and /feedback go by, and
        one such name stopped both."""
        folder = f"{self._normalized_path.rstrip('/')}/{hour}"
        try:
            paths = self._filesystem.find(folder)
        except FileNotFoundError:
            return {}
        partitions, odd = {}, []
        for path in sorted(paths):
            if path.endswith(self._filename_suffix):
                partition = self._path_to_partition(path)
                if LOG_PARTITION.fullmatch(partition):
                    partitions[partition] = partial(self._load_file, path)
                else:
                    odd.append(partition)
        if odd:
            logger.warning(
                "Prediction log: left out %s, not named date=YYYY-MM-DD/hour=HH/<first ms>-"
                "<last ms>-<writer>-<flush>%s as the service names its files: move them out "
                "of %s (a copy of a log file in it would count its records twice)",
                ", ".join(odd),
                self._filename_suffix,
                self._path,
            )
        return partitions

    def _load_file(self, path: str) -> Any:
        config = {**self._dataset_config, self._filepath_arg: self._join_protocol(path)}
        return self._dataset_type(**config).load()


class LoggedFiles(Mapping[str, Callable[[], Any]]):
    """``{partition: loader}`` of a ``PredictionLogDataset``, listed when first looked into;
    ``since`` lists only the hours from one on (``PredictionLogDataset.partitions``).

    Monitoring reads only the files added since its last run, but a listing of the whole log
    made every weekly run cost more as the log aged: a year at a file a second per worker is
    tens of millions of files.
    """

    def __init__(self, dataset: PredictionLogDataset) -> None:
        self._dataset = dataset

    @cached_property
    def _listed(self) -> dict[str, Callable[[], Any]]:
        return self._dataset.partitions()

    def since(self, hour: str) -> dict[str, Callable[[], Any]]:
        """The partitions of the hours from ``hour`` (``date=YYYY-MM-DD/hour=HH``) on."""
        return self._dataset.partitions(hour)

    def __getitem__(self, partition: str) -> Callable[[], Any]:
        return self._listed[partition]

    def __iter__(self) -> Iterator[str]:
        return iter(self._listed)

    def __len__(self) -> int:
        return len(self._listed)


class MlflowRunTagsDataset(AbstractDataset[dict[str, str], None]):
    """Tags of the active MLflow run: saving ``{name: value}`` sets them (``{}`` sets none).

    For what a person filters runs by in the MLflow UI (``tags.`monitoring.alert` != ''``):
    kedro-mlflow logs parameters, metrics and artifacts, not tags. Values are cut to
    MLflow's limit of 5,000 characters. Write-only; outside an MLflow run it does nothing.
    """

    _MAX_TAG_LENGTH = 5000

    def load(self) -> None:
        raise DatasetError(f"{type(self).__name__} is write-only: read the tags in MLflow")

    def save(self, data: dict[str, str]) -> None:
        if data and mlflow.active_run() is not None:
            mlflow.set_tags(
                {name: str(value)[: self._MAX_TAG_LENGTH] for name, value in data.items()}
            )

    def _describe(self) -> dict[str, Any]:
        return {}


class MlflowRunIdDataset(AbstractDataset[None, str | None]):
    """The id of the active MLflow run (``None`` outside one): what run a node's output
    belongs to, for a state that a retry of the same run must not take as an earlier run's
    (monitoring's). Read-only."""

    def load(self) -> str | None:
        run = mlflow.active_run()
        return None if run is None else run.info.run_id

    def save(self, data: None) -> None:
        raise DatasetError(f"{type(self).__name__} is read-only: MLflow names its runs")

    def _describe(self) -> dict[str, Any]:
        return {}


class OptionalJSONDataset(AbstractDataset[Any, Any]):
    """A JSON state a run reads back the next time (monitoring's: what it read through, the
    figures of its last runs): ``None`` while it does not exist (before a first run wrote it).

    Written whole (``shards.write_file``): Kedro's ``JSONDataset`` writes in place, so a run
    killed mid-write left half a file, and every later run failed to read it with a bare JSON
    error until someone deleted it. A file that is not JSON (edited by hand) is an error that
    says what deleting it costs.
    """

    def __init__(self, *, filepath: str, credentials: dict[str, Any] | None = None) -> None:
        self._filepath = filepath
        self._filesystem, self._path = open_store(filepath, **(credentials or {}))

    def load(self) -> Any:
        try:
            text = self._filesystem.cat_file(self._path)
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except ValueError as error:
            raise DatasetError(
                f"{self._filepath} is not JSON ({error}): restore it, or delete it to start "
                "afresh (monitoring then reads the whole prediction log again, and its trend "
                "of earlier runs starts over)"
            ) from None

    def save(self, data: Any) -> None:
        write_json(self._filesystem, self._path, data)

    def _exists(self) -> bool:
        return self._filesystem.exists(self._path)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath}
