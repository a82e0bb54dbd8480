"""Decoded pixels in shards: what a weekly rerun adds is new shards, never a rewrite of the rest.

A decoded image set is a folder::

    <folder>/index.parquet        one row per file of the image store (accepted or rejected):
                                  file, version, label, content_hash, shard, row, reason
                                  (empty when accepted), reused (from the run before)
    <folder>/shards/<sha>.npy     uint8 (n, 64, 64) pixels, named by the hash of their bytes

Shards are written once and never changed (their name is their content), so a rerun writes
the shards of the images it decoded and a new index (tens of bytes per image). Both are plain
Parquet and NumPy files: a reader needs no code of the writer (no pickles, ``allow_pickle``
off). Files that were changed or deleted leave dead rows in old shards; ``full_rescan``
decodes everything again into fresh shards, and deletes the ones that neither its index nor
the index it replaced names (a reader of that one may still be streaming its shards).

The model input (train, validation and test sets) is a folder holding only an index: for each
image its content hash, label and the (store, shard, row) of its pixels in the decoded sets.
Training reads the pixels into memory (``ModelInputSet["images"]``) or streams them shard by
shard (``medical_ct.pipelines.training.stream``) when they do not fit.
"""

import contextlib
import hashlib
import io
import logging
import os
import posixpath
import secrets
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO, NamedTuple

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import infer_storage_options
from kedro.io import AbstractDataset, DatasetError

from medical_ct.preprocessing import IMAGE_SIZE, PREPROCESSING_SPEC

logger = logging.getLogger(__name__)


class IndexRow(NamedTuple):
    """One row of a decoded set's index, as the decode node makes it: a tuple, not a dict,
    because a full run makes one per file (a dict of eight keys was 0.6 KB an image)."""

    file: str
    version: str | None
    label: str
    content_hash: str = ""
    shard: str = ""
    row: int = -1
    reason: str = ""
    reused: bool = False


INDEX_COLUMNS = list(IndexRow._fields)
# ``file``: where the image came from in its store, for the training manifest.
MODEL_INPUT_COLUMNS = ["content_hash", "label", "source", "file", "shard", "row"]
# Memory of one image in a shard, and of the model input held in memory by training.
IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE

ShardLoader = Callable[[], np.ndarray]

# Every index a run rewrites (decoded sets, model input, the store's listing) is zstd Parquet,
# level 1: hex hashes and paths take half the bytes of the default snappy (a million images:
# the decoded index 80 MiB, now 42; read 0.16 s, now 0.12; written 0.1 s slower), which a
# weekly rerun writes again, to S3 in production. The catalog's training manifest too.
PARQUET_WRITE_OPTIONS = {"compression": "zstd", "compression_level": 1}


# Text columns as pandas' Arrow-backed strings, in every index: one index with Python object
# columns (an empty feedback set read back from Parquet, whose empty columns have no type)
# made every column of the dedupe's concatenation Python strings: at 500k, build_model_input
# took 0.8 s instead of 0.4 s and its model input held 143 MiB instead of 75.
INDEX_DTYPES = {
    column: {"row": "int64", "reused": "bool"}.get(column, "str") for column in INDEX_COLUMNS
}


def empty_index() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in INDEX_DTYPES.items()})


def shard_name(pixels: np.ndarray) -> str:
    """The content address of a shard: 24 hex digits of the sha256 of its pixels."""
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:24] + ".npy"


class ShardedImages(Mapping):
    """A decoded image set: the index, the shards it had already, the shards decoded now.

    Reads as the mapping the nodes used before shards (``labels``, ``content_hashes``,
    ``files``, ``versions`` of the accepted images in file order, ``rejected`` and ``reused``)
    without reading any pixels: pixels are read by ``pixels_of`` (or by the model input) only.

    ``stored_shards`` lists the shard files of the folder it was loaded from (see
    ``missing_shards``); ``None`` for a set made in memory. ``preprocessing`` is the
    ``PREPROCESSING_SPEC`` that made its pixels: this code's for a set made now, what the
    index recorded for one loaded (``None``: an index written before it recorded one).
    """

    def __init__(
        self,
        index: pd.DataFrame,
        shards: Mapping[str, ShardLoader] | None = None,
        new_shards: Mapping[str, np.ndarray] | None = None,
        stored_shards: Callable[[], list[str]] | None = None,
        preprocessing: Mapping[str, Any] | None = PREPROCESSING_SPEC,
    ) -> None:
        self.index = index.reset_index(drop=True)
        self.preprocessing = preprocessing
        self.shards = dict(shards or {})
        self.new_shards = dict(new_shards or {})
        self._stored_shards = stored_shards
        # Files whose decoding was taken from the previous run (``reused`` rows).
        self.reused = int(self.index["reused"].sum())
        kept = (self.index["reason"] == "").to_numpy()
        # The index itself when nothing was rejected: no copy of it (180 MB at 500,000 images).
        self.accepted = self.index if kept.all() else self.index[kept].reset_index(drop=True)

    def __getitem__(self, key: str) -> Any:
        if key in ("labels", "content_hashes", "files", "versions"):
            column = {"labels": "label", "files": "file", "versions": "version"}.get(
                key, "content_hash"
            )
            return self.accepted[column].tolist()
        if key == "rejected":
            rejected = self.index[self.index["reason"] != ""]
            return [
                {"file": file, "reason": reason, "version": None if pd.isna(version) else version}
                for file, reason, version in zip(
                    rejected["file"], rejected["reason"], rejected["version"], strict=True
                )
            ]
        if key == "reused":
            return self.reused
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(("labels", "content_hashes", "files", "versions", "rejected", "reused"))

    def __len__(self) -> int:
        return 6

    def load_shard(self, name: str) -> np.ndarray:
        return self.shard_loader(name)()

    def missing_shards(self) -> set[str]:
        """The shards the index names that are not in its folder (deleted or lost by hand, a
        partial restore, a lifecycle rule): one listing of the folder, asked by the decode
        node only. A rerun that reused their rows reported success, every later rerun kept
        pointing at them, and only training or evaluation failed, weeks later maybe."""
        if self._stored_shards is None:
            return set()
        named = set(self.shards) - set(self.new_shards)
        return named - set(self._stored_shards())

    def shard_loader(self, name: str) -> ShardLoader:
        """What reads shard ``name``, holding neither this set nor its index.

        The next run's decoded set and the model input keep loaders of the shards they take
        from this set. A loader bound to the set kept its whole index (200 MiB at a million
        images) alive as long as they lived: in a catalog run until they are saved, in
        memory (``MemoryDataset``s: tests, a notebook) until their last node ran.
        """
        if name in self.new_shards:
            pixels = self.new_shards[name]
            return lambda: pixels
        return self.shards[name]

    def pixels_of(self, rows: np.ndarray) -> np.ndarray:
        """Pixels (len(rows), H, W) of accepted images by their row in file order."""
        located = self.accepted.iloc[rows]
        out = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        for name, positions in _groups(located["shard"].to_numpy()):
            out[positions] = self.load_shard(name)[located["row"].to_numpy()[positions]]
        return out


def _groups(keys: np.ndarray) -> Iterator[tuple[Any, np.ndarray]]:
    """(key, positions of that key) for each distinct key, in order of first appearance."""
    if len(keys) == 0:
        return
    values, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    for value_index in np.argsort(first):
        yield values[value_index], np.flatnonzero(inverse == value_index)


class ModelInputSet(Mapping):
    """One split of the model input: ``images`` (read on first use), ``labels``, ``content_hashes``.

    ``index`` rows say where each image's pixels are: ``source`` (``raw`` or ``feedback``),
    ``shard`` and ``row``. ``loaders`` maps (source, shard) to a function reading that shard.
    """

    def __init__(self, index: pd.DataFrame, loaders: Mapping[tuple[str, str], ShardLoader]) -> None:
        self.index = index.reset_index(drop=True)
        self.loaders = dict(loaders)
        self._images: np.ndarray | None = None

    def __getitem__(self, key: str) -> Any:
        if key == "images":
            if self._images is None:
                self._images = self.gather(np.arange(len(self.index)))
            return self._images
        if key == "labels":
            return self.index["label"].to_numpy(dtype=np.int64, copy=True)
        if key == "content_hashes":
            return self.index["content_hash"].tolist()
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(("images", "labels", "content_hashes"))

    def __len__(self) -> int:
        return 3

    def shard_groups(self) -> list[np.ndarray]:
        """The positions of this split's images, grouped by the shard that holds their pixels."""
        keys = (self.index["source"] + "/" + self.index["shard"]).to_numpy()
        return [positions for _, positions in _groups(keys)]

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """Images (len(positions), 1, H, W) uint8 of the given rows of the index."""
        located = self.index.iloc[positions]
        keys = (located["source"] + "/" + located["shard"]).to_numpy()
        rows = located["row"].to_numpy()
        out = np.empty((len(positions), 1, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        for key, where in _groups(keys):
            source, shard = key.split("/", 1)
            out[where, 0] = self.loaders[source, shard]()[rows[where]]
        return out


PARTIAL_SUFFIX = ".partial"  # a file being written: listings of a store leave it out


@contextlib.contextmanager
def whole_file(
    filesystem: fsspec.AbstractFileSystem,
    path: str,
    *,
    durable: bool = False,
    exclusive: bool = False,
) -> Iterator[str]:
    """A temporary name beside ``path`` (local disk) for the block to write; renamed to
    ``path`` when the block ends (a rename is atomic), deleted when it raises. A reader, and
    the next save, never see half a file: a disk that filled up or a run killed mid-write
    left one when files were written in place.

    ``durable``: the file's bytes reach the disk before its name does, and the name before
    this returns (``fsync`` of the file, then of its folder), so what a person wrote survives
    a power cut once it is acknowledged. Without it, the kernel writes when it likes, and a
    power cut may leave the new name on a short file: fine for what a rerun can make again
    (shards, indexes), not for a clinician's label. It adds 0.4 ms a small file here.

    ``exclusive``: ``FileExistsError`` where ``path`` exists, decided by the kernel (a hard
    link is made only where no name is), so of two processes exactly one writes it.
    """
    temporary = f"{path}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
    try:
        yield temporary
        if durable:
            _fsync(temporary)
        if exclusive:
            os.link(temporary, path)
            os.remove(temporary)
        else:
            os.replace(temporary, path)  # not fsspec's mv: shutil.move puts it inside a folder
        if durable:
            _fsync(posixpath.dirname(path))
    except BaseException:
        if filesystem.exists(temporary):  # a full disk: leave no debris
            filesystem.rm_file(temporary)
        raise


def _fsync(path: str) -> None:
    """Flush a local file's or folder's data and metadata to the disk (any descriptor of it
    will do: the kernel syncs the file, not the descriptor)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_file(
    filesystem: fsspec.AbstractFileSystem,
    path: str,
    write: Callable[[BinaryIO], None],
    *,
    durable: bool = False,
    exclusive: bool = False,
) -> None:
    """``write(file)`` into ``path``, whole or not at all: on a local disk through
    ``whole_file`` (``durable``, ``exclusive``: see there), straight to disk; on an object
    store in one PUT (atomic already, and stored durably before S3 answers it; ``exclusive``
    sends ``If-None-Match: *``, which S3 refuses with 412 where the key exists)."""
    if not isinstance(filesystem, LocalFileSystem):
        buffer = io.BytesIO()
        write(buffer)
        mode = {"mode": "create"} if exclusive else {}
        filesystem.pipe_file(path, buffer.getvalue(), **mode)
        return
    with (
        whole_file(filesystem, path, durable=durable, exclusive=exclusive) as temporary,
        filesystem.open(temporary, "wb") as file,
    ):
        write(file)


def _read_npy(filesystem: fsspec.AbstractFileSystem, path: str) -> np.ndarray:
    try:
        pixels = np.load(io.BytesIO(filesystem.cat_file(path)), allow_pickle=False)
    except FileNotFoundError:
        raise DatasetError(
            f"shard {path} is missing: run `kedro run --pipelines data_processing --params "
            "data_processing.full_rescan=true` to decode the stores again"
        ) from None
    except ValueError as error:
        raise DatasetError(
            f"shard {path} is not a NumPy array of pixels ({error}): delete it and run "
            "`kedro run --pipelines data_processing --params data_processing.full_rescan=true`"
        ) from None
    if pixels.dtype != np.uint8 or pixels.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetError(
            f"shard {path} holds {pixels.dtype} {pixels.shape}, not uint8 (n, {IMAGE_SIZE}, "
            f"{IMAGE_SIZE}) pixels: delete it and run data_processing with full_rescan=true"
        )
    return pixels


class _Folder:
    """A folder on any fsspec store, by the path the catalog gives.

    It keeps each index it wrote, with the file's checksum (size and time, or ETag on S3), until
    ``forget``: reading it back while that file is unchanged returns the kept table instead of
    reading the Parquet again. A data_processing run saves each decoded set and each split of
    the model input once, and its next nodes load them again: each decoded set three times,
    each split twice. A rerun's loads at a million images fell from 2.4 s to 1.4 s. A file
    another writer replaced in between is read, never the kept copy.
    """

    def __init__(self, path: str, credentials: dict[str, Any] | None = None) -> None:
        self._written: dict[str, tuple[pd.DataFrame, int]] = {}
        options = infer_storage_options(path)
        self.protocol = options["protocol"]
        if self.protocol == "file":
            self.filesystem = fsspec.filesystem("file", auto_mkdir=True)
        else:
            self.filesystem = fsspec.filesystem(self.protocol, **(credentials or {}))
        self.path = path.rstrip("/") if self.protocol != "file" else options["path"].rstrip("/")

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def shard_loader(self, name: str) -> ShardLoader:
        path = self.join("shards", name)
        return lambda: _read_npy(self.filesystem, path)

    def read_parquet(self, name: str) -> pd.DataFrame | None:
        kept = self._written.get(name)  # one lookup: ThreadRunner may load from two threads
        if kept is not None:
            table, checksum = kept
            self.filesystem.invalidate_cache(self.join(name))  # s3fs: a HEAD, not its listings
            try:
                if self.filesystem.checksum(self.join(name)) == checksum:
                    return table.copy(deep=False)  # copy-on-write: the caller cannot change it
            except FileNotFoundError:
                pass
            self._written.pop(name, None)
        try:
            data = self.filesystem.cat_file(self.join(name))
        except FileNotFoundError:
            return None
        try:
            return pd.read_parquet(io.BytesIO(data))
        except Exception as error:
            raise DatasetError(
                f"{self.join(name)} is not a readable Parquet index ({error}): delete it and "
                "run `kedro run --pipelines data_processing --params "
                "data_processing.full_rescan=true`"
            ) from None

    def write(self, name: str, write: Callable[[BinaryIO], None]) -> None:
        """Writes file ``name`` by ``write(file)``, whole or not at all (``write_file``).

        Written in place, half a shard left by a full disk or a killed run stayed: its name
        is its content's, so the next save of the same pixels found the name taken and kept
        it (a full rescan too), and the index then named a shard nobody could read.
        """
        path = self.join(name)
        write_file(self.filesystem, path, write)
        if isinstance(self.filesystem, LocalFileSystem):
            for leftover in self.filesystem.glob(f"{path}.*{PARTIAL_SUFFIX}"):  # a killed run's
                self.filesystem.rm_file(leftover)

    def write_parquet(self, name: str, data: pd.DataFrame) -> None:
        self.write(name, lambda file: data.to_parquet(file, index=False, **PARQUET_WRITE_OPTIONS))
        self._written[name] = (
            data.reset_index(drop=True),
            self.filesystem.checksum(self.join(name)),
        )

    def forget(self) -> None:
        """Drop the indexes kept since they were written (Kedro releases a dataset so)."""
        self._written.clear()


Location = str | dict[str, str]


def location(value: Location) -> str:
    """The path of a catalog location given as a string or as ``{"path"|"filepath": ...}``.

    The catalog nests every extra location under a ``path`` or ``filepath`` key because those
    are the keys Kedro makes absolute against the project: a bare relative string elsewhere in
    an entry would be read from the process's working directory, which is ``notebooks/`` in
    ``kedro jupyter`` (the notebook found its shards missing so).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and len(value) == 1 and {*value} <= {"path", "filepath"}:
        return next(iter(value.values()))
    raise DatasetError(
        f"a location is a path or {{path: ...}}, not {value!r}: fix the catalog entry"
    )


class _IndexedFolder:
    """What the datasets of a folder with an ``index.parquet`` share (before
    ``AbstractDataset`` in their bases): it exists when its index does, and Kedro's release
    drops the index its save kept (see ``_Folder``)."""

    _folder: _Folder

    def _exists(self) -> bool:
        return self._folder.filesystem.exists(self._folder.join("index.parquet"))

    def _release(self) -> None:
        super()._release()
        self._folder.forget()


# The key of the decoded index's ``attrs`` that records the preprocessing of its pixels: pandas
# keeps ``attrs`` in the Parquet schema's metadata (``PANDAS_ATTRS``, JSON), so any reader sees it.
PREPROCESSING_ATTR = "medical_ct.preprocessing"


class ShardedImagesDataset(_IndexedFolder, AbstractDataset[ShardedImages, ShardedImages | None]):
    """A decoded image set in a folder of shards (see the module); ``None`` when there is none.

    Saving writes the shards decoded by this run (``new_shards``; a shard already there is not
    written again) and then the index, with the preprocessing that made the pixels
    (``ShardedImages.preprocessing``), so a reader never sees an index naming a missing
    shard. A save whose index was built from scratch (``full_rescan``) also deletes the shards
    that neither the new index nor the one it replaces names: a reader of the replaced index
    can finish, and its shards go at the next rescan.

    ``legacy`` (``{"filepath": ...}``) is the single pickle earlier versions kept: it is never
    unpickled (a reader must not run the writer's code); when no index exists yet it makes the
    run decode everything once with a log line saying so, and it is deleted once the shards are
    saved.
    """

    def __init__(
        self,
        *,
        path: str,
        legacy: Location | None = None,
        credentials: dict[str, Any] | None = None,
    ) -> None:
        self._path = path
        self._folder = _Folder(path, credentials)
        self._legacy = location(legacy) if legacy else None
        self._credentials = credentials

    def load(self) -> ShardedImages | None:
        index = self._folder.read_parquet("index.parquet")
        if index is None:
            if self._legacy_exists():
                logger.warning(
                    "%s is a decoded set of an earlier version (one pickle, not read: a pickle "
                    "runs its writer's code): decoding every image once into %s; the pickle is "
                    "deleted when the shards are saved",
                    self._legacy,
                    self._path,
                )
            return None
        missing = set(INDEX_COLUMNS) - set(index.columns)
        if missing:
            raise DatasetError(
                f"{self._folder.join('index.parquet')} lacks columns {sorted(missing)}: delete "
                "it and run data_processing with full_rescan=true"
            )
        preprocessing = index.attrs.get(PREPROCESSING_ATTR)
        index = index.astype(INDEX_DTYPES)
        index["reason"] = index["reason"].fillna("")
        index["shard"] = index["shard"].fillna("")
        names = index.loc[index["shard"] != "", "shard"].unique()
        loaders = {name: self._folder.shard_loader(name) for name in names}
        return ShardedImages(
            index, loaders, stored_shards=self._shard_files, preprocessing=preprocessing
        )

    def save(self, data: ShardedImages) -> None:
        folder = self._folder
        existing = set(self._shard_files())
        for name, pixels in data.new_shards.items():
            if name in existing:
                continue
            folder.write(
                posixpath.join("shards", name),
                lambda file, pixels=pixels: np.save(
                    file, np.ascontiguousarray(pixels), allow_pickle=False
                ),
            )
        index = data.index[INDEX_COLUMNS]
        made_by = data.preprocessing
        index.attrs = {} if made_by is None else {PREPROCESSING_ATTR: dict(made_by)}
        rebuilt = data.reused == 0 and not data.shards  # from scratch: a full rescan
        replaced = self._shards_of_the_index_in_place() if rebuilt else set()
        folder.write_parquet("index.parquet", index)
        if rebuilt and replaced is not None:
            for name in existing - set(data.index["shard"].unique()) - replaced:
                folder.filesystem.rm_file(folder.join("shards", name))
        if self._legacy_exists():
            legacy = fsspec.open(self._legacy, **(self._credentials or {}))
            legacy.fs.rm_file(legacy.path)
            logger.info("Deleted %s: replaced by the shards in %s", self._legacy, self._path)

    def _shards_of_the_index_in_place(self) -> set[str] | None:
        """The shards the index a full rescan replaces names: kept until the next rescan.

        A reader that loaded that index before the rescan (a streamed training of hours, the
        monitoring reference) still reads its shards; deleted at once, it failed midway. So a
        rescan deletes only what neither index names: what the rescan before it left behind.
        ``None`` (delete nothing this time) when that index cannot be read.
        """
        try:
            data = self._folder.filesystem.cat_file(self._folder.join("index.parquet"))
        except FileNotFoundError:
            return set()
        try:  # its shard column only: a month's index of a million rows is 44 MB
            shards = pq.read_table(io.BytesIO(data), columns=["shard"]).column("shard")
        except Exception as error:
            logger.warning(
                "Deleting no shard this time: the index this rescan replaces is not a readable "
                "Parquet index with a shard column (%s), so which shards its readers use is "
                "unknown; the next rescan deletes what neither index names",
                error,
            )
            return None
        return set(shards.unique().to_pylist())

    def _shard_files(self) -> list[str]:
        folder = self._folder.join("shards")
        self._folder.filesystem.invalidate_cache(folder)  # s3fs: its listing, not a cached one
        try:
            paths = self._folder.filesystem.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        return [posixpath.basename(path.rstrip("/")) for path in paths]

    def _legacy_exists(self) -> bool:
        if not self._legacy:
            return False
        opened = fsspec.open(self._legacy, **(self._credentials or {}))
        return opened.fs.exists(opened.path)

    def _describe(self) -> dict[str, Any]:
        return {"path": self._path, "legacy": self._legacy}


class ModelInputDataset(_IndexedFolder, AbstractDataset[ModelInputSet, ModelInputSet]):
    """One split of the model input: an index into the decoded sets' shards (no pixels copied).

    ``shards_from`` names the folders of the decoded sets by source (``raw``, ``feedback``,
    each ``{"path": ...}``); the pixels are read from their shards when training or evaluation
    asks for them.
    """

    def __init__(
        self,
        *,
        path: str,
        shards_from: dict[str, Location],
        credentials: dict[str, Any] | None = None,
    ) -> None:
        self._path = path
        self._folder = _Folder(path, credentials)
        self._sources = {
            source: _Folder(location(folder), credentials) for source, folder in shards_from.items()
        }

    def load(self) -> ModelInputSet:
        index = self._folder.read_parquet("index.parquet")
        if index is None:
            raise DatasetError(
                f"no model input at {self._path}: run `kedro run --pipelines data_processing` first"
            )
        unknown = set(index["source"].unique()) - set(self._sources)
        if unknown:
            raise DatasetError(
                f"{self._path} refers to stores {sorted(unknown)} that shards_from does not "
                f"name ({sorted(self._sources)}): run data_processing again"
            )
        loaders = {
            (source, shard): self._sources[source].shard_loader(shard)
            for source, shard in index[["source", "shard"]]
            .drop_duplicates()
            .itertuples(index=False)
        }
        return ModelInputSet(index, loaders)

    def save(self, data: ModelInputSet) -> None:
        self._folder.write_parquet("index.parquet", data.index[MODEL_INPUT_COLUMNS])

    def _describe(self) -> dict[str, Any]:
        return {"path": self._path, "shards_from": sorted(self._sources)}


class OptionalModelInputDataset(ModelInputDataset):
    """A split of the model input that loads as ``None`` before data_processing wrote it.

    For readers that have something to do without it: monitoring on a fresh project (no
    champion, no model input yet) says so instead of failing.
    """

    def load(self) -> ModelInputSet | None:  # type: ignore[override]
        return super().load() if self._exists() else None


class NpzDataset(AbstractDataset[dict[str, Any], dict[str, Any]]):
    """A dict of arrays and lists (one level of nesting) in one NumPy ``.npz``, never a pickle.

    Keys are joined with ``/`` (``train/images``); lists of strings come back as lists,
    arrays as arrays. For outputs read by people and tests, like the rebuild's model input.
    """

    def __init__(self, *, filepath: str, credentials: dict[str, Any] | None = None) -> None:
        self._filepath = filepath
        self._credentials = credentials or {}

    def load(self) -> dict[str, Any]:
        with fsspec.open(self._filepath, "rb", **self._credentials) as stored:
            arrays = np.load(io.BytesIO(stored.read()), allow_pickle=False)
            data: dict[str, Any] = {}
            for key in arrays.files:
                value = arrays[key]
                value = value.tolist() if value.dtype.kind == "U" else value
                outer, _, inner = key.partition("/")
                if inner:
                    data.setdefault(outer, {})[inner] = value
                else:
                    data[outer] = value
        return data

    def save(self, data: dict[str, Any]) -> None:
        flat = {}
        for key, value in data.items():
            items = value.items() if isinstance(value, Mapping) else [("", value)]
            for inner, item in items:
                array = np.asarray(item, dtype=str) if isinstance(item, list) else np.asarray(item)
                flat[f"{key}/{inner}" if inner else key] = array
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **flat)
        with fsspec.open(self._filepath, "wb", auto_mkdir=True, **self._credentials) as stored:
            stored.write(buffer.getvalue())

    def _exists(self) -> bool:
        opened = fsspec.open(self._filepath, **self._credentials)
        return opened.fs.exists(opened.path)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath}
