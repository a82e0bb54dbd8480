"""Listing what is new in an S3 store: the bucket's event notifications, read from SQS.

A weekly rerun must find the few thousand objects that changed among millions. A listing of
every key costs one request per 1,000 keys, for ever more keys; S3 can instead send an event
for every object created or deleted to an SQS queue (README, "Listing what is new on S3").
``ChangeFeed`` keeps the store's last listing (``listing``: a Parquet file of key and version)
and patches it with the queue's events. Each key an event names is asked again (one HEAD: its
size and ETag now, or gone), so an event is only a hint: duplicates, events out of order or
for an object overwritten since cannot make the listing wrong.

It lists everything instead, and starts patching again from that listing, when:

- there is no saved listing yet, or its last full listing is older than
  ``full_listing_days`` (30 by default: a monthly full listing repairs whatever the events
  missed, e.g. while the notification was misconfigured);
- the saved listing is older than the queue can keep events (``queue_retention_days``: SQS
  keeps them at most 14 days; a run that stopped for weeks lost some);
- ``full_listing`` is set (``kedro run --params data_processing.full_rescan=true``);
- more than ``max_events`` messages wait (listing 1,000 keys a request is then cheaper than
  reading 10 messages a request), or a message is not an S3 event (the warning shows it).

Messages are deleted only once the listing that includes them is saved: a run that stops
before that sees them again (after ``visibility_timeout_seconds``).
"""

import io
import json
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import unquote_plus

import boto3
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

_DAY = 86400.0
SQS_MAX_RETENTION_DAYS = 14  # the longest SQS keeps a message
_LISTED_AT, _SAVED_AT = b"medical_ct.full_listing_at", b"medical_ct.saved_at"


@dataclass(frozen=True)
class _Listing:
    versions: dict[str, str]  # partition -> "size:ETag"
    listed_at: float  # when its last full listing ran (epoch seconds)
    saved_at: float  # when it was last saved, patched or not


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

    def versions(self, list_all: Callable[[], dict[str, str]]) -> dict[str, str]:
        """``{partition: version}`` now: last listing patched with the queue's events, or
        ``list_all()`` when a full listing is due (see the module docstring)."""
        saved = self._read_listing()
        messages = self._receive()
        try:
            keys = self._keys(messages)
            reason = self._full_listing_reason(saved, len(messages))
        except NotAnS3Event as error:
            logger.warning("%s: a message of %s is %s", self._root, self._queue_url, error)
            keys, reason = set(), "a queue message is not an S3 event (see the warning above)"
        now = time.time()
        if reason or saved is None:
            logger.info("%s: listing every file (%s)", self._root, reason)
            listing = _Listing(list_all(), now, now)
        else:
            listing = _Listing(self._patch(saved.versions, keys), saved.listed_at, now)
            logger.info(
                "%s: %d event messages, %d keys asked again, %d files (no full listing)",
                self._root,
                len(messages),
                len(keys),
                len(listing.versions),
            )
        self._write_listing(listing)
        self._delete(messages)
        return listing.versions

    def _full_listing_reason(self, saved: _Listing | None, messages: int) -> str:
        now = time.time()
        if self._full_listing:
            return "full_listing is set"
        if saved is None:
            return "no saved listing yet"
        if now - saved.listed_at > self._full_listing_days * _DAY:
            return f"the last full listing is over {self._full_listing_days:g} days old"
        if now - saved.saved_at > self._retention_days * _DAY:
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
        messages: dict[str, dict] = {}
        while len(messages) < self._max_events:
            batch = self._sqs.receive_message(
                QueueUrl=self._queue_url,
                MaxNumberOfMessages=10,
                VisibilityTimeout=self._visibility,
                WaitTimeSeconds=0,
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

    def _read_listing(self) -> _Listing | None:
        try:
            table = pq.read_table(io.BytesIO(self._filesystem.cat_file(self._listing)))
        except FileNotFoundError:
            return None
        except Exception as error:  # unreadable: list everything and write it again
            logger.warning("%s is not a readable listing (%s): listing again", self._listing, error)
            return None
        metadata = table.schema.metadata or {}
        if _LISTED_AT not in metadata or _SAVED_AT not in metadata:
            return None
        files, file_versions = (table.column(name).to_pylist() for name in ("file", "version"))
        versions = dict(zip(files, file_versions, strict=True))
        return _Listing(versions, float(metadata[_LISTED_AT]), float(metadata[_SAVED_AT]))

    def _write_listing(self, listing: _Listing) -> None:
        table = pa.table(
            {"file": list(listing.versions), "version": list(listing.versions.values())}
        )
        table = table.replace_schema_metadata(
            {_LISTED_AT: str(listing.listed_at), _SAVED_AT: str(listing.saved_at)}
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self._filesystem.pipe_file(self._listing, buffer.getvalue())

    def describe(self) -> dict[str, Any]:
        return {"queue_url": self._queue_url, "listing": self._listing}


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
