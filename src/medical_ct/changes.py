"""Listing what is new in an image store, instead of every file, on S3 and on a local disk.

A weekly rerun must find the few thousand files that changed among millions. Both ways keep
the store's last listing (``listing``: a Parquet file of file and version) and patch it:

- **S3** (``ChangeFeed``): a listing of every key costs one request per 1,000 keys, for ever
  more keys; S3 can instead send an event for every object created or deleted to an SQS queue
  (README, "Listing what is new on S3"). Each key an event names is asked again (one HEAD: its
  size and ETag now, or gone), so an event is only a hint: duplicates, events out of order or
  for an object overwritten since cannot make the listing wrong.
- **Local disk** (``FolderTimes``): a folder's modification time moves when a file is added to
  it, removed from it or renamed into it, so only the folders whose time moved are listed
  (README, "Listing what is new on a local disk").

Either lists everything instead, and starts patching again from that listing, when:

- there is no saved listing yet, or its last full listing is older than
  ``full_listing_days`` (30 by default: a monthly full listing repairs whatever the events
  or the folder times missed, e.g. while the notification was misconfigured);
- the saved listing's times are over an hour ahead of the clock (saved by a run whose clock
  was wrong: its age, which the other reasons need, cannot be told);
- ``full_listing`` is set (``kedro run --params data_processing.full_rescan=true``);
- on S3, the saved listing is older than the queue can keep events
  (``queue_retention_days``: SQS keeps them at most 14 days; a run that stopped for weeks lost
  some), or more than ``max_events`` messages wait (listing 1,000 keys a request is then
  cheaper than reading 10 messages a request), or a message is not an S3 event (the warning
  shows it).

Messages are deleted only once the listing that includes them is saved: a run that stops
before that sees them again (after ``visibility_timeout_seconds``).
"""

import io
import json
import logging
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from stat import S_ISDIR, S_ISLNK, S_ISREG
from typing import Any
from urllib.parse import unquote_plus

import boto3
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medical_ct.shards import PARQUET_WRITE_OPTIONS, PARTIAL_SUFFIX, write_file

logger = logging.getLogger(__name__)

_DAY = 86400.0
_CLOCK_SKEW = 3600.0  # a saved time further ahead of now than this was saved by a wrong clock
SQS_MAX_RETENTION_DAYS = 14  # the longest SQS keeps a message
_DRAINED_AFTER_SECONDS = 1  # a long poll answering no message this long: the queue is drained
_LISTED_AT, _SAVED_AT = b"medical_ct.full_listing_at", b"medical_ct.saved_at"
_FOLDER_TIMES = b"medical_ct.folder_times"


@dataclass(frozen=True)
class _Listing:
    table: pa.Table  # file (partition), version ("size:ETag" or "size:mtime:ctime")
    listed_at: float  # when its last full listing ran (epoch seconds)
    saved_at: float  # when it was last saved, patched or not
    folder_times: dict[str, int] = field(default_factory=dict)  # local: "A/B/" -> st_mtime_ns

    def in_folders(self, folders: list[str]) -> pa.Table:
        """The rows of the files right inside ``folders`` (``"A/B/"``; ``""`` the root),
        picked in Arrow: no Python string per file."""
        folder = pc.replace_substring_regex(self.table.column("file"), "[^/]*$", "")
        return self.table.filter(pc.is_in(folder, value_set=pa.array(folders, pa.string())))


def listing_table(files: list[str], versions: list[str | None]) -> pa.Table:
    """A listing as every reader of it takes it: ``file`` and ``version`` string columns."""
    return pa.table(
        {"file": pa.array(files, pa.string()), "version": pa.array(versions, pa.string())}
    )


def listing_versions(listing: pa.Table) -> dict[str, str | None]:
    """``{partition: version}`` of a listing, for lookups by name."""
    files, versions = (listing.column(name).to_pylist() for name in ("file", "version"))
    return dict(zip(files, versions, strict=True))


def _read_listing(filesystem: fsspec.AbstractFileSystem, path: str) -> _Listing | None:
    try:
        table = pq.read_table(io.BytesIO(filesystem.cat_file(path)))
        metadata = table.schema.metadata or {}
        listed_at, saved_at = float(metadata[_LISTED_AT]), float(metadata[_SAVED_AT])
        folder_times = json.loads(metadata.get(_FOLDER_TIMES, b"{}"))
        table = table.select(["file", "version"]).cast(
            pa.schema([("file", pa.string()), ("version", pa.string())])
        )
    except FileNotFoundError:
        return None
    except Exception as error:  # unreadable: list everything and write it again
        logger.warning("%s is not a readable listing (%r): listing again", path, error)
        return None
    return _Listing(table, listed_at, saved_at, folder_times)


def _write_listing(
    filesystem: fsspec.AbstractFileSystem,
    path: str,
    table: pa.Table,
    listed_at: float,
    folder_times: dict[str, int] | None = None,
) -> None:
    metadata = {_LISTED_AT: str(listed_at), _SAVED_AT: str(time.time())}
    if folder_times is not None:
        metadata[_FOLDER_TIMES] = json.dumps(folder_times)
    table = table.replace_schema_metadata(metadata)
    write_file(filesystem, path, lambda file: pq.write_table(table, file, **PARQUET_WRITE_OPTIONS))


def _full_listing_reason(
    saved: _Listing | None, full_listing: bool, full_listing_days: float
) -> str:
    """Why this run lists every file (``""``: it patches ``saved``); see the module."""
    if full_listing:
        return "full_listing is set"
    if saved is None:
        return "no saved listing yet"
    ahead = max(saved.listed_at, saved.saved_at) - time.time()
    if ahead > _CLOCK_SKEW:
        return (
            f"the saved listing's times are {ahead / 3600:.0f} h ahead of this host's clock: a "
            "run whose clock was wrong saved it, and its age (which decides the monthly full "
            "listing and, on S3, whether the queue may have dropped events) cannot be told; "
            "check the hosts' time sync (NTP)"
        )
    if time.time() - saved.listed_at > full_listing_days * _DAY:
        return f"the last full listing is over {full_listing_days:g} days old"
    return ""


def object_version(info: dict[str, Any]) -> str:
    """``size:ETag`` of a file as fsspec describes it (``mtime`` where a store has no ETag):
    what a listing records and a HEAD gives, so that the two compare."""
    version = info.get("ETag") or info.get("mtime") or info.get("LastModified", "")
    return f"{info.get('size')}:{str(version).strip(chr(34))}"


class NotAnS3Event(ValueError):
    """A queue message that is not an S3 event notification."""


def event_keys(body: str) -> list[str]:
    """``bucket/key`` of every S3 record of one SQS message (direct or through SNS).

    S3's test event (sent when a notification is configured) names none. Keys arrive
    URL-encoded (``+`` for spaces), as S3 sends them.

    Raises:
        NotAnS3Event: The body is not JSON or has no S3 records.
    """
    message = _json(body, body)
    if isinstance(message, dict) and "Records" not in message and "Message" in message:
        message = _json(message["Message"], body)  # S3 -> SNS -> SQS
    if isinstance(message, dict) and message.get("Event") == "s3:TestEvent":
        return []
    try:
        return [
            f"{record['s3']['bucket']['name']}/{unquote_plus(record['s3']['object']['key'])}"
            for record in message["Records"]
            if str(record.get("eventSource", "aws:s3")) == "aws:s3"
        ]
    except (KeyError, TypeError, AttributeError) as error:
        raise NotAnS3Event(f"no S3 records ({error!r}): {body[:200]!r}") from None


def _json(text: Any, body: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError) as error:
        raise NotAnS3Event(f"not JSON ({error}): {body[:200]!r}") from None


class ChangeFeed:
    """The versions of an S3 folder's files, kept up to date from its event queue.

    Args:
        filesystem: The folder's fsspec (s3fs) filesystem, which also keeps the listing.
        root: The folder, ``bucket/prefix``.
        queue_url: The SQS queue S3 sends the folder's events to.
        listing: Where the last listing is saved on ``filesystem`` (Parquet), outside
            ``root``.
        full_listing: List everything this time (the full_rescan parameter).
        full_listing_days, queue_retention_days, max_events: See the module docstring.
        visibility_timeout_seconds: How long received messages stay hidden from another run.
    """

    def __init__(
        self,
        *,
        filesystem: fsspec.AbstractFileSystem,
        root: str,
        queue_url: str,
        listing: str,
        full_listing: bool = False,
        full_listing_days: float = 30,
        queue_retention_days: float = SQS_MAX_RETENTION_DAYS,
        max_events: int = 100_000,
        visibility_timeout_seconds: int = 1800,
        head_threads: int = 16,
    ) -> None:
        self._filesystem, self._root = filesystem, root
        self._queue_url, self._listing = queue_url, listing
        self._full_listing = full_listing
        self._full_listing_days, self._retention_days = full_listing_days, queue_retention_days
        self._max_events, self._visibility = max_events, visibility_timeout_seconds
        self._head_threads = head_threads

    @cached_property
    def _sqs(self) -> Any:
        """The SQS client, made on first use (0.25 s): a catalog builds this dataset in every
        Airflow task, most of which never load it. boto3 takes the endpoint
        (AWS_ENDPOINT_URL) and keys from the environment, like s3fs; the region from the
        queue's AWS address, else the environment's."""
        region = re.match(r"https://sqs\.([a-z0-9-]+)\.amazonaws\.com", self._queue_url)
        return boto3.client(
            "sqs",
            region_name=region.group(1)
            if region
            else boto3.session.Session().region_name or "us-east-1",
        )

    def versions(self, list_all: Callable[[], pa.Table]) -> pa.Table:
        """The listing now (``listing_table``): the last one patched with the queue's events,
        or ``list_all()`` when a full listing is due (see the module docstring)."""
        saved = _read_listing(self._filesystem, self._listing)
        messages = self._receive()
        try:
            keys = self._keys(messages)
            reason = self._full_listing_reason(saved, len(messages))
        except NotAnS3Event as error:
            logger.warning("%s: a message of %s is %s", self._root, self._queue_url, error)
            keys, reason = set(), "a queue message is not an S3 event (see the warning above)"
        if reason or saved is None:
            logger.info("%s: listing every file (%s)", self._root, reason)
            listing, listed_at = list_all(), time.time()
        else:
            versions = self._patch(listing_versions(saved.table), keys)
            listing = listing_table(list(versions), list(versions.values()))
            listed_at = saved.listed_at
            logger.info(
                "%s: %d event messages, %d keys asked again, %d files (no full listing)",
                self._root,
                len(messages),
                len(keys),
                listing.num_rows,
            )
        _write_listing(self._filesystem, self._listing, listing, listed_at)
        self._delete(messages)
        return listing

    def _full_listing_reason(self, saved: _Listing | None, messages: int) -> str:
        reason = _full_listing_reason(saved, self._full_listing, self._full_listing_days)
        if reason or saved is None:
            return reason
        if time.time() - saved.saved_at > self._retention_days * _DAY:
            return (
                f"the saved listing is over {self._retention_days:g} days old: the queue may "
                "have dropped events since"
            )
        if messages >= self._max_events:
            return f"{messages} or more event messages wait (max_events)"
        return ""

    def _keys(self, messages: list[dict]) -> set[str]:
        prefix = f"{self._root}/"
        return {
            key[len(prefix) :]
            for message in messages
            for key in event_keys(message["Body"])
            if key.startswith(prefix)
        }

    def _patch(self, versions: dict[str, str], keys: set[str]) -> dict[str, str]:
        def head(partition: str) -> tuple[str, str | None]:
            try:
                info = self._filesystem.info(f"{self._root}/{partition}", refresh=True)
            except FileNotFoundError:
                return partition, None
            return partition, object_version(info)

        patched = dict(versions)
        self._filesystem.invalidate_cache(self._root)
        with ThreadPoolExecutor(self._head_threads) as pool:
            for partition, version in pool.map(head, sorted(keys)):
                if version is None:
                    patched.pop(partition, None)
                else:
                    patched[partition] = version
        return patched

    def _receive(self) -> list[dict]:
        """Every waiting message, up to ``max_events``, read until SQS answers none.

        Long polls (``WaitTimeSeconds``): a short poll asks a subset of SQS's servers, so AWS
        documents that its empty answer does not mean the queue is empty, and stopping at one
        left a week's events unread (their files kept their old versions until the monthly
        full listing). A long poll asks every server: its empty answer means drained, at the
        cost of waiting it out once a run.
        """
        messages: dict[str, dict] = {}
        while len(messages) < self._max_events:
            batch = self._sqs.receive_message(
                QueueUrl=self._queue_url,
                MaxNumberOfMessages=10,
                VisibilityTimeout=self._visibility,
                WaitTimeSeconds=_DRAINED_AFTER_SECONDS,
            ).get("Messages", [])
            if not batch:
                break
            messages.update((message["MessageId"], message) for message in batch)
        return list(messages.values())

    def _delete(self, messages: list[dict]) -> None:
        for start in range(0, len(messages), 10):
            entries = [
                {"Id": str(number), "ReceiptHandle": message["ReceiptHandle"]}
                for number, message in enumerate(messages[start : start + 10])
            ]
            failed = self._sqs.delete_message_batch(QueueUrl=self._queue_url, Entries=entries)
            if failed.get("Failed"):  # seen again next run: a HEAD more, nothing lost
                logger.warning("%s: %d messages not deleted", self._root, len(failed["Failed"]))

    def describe(self) -> dict[str, Any]:
        return {"queue_url": self._queue_url, "listing": self._listing}


# A folder changed this close to its listing may change again within the same tick of the
# file system's clock without its time moving: it is listed again next run (git does the same).
_RACY_NS = 2_000_000_000


class FolderTimes:
    """The versions of a local folder's files, listing only the folders whose time moved.

    A folder's modification time moves when a file is added to it, removed from it or renamed
    into it (how most writers replace a file: a temporary file, then a rename). A folder whose
    time is the one saved with the last listing holds the same names, so their versions are
    taken from that listing: the folder is not listed and its files are not asked for their
    size and time (one ``stat`` each, the largest cost of a rerun over a million files). A store
    that adds images in new folders (an export folder per day or week) is then listed at the
    cost of what is new, plus one ``stat`` per folder.

    What it cannot see: a file whose bytes are rewritten in place, in a folder nothing was
    added to or removed from since. The monthly full listing (``full_listing_days``) and
    ``full_listing`` (``full_rescan``) find it. Off by default (``folder_times`` in the
    catalog's ``changes`` of ``raw_images``).

    Args:
        filesystem: The local filesystem, which also keeps the listing.
        root: The image folder.
        listing: Where the last listing is saved (Parquet), outside ``root``.
        full_listing, full_listing_days: See the module docstring.
    """

    def __init__(
        self,
        *,
        filesystem: fsspec.AbstractFileSystem,
        root: str,
        listing: str,
        full_listing: bool = False,
        full_listing_days: float = 30,
    ) -> None:
        self._filesystem, self._root, self._listing = filesystem, root, listing
        self._full_listing, self._full_listing_days = full_listing, full_listing_days

    def versions(self) -> pa.Table:
        """The listing now (``listing_table``; see the class docstring)."""
        saved = _read_listing(self._filesystem, self._listing)
        reason = _full_listing_reason(saved, self._full_listing, self._full_listing_days)
        if reason or saved is None:
            logger.info("%s: listing every file (%s)", self._root, reason)
            listing, folder_times, _ = local_versions(self._root, {})
            listed_at = time.time()
        else:
            listed, folder_times, unchanged = local_versions(self._root, saved.folder_times)
            listing = pa.concat_tables([listed, saved.in_folders(unchanged)])
            listed_at = saved.listed_at
            logger.info(
                "%s: %d of %d folders changed since the last listing: %d files asked again, "
                "%d files (no full listing)",
                self._root,
                len(folder_times) - len(unchanged),
                len(folder_times),
                listed.num_rows,
                listing.num_rows,
            )
            if folder_times == saved.folder_times:
                return listing  # nothing to save: the saved listing is this one
        _write_listing(self._filesystem, self._listing, listing, listed_at, folder_times)
        return listing

    def describe(self) -> dict[str, Any]:
        return {"folder_times": True, "listing": self._listing}


def local_versions(
    root: str, saved_folder_times: dict[str, int] | None = None
) -> tuple[pa.Table, dict[str, int], list[str]]:
    """The listing (``listing_table``, ``size:mtime:ctime``) of a local folder: one ``lstat``
    a file.

    The version is the file's size, ``st_mtime`` and ``st_ctime_ns`` (of the target, for a
    link). ``cp -p``, ``rsync -a``, ``tar -x`` and ``unzip`` set a file's mtime back, so
    different bytes of the same size kept ``size:mtime``; the inode change time is set by the
    system whenever a file is created, written or its inode changed (setting its mtime back
    too), and no tool can set it back. It comes with the same ``lstat``. A version of an
    earlier run without it (``size:mtime``) never matches: such a file is read and decoded
    once more.

    With ``saved_folder_times`` (``{"A/B/": st_mtime_ns}`` of the last listing; ``{}``: none),
    each folder is asked its time first, and a folder whose time is the saved one is not
    listed (``FolderTimes``): its subfolders, known from the saved times, are visited, its files
    are left out of the result. ``None`` (the default) lists every folder and asks no time.

    fsspec's ``find`` builds a dict of a dozen fields per file and the partition was cut with
    ``posixpath.relpath``: 33 s for 500,000 images, the largest cost of a weekly rerun at that
    size. Names from ``os.listdir`` and one ``os.lstat`` each, its mode telling files from
    folders, took 1.7 s at 500,000 files; ``os.scandir``'s entries, asked ``is_dir``,
    ``is_file`` and ``is_symlink`` besides, 2.0 s. The system calls alone take about 1 s of
    it. A file still being written under its temporary name (``*.partial``,
    ``shards.whole_file``) is left out.

    Returns:
        The listing of the files listed, every folder's time now (0 for a folder changed in
        the last 2 s: listed again next time) and the folders not listed.
    """
    files: list[str] = []
    versions: list[str] = []
    folder_times: dict[str, int] = {}
    unchanged: list[str] = []
    subfolders = _subfolders(saved_folder_times or {})
    now = time.time_ns()
    folders = [(root, "")]
    while folders:
        folder, partition_prefix = folders.pop()
        try:
            if saved_folder_times is not None:
                mtime = os.stat(folder).st_mtime_ns
                folder_times[partition_prefix] = mtime if now - mtime > _RACY_NS else 0
                if saved_folder_times.get(partition_prefix) == mtime:
                    unchanged.append(partition_prefix)
                    folders += [(f"{root}/{sub[:-1]}", sub) for sub in subfolders[partition_prefix]]
                    continue
            names = _utf8_names(folder, os.listdir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            path = f"{folder}/{name}"
            try:
                own = os.lstat(path)
            except FileNotFoundError:  # deleted while listing
                continue
            if S_ISREG(own.st_mode):
                if name.endswith(PARTIAL_SUFFIX):  # being written (shards.whole_file)
                    continue
            elif S_ISDIR(own.st_mode):
                folders.append((path, f"{partition_prefix}{name}/"))
                continue
            elif S_ISLNK(own.st_mode):
                own = _linked_file(path)
                if own is None:
                    continue
            else:
                continue
            files.append(partition_prefix + name)
            versions.append(f"{own.st_size}:{own.st_mtime}:{own.st_ctime_ns}")
    return listing_table(files, versions), folder_times, unchanged


def _utf8_names(folder: str, names: list[str]) -> list[str]:
    """``names`` but those that are not UTF-8, each skipped with a warning that names it.

    Linux names are bytes; ``os.listdir`` escapes bytes that are not UTF-8 (a Latin-1
    ``café.jpeg`` copied from an SMB share) as surrogates, which no listing (Arrow strings, S3
    keys) can hold: one such file stopped every run with an error naming neither it nor what
    to do. One encode of the folder's names when all are UTF-8, as nearly always.
    """
    try:
        "/".join(names).encode()
    except UnicodeEncodeError:
        return [name for name in names if _is_utf8(f"{folder}/{name}")]
    return names


def _is_utf8(path: str) -> bool:
    try:
        path.encode()
    except UnicodeEncodeError:
        logger.warning(
            "Skipping %s: its name is not UTF-8, which the listing needs; give it a UTF-8 "
            "name (convmv -f latin1 -t utf8 --notest renames Latin-1 ones) and the next run "
            "lists it",
            os.fsencode(path),
        )
        return False
    return True


def _subfolders(folders: dict[str, int]) -> defaultdict[str, list[str]]:
    """``{"A/": ["A/B/", ...]}``: each folder's subfolders among ``folders`` (root: ``""``)."""
    subfolders: defaultdict[str, list[str]] = defaultdict(list)
    for folder in folders:
        if folder:
            parent = folder[:-1].rpartition("/")[0]
            subfolders[f"{parent}/" if parent else ""].append(folder)
    return subfolders


def _linked_file(path: str) -> os.stat_result | None:
    """The ``stat`` of the file a link points to (its version is the target's: replacing the
    target must change it); ``None`` for a broken link or one to a folder.

    A link to a folder is not followed (a link back up would list for ever), but said: a class
    folder linked from a share left a whole class out of training without a word.
    """
    try:
        target = os.stat(path)
    except OSError:
        return None
    if S_ISDIR(target.st_mode):
        logger.warning(
            "Skipping %s: a link to a folder, which the listing does not follow, so none of "
            "its images are trained on; put the folder itself there (move it, or mount it "
            "with mount --bind) or link each of its files",
            path,
        )
        return None
    return target if S_ISREG(target.st_mode) else None


def create_event_queue(bucket: str, prefix: str, queue_name: str = "medical-ct-raw-events") -> str:
    """Create the SQS queue of a raw store's S3 events and subscribe it; returns its URL.

    Once per bucket, with the runs' AWS_* variables (README, "Listing what is new on S3"):
    the queue keeps messages 14 days (the most SQS allows), lets the bucket send to it, and
    receives every object created or removed under ``prefix`` (e.g. ``team-a/01_raw/mednist/``).
    It replaces the bucket's other notification settings: merge by hand where there are any.
    """
    sqs, s3 = boto3.client("sqs"), boto3.client("s3")
    url = sqs.create_queue(
        QueueName=queue_name,
        Attributes={"MessageRetentionPeriod": str(SQS_MAX_RETENTION_DAYS * 86400)},
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "s3.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": arn["QueueArn"],
                "Condition": {"ArnLike": {"aws:SourceArn": f"arn:aws:s3:::{bucket}"}},
            }
        ],
    }
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(policy)})
    rule = {"Name": "prefix", "Value": prefix}
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": arn["QueueArn"],
                    "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
                    "Filter": {"Key": {"FilterRules": [rule]}},
                }
            ]
        },
    )
    return url
