"""The review queue: feedback waits as *pending* until a reviewer accepts or rejects it.

Anyone holding the feedback token could otherwise rewrite ground truth: the next weekly run
would train, and the champion gate test, on whatever labels were posted. So ``/feedback``
only stores the image and its record as pending; ``data_processing`` reads the *accepted*
store alone (catalog ``feedback_images``), which only a reviewer's decision (or the optional
``auto_accept`` policy, audited the same way) writes to.

Every store is append-only: a decision adds an accepted or rejected record and a line of the
audit log (one object per decision: S3 has no append); nothing is deleted or rewritten. The
records are immutable, so each worker caches what it has read. Between its listings of the
record stores it reads only what the journals name: the submissions store (new items) and
the audit log (decisions), both filed by minute (``ReviewStore.look``).
"""

import bisect
import hashlib
import hmac
import io
import itertools
import json
import logging
import math
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import numpy as np
from kedro.io import CatalogProtocol, DatasetError
from PIL import Image

from medical_ct.datasets import ImageFolderDataset, fetched, inside, read_record
from medical_ct.preprocessing import InvalidImageError, preprocess_image
from medical_ct.serving import metrics
from medical_ct.serving.model_holder import InvalidModelOutputError, ServedModel

REVIEWER_TOKENS_VARIABLE = "MEDICAL_CT_REVIEWER_TOKENS"
PENDING_IMAGES = "pending_feedback_images"
PENDING_RECORDS = "pending_feedback_records"
ACCEPTED_IMAGES = "feedback_images"  # what data_processing trains on
ACCEPTED_RECORDS = "accepted_feedback_records"
REJECTED_RECORDS = "rejected_feedback_records"
AUDIT_LOG = "review_audit"
SUBMISSIONS = "feedback_submissions"  # <minute>/<submitter's hash>/<unix time>-<id>
DECISION_CLAIMS = "review_decision_claims"  # <id>: who is deciding it; created once, by one
REVOKED_RECORDS = "revoked_feedback_records"  # <id>: an accepted label taken back from training
FEEDBACK_ID = re.compile(r"[^/]{1,128}-[0-9a-f]{32}")  # feedback_id_of: <label>-<sha256[:32]>
# A journal entry is named by its writer's clock before the writes, so a look reads the
# journals' minutes from this long before the last look's start.
JOURNAL_OVERLAP = timedelta(minutes=2)
JOURNAL_MINUTES_MAX = 30  # a look longer after the last one lists every record store instead
AUTO_REVIEWER = "auto:agree_with_model"
DECISIONS = ("accept", "reject", "auto_accept")  # medical_ct_feedback_reviews_total{decision}

logger = logging.getLogger(__name__)


class ReviewError(Exception):
    """A review request that cannot be done: ``status`` says why (404, 409, 429)."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class StoreError(RuntimeError):
    """A store refused a write; nothing was acknowledged."""

    @classmethod
    def refused(cls, error: Exception) -> "StoreError":
        return cls(f"the review store refused the write ({type(error).__name__})")


@dataclass(frozen=True)
class ReviewConfig:
    """conf/<env>/review.yml, typed: the flags' thresholds and the auto-accept policy."""

    disagree_max_label_probability: float
    disagree_min_confidence: float
    burst_flag_per_minute: int
    burst_refuse_per_minute: int
    ood_reference_images_per_class: int
    ood_max_distance_ratio: float
    auto_accept: str
    auto_accept_min_confidence: float
    look_every_s: float
    list_every_s: float

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ReviewConfig":
        try:
            review = cls(
                disagree_max_label_probability=float(
                    config["model_disagrees_confidently"]["max_label_probability"]
                ),
                disagree_min_confidence=float(
                    config["model_disagrees_confidently"]["min_confidence"]
                ),
                burst_flag_per_minute=int(config["burst"]["flag_per_minute"]),
                burst_refuse_per_minute=int(config["burst"]["refuse_per_minute"]),
                ood_reference_images_per_class=int(
                    config["out_of_distribution"]["reference_images_per_class"]
                ),
                ood_max_distance_ratio=float(config["out_of_distribution"]["max_distance_ratio"]),
                # YAML reads a bare `off` as false
                auto_accept={"false": "off"}.get(
                    str(config["auto_accept"]["policy"]).lower(),
                    str(config["auto_accept"]["policy"]),
                ),
                auto_accept_min_confidence=float(config["auto_accept"]["min_confidence"]),
                look_every_s=float(config["look_every_s"]),
                list_every_s=float(config["list_every_s"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"conf review.yml is invalid ({error!r}): got {config!r}") from None
        problems = []
        for name in ("disagree_max_label_probability", "disagree_min_confidence"):
            if not 0 < getattr(review, name) < 1:
                problems.append(f"{name} must be between 0 and 1")
        if not 0 < review.burst_flag_per_minute <= review.burst_refuse_per_minute:
            problems.append("burst needs 0 < flag_per_minute <= refuse_per_minute")
        if review.ood_reference_images_per_class < 2 or review.ood_max_distance_ratio <= 0:
            problems.append("out_of_distribution needs >= 2 images per class, a ratio > 0")
        if review.look_every_s <= 0:
            problems.append(f"look_every_s must be over 0 seconds, not {review.look_every_s}")
        if review.list_every_s < review.look_every_s:
            problems.append(
                f"list_every_s ({review.list_every_s}) must be at least look_every_s "
                f"({review.look_every_s}): a look between two listings reads what is new"
            )
        if review.auto_accept not in ("off", "agree_with_model"):
            problems.append(f"auto_accept.policy is off or agree_with_model, not {review}")
        if problems:
            raise ValueError(f"conf review.yml: {'; '.join(problems)}")
        return review


def reviewer_tokens() -> dict[str, str]:
    """``$MEDICAL_CT_REVIEWER_TOKENS`` (``name:token,name:token``) as token -> reviewer name.

    Raises:
        ValueError: A pair without a name or a token; names what to fix, never the token.
    """
    tokens = {}
    for position, pair in enumerate(os.environ.get(REVIEWER_TOKENS_VARIABLE, "").split(",")):
        if not pair.strip():
            continue
        name, _, token = pair.strip().partition(":")
        if not name or not token:
            raise ValueError(
                f"{REVIEWER_TOKENS_VARIABLE}: pair {position + 1} is not name:token "
                "(comma-separated, e.g. alice:s3cret,bob:0ther)"
            )
        tokens[token] = name
    return tokens


def reviewer_of(authorization: str) -> str | None:
    """The reviewer whose token is in ``Authorization: Bearer <token>``; compared in constant
    time against every token, so the answer's timing tells nothing about the tokens."""
    given = authorization.removeprefix("Bearer ").encode()
    found = None
    for token, name in reviewer_tokens().items():
        if hmac.compare_digest(given, token.encode()):
            found = name
    return found


def image_extension(image: bytes) -> str:
    """The file extension of the image's format (``jpeg``, ``png``...), ``img`` if unknown."""
    with Image.open(io.BytesIO(image)) as opened:
        return (opened.format or "img").lower()


def feedback_id_of(label: str, digest: str) -> str:
    return f"{label}-{digest[:32]}"


def now() -> datetime:
    return datetime.now(UTC)


# What the service reads of a pending record (a record without them cannot be queued or
# decided; its feedback_id must be its file's name, its image must lie in the pending store);
# an accepted or rejected record only needs to be a JSON object.
_PENDING_FIELDS = ("feedback_id", "image", "label", "submitted_at", "sha256")


class _RecordCache:
    """The records of one partitioned store, read once each (they are never rewritten).

    A record that cannot be read (not JSON, not an object, a pending one without a field the
    queue reads: a hand edit, a disk error) is left out and tried again at the next listing,
    with an error in the log naming it and a gauge counting it
    (``medical_ct_feedback_unreadable_records``, alert ``MedicalCTFeedbackRecordUnreadable``):
    one bad file used to fail every /feedback and /review of every worker.
    """

    def __init__(
        self, catalog: CatalogProtocol, name: str, kept: Callable[[dict], dict] | None = None
    ) -> None:
        self._catalog = catalog
        self._name = name
        self._kept = kept or (lambda record: record)  # what is kept of each record read
        self._records: dict[str, dict] = {}
        self._unreadable: set[str] = set()
        self._lock = threading.Lock()

    def all(self) -> dict[str, dict]:
        """Every record of a listing of the store: those read before, and the new ones, read
        now. The lock is held only to merge what was read: a listing of years of records
        held back every decision and submission of the worker while it ran (seconds on S3).
        """
        partitions = self._catalog.load(self._name)
        with self._lock:
            new = partitions.keys() - self._records.keys()
        read, unreadable = {}, {}
        for key, load in fetched(partitions, new).items():
            record, problem = self._read(key, load)
            if problem:
                unreadable[key] = problem
            else:
                read[key] = self._kept(record)
        with self._lock:
            self._records.update(read)
            for key in unreadable.keys() - self._unreadable:  # once a file, not every look
                logger.error(
                    "Feedback record %s of %s cannot be read (%s): it is left out until it is "
                    "mended. Restore it from a backup (review_audit keeps who decided what and "
                    "when), or delete it (a pending item then waits for its image's next "
                    "/feedback)",
                    key,
                    self._name,
                    unreadable[key],
                )
            self._unreadable = set(unreadable)
            metrics.feedback_unreadable_records.labels(store=self._name).set(len(unreadable))
            return dict(self._records)

    def known(self) -> dict[str, dict]:
        """The records read or written so far, without listing the store."""
        with self._lock:
            return dict(self._records)

    def since(self, start: int) -> tuple[list[tuple[str, dict]], int]:
        """The records added after the first ``start`` (the cache only grows, in the order
        its records came), and how many it holds now."""
        with self._lock:
            return list(itertools.islice(self._records.items(), start, None)), len(self._records)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._records

    def unreadable(self) -> frozenset[str]:
        """The records the last listing found and could not read."""
        with self._lock:
            return frozenset(self._unreadable)

    def add(self, key: str, record: dict) -> None:
        """A record this worker just wrote (it stands: records are never rewritten)."""
        with self._lock:
            self._records[key] = self._kept(record)

    def has(self, key: str) -> bool:
        """Whether ``key`` is stored, readable or not: a record read already, or one the store
        has (one request, not a listing)."""
        with self._lock:
            if key in self._records:
                return True
        return self._catalog.get(self._name).has(key)

    def one(self, key: str) -> dict | None:
        """The record ``key`` (``read``), or None."""
        return self.read([key]).get(key)

    def read(self, keys: Iterable[str]) -> dict[str, dict]:
        """The records ``keys``, as read already or else read now, found by their names and
        not by a listing (the new ones' GETs gathered on S3). A key with no record, a record
        that cannot be read (the next listing names it) or a name that would leave the store
        is left out."""
        keys = set(keys)
        with self._lock:
            found = {key: self._records[key] for key in keys if key in self._records}
        loaders = self._catalog.get(self._name).loaders(keys - found.keys())
        read = {}
        for key, load in fetched(loaders, loaders.keys()).items():
            try:
                record, _ = self._read(key, load)
            except FileNotFoundError:
                continue
            if record is not None:
                read[key] = self._kept(record)
        with self._lock:
            self._records.update(read)
        return found | read

    def _read(self, key: str, load: Callable[[], Any]) -> tuple[dict | None, str | None]:
        """The record stored as ``key``, or what is wrong with it."""
        record, problem = read_record(load)
        if record is None or self._name != PENDING_RECORDS:
            return record, problem
        missing = [field for field in _PENDING_FIELDS if not isinstance(record.get(field), str)]
        if missing:
            return None, f"no {', '.join(missing)}"
        if record["feedback_id"] != key:  # the queue looks an item up by the id it names
            return None, f"feedback_id {record['feedback_id']!r} is not its file's name"
        try:
            _submitted_at(record)
        except ValueError:
            return None, f"submitted_at {record['submitted_at']!r} is not an ISO time"
        try:
            inside(PENDING_IMAGES, record["image"])  # the image is read by this path
        except DatasetError as error:
            return None, f"image {error}"
        return record, None


_DECIDED: dict = {}


def _decided(record: dict) -> dict:
    """What a worker keeps of a decision record: nothing but its id (the cache's key). The
    service asks only whether an item was decided; the whole records held 1.9 KB an item in
    every worker (0.19 GB at 100,000 decided items)."""
    return _DECIDED


@dataclass(frozen=True)
class Records:
    """The records of the three stores, as one listing of them found them (``records``) or
    as the worker knows them without one (``known``); of the decided items, their ids."""

    pending: dict[str, dict]
    accepted: frozenset[str]
    rejected: frozenset[str]
    # Ids whose decision record is stored but cannot be read: decided (a decision of one
    # answers 409), not waiting. The unreadable records' alert asks to mend them.
    decided_unreadable: frozenset[str] = frozenset()

    def waiting(self) -> list[dict]:
        """Records still waiting for a decision, oldest first."""
        decided = self.accepted | self.rejected | self.decided_unreadable
        return _oldest_first(self.pending, decided)


def _oldest_first(pending: dict[str, dict], decided: Set[str]) -> list[dict]:
    """The records of ``pending`` not ``decided``, oldest first."""
    waiting = [record for key, record in pending.items() if key not in decided]
    return sorted(waiting, key=lambda record: record["submitted_at"])


class ReviewStore:
    """Pending, accepted and rejected feedback and the audit log, all through the catalog."""

    def __init__(self, catalog: CatalogProtocol) -> None:
        self._catalog = catalog
        # At 0 from the start, so that the first refused entry is a rise Prometheus sees.
        metrics.start_at_zero(metrics.review_journal_refused, journal=(AUDIT_LOG, SUBMISSIONS))
        self._pending = _RecordCache(catalog, PENDING_RECORDS)
        self._accepted = _RecordCache(catalog, ACCEPTED_RECORDS, kept=_decided)
        self._rejected = _RecordCache(catalog, REJECTED_RECORDS, kept=_decided)
        self._decide_lock = threading.Lock()
        self._looked_at: datetime | None = None
        self._look_lock = threading.Lock()
        self._waiting: dict[str, dict] = {}  # pending, not decided (an unreadable one aside)
        self._counted = {cache: 0 for cache in (self._pending, self._accepted, self._rejected)}
        self._waiting_lock = threading.Lock()

    def records(self) -> Records:
        """One listing of each record store (only records not read before are loaded)."""
        return self._read_by(_RecordCache.all)

    def look(self, listing: bool = False) -> None:
        """Read what is new since this worker's last look (``waiting``, ``pending`` and
        ``known`` then say what it knows).

        With ``listing``, at the first look, or past ``JOURNAL_MINUTES_MAX`` since the last
        one, every record store is listed (``records``). Otherwise only the journals' folders
        of the minutes since the last look (less ``JOURNAL_OVERLAP``) are: the submissions
        store names every new pending item, the audit log every decision, and each record is
        read by its id (none read before is read again). A listing grows by a LIST request
        every 1,000 records on S3 (30 at 10,000 items each pending and accepted, a few
        seconds); a look between listings costs a few small ones, however many records years
        of feedback left. It misses what no journal names: what ``list_every_s``'s listings
        find (records written before the journals, or by hand, or whose journal entry a
        store refused; the unreadable ones).
        """
        started = now()
        with self._look_lock:
            last = self._looked_at
        if listing or last is None or started - last > timedelta(minutes=JOURNAL_MINUTES_MAX):
            self.records()
        else:
            self._read_journals(last - JOURNAL_OVERLAP, started)
        with self._look_lock:
            self._looked_at = max(started, self._looked_at or started)

    def _read_journals(self, since: datetime, until: datetime) -> None:
        """Read the records the journals name in the minutes from ``since`` to ``until``."""
        submitted, decided = set(), set()
        for minute in _minutes(since, until):
            submitted |= {_id_after(name, "-") for name in self._journal(SUBMISSIONS, minute)}
            decided |= {_id_after(name, "Z-") for name in self._journal(AUDIT_LOG, minute)}
        self._pending.read(submitted)
        self._rejected.read(decided - self._accepted.read(decided).keys())

    def _journal(self, name: str, minute: str) -> list[str]:
        return self._catalog.get(name).ids(minute)

    def waiting(self) -> list[dict]:
        """The items still waiting for a decision, oldest first, as this worker knows them:
        kept, and updated with the records read or written since the last call. Counting
        them anew (``Records.waiting`` over a copy of every record) cost every /feedback and
        /review 25-42 ms at 100,000 pending records, in the worker that answers /predict."""
        with self._waiting_lock:
            new, self._counted[self._pending] = self._pending.since(self._counted[self._pending])
            for key, record in new:
                if key not in self._accepted and key not in self._rejected:
                    self._waiting[key] = record
            for cache in (self._accepted, self._rejected):
                decided, self._counted[cache] = cache.since(self._counted[cache])
                for key, _ in decided:
                    self._waiting.pop(key, None)
            unreadable = self._accepted.unreadable() | self._rejected.unreadable()
            return _oldest_first(self._waiting, unreadable)

    def pending(self) -> dict[str, dict]:
        """Every pending record this worker has read or written, in the order it came."""
        return self._pending.known()

    def known(self) -> Records:
        """Every record as this worker last listed or wrote it, without a listing."""
        return self._read_by(_RecordCache.known)

    def _read_by(self, read: Callable[[_RecordCache], dict[str, dict]]) -> Records:
        pending, accepted, rejected = (
            read(c) for c in (self._pending, self._accepted, self._rejected)
        )
        unreadable = self._accepted.unreadable() | self._rejected.unreadable()
        return Records(pending, frozenset(accepted), frozenset(rejected), unreadable)

    def decided(self, feedback_id: str) -> str | None:
        """``accepted``, ``rejected`` or None, asked of the decision stores about this one id
        (a record there decides it, readable or not: a decision is never written twice)."""
        if self._accepted.has(feedback_id):
            return "accepted"
        return "rejected" if self._rejected.has(feedback_id) else None

    def submit(
        self, image: bytes, label: str, record: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """Store ``image`` under ``label`` as pending; a repeat is stored once (same id).

        A new item is also added to the submissions store under its minute and submitter
        (``recent_from``, the looks), once its record is stored. Nothing is listed: a repeat
        is found by its id (one request, none once the worker has read its record). A pending
        record that cannot be read is written anew.

        Returns:
            The pending record (the first one, for a repeat), and whether it is new.
        """
        digest = hashlib.sha256(image).hexdigest()
        feedback_id = feedback_id_of(label, digest)
        existing = self._pending.one(feedback_id)
        if existing is not None:
            return existing, False
        stored = {
            "feedback_id": feedback_id,
            "image": f"{label}/{digest}.{image_extension(image)}",
            "sha256": digest,
            "label": label,
            "submitted_at": now().isoformat(),
            **record,
        }
        try:
            self._catalog.save(PENDING_IMAGES, {stored["image"]: image})
            self._catalog.save(PENDING_RECORDS, {feedback_id: stored})
        except Exception as error:
            raise StoreError(
                f"the feedback store refused the write ({type(error).__name__})"
            ) from error
        self._pending.add(feedback_id, stored)
        sent = _submission_name(stored.get("submitter"), _submitted_at(stored), feedback_id)
        entry = {"feedback_id": feedback_id}
        self._add_to_journal(SUBMISSIONS, sent, entry, f"Feedback {feedback_id} is stored")
        return stored, True

    def _add_to_journal(self, journal: str, key: str, entry: dict, stands: str) -> None:
        """Add ``entry`` to ``journal`` once the record it names is stored. The record stands
        (it waits for a review, or trains), so a refused entry is logged whole, to be written
        back, and counted (alert ``MedicalCTReviewAuditEntryRefused``), not answered 503:
        that said nothing was stored or decided, and the retry found it done."""
        try:
            self._catalog.save(journal, {key: entry})
        except Exception as error:
            metrics.review_journal_refused.labels(journal=journal).inc()
            logger.error(
                "%s, but %s refused its entry (%r): other workers see it at their next "
                "listing. Write it back as %s.json there: %s",
                stands,
                journal,
                error,
                key,
                json.dumps(entry),
            )

    def recent_from(self, submitter: str, within: timedelta) -> list[datetime]:
        """When ``submitter``'s new items of the last ``within`` were sent, oldest first, by
        every replica: from the names in the submissions store's folders of those minutes
        and that submitter (two small listings for a minute). It listed every pending record
        ever sent, on every /feedback (a request per 1,000 on S3)."""
        until = now()
        since = until - within
        times = []
        for minute in _minutes(since, until):
            names = self._journal(SUBMISSIONS, f"{minute}/{_submitter_folder(submitter)}")
            times += [time for time in map(_sent_at, names) if time and time >= since]
        return sorted(times)

    def images(self, feedback_ids: list[str]) -> list[bytes | None]:
        """The submitted images, as sent, each read by the path its record names; None for one
        missing from the store (deleted by hand): its item can still be rejected, where one
        such file answered 500 to every ``GET /review`` that showed it."""
        records = self._pending.read(feedback_ids)
        unknown = [feedback_id for feedback_id in feedback_ids if feedback_id not in records]
        if unknown:
            raise unknown_feedback(unknown[0])
        images = self._catalog.get(PENDING_IMAGES)
        return [_read_or_none(images, records[key]["image"]) for key in feedback_ids]

    def image(self, feedback_id: str) -> bytes:
        """One submitted image; ``ReviewError`` 404 for an unknown id or a missing image."""
        if not FEEDBACK_ID.fullmatch(feedback_id):  # a name too long for a file was a 500
            raise unknown_feedback(feedback_id)
        (image,) = self.images([feedback_id])
        if image is None:
            raise ReviewError(404, missing_image(self._pending.one(feedback_id)))
        return image

    def decide(
        self, feedback_id: str, decision: str, reviewer: str, label: str | None = None
    ) -> tuple[dict[str, Any], list[dict]]:
        """Accept (under ``label`` if given, else the submitted one) or reject a pending item.

        The accepted image is copied into the store ``data_processing`` reads, then the
        decision record and an audit entry are added. The record is what makes the image
        train (``data_processing`` takes only accepted images a record names), so a decision
        the store refused after the image (503: "nothing was decided") trains nothing. Once
        the record is stored the decision stands: an audit entry refused then is logged whole
        and counted (``_add_to_journal``), not answered 503.
        Raises ``ReviewError`` 404 (unknown id) or 409 (already decided); the caller checks
        that ``label`` is a class (422). Nothing is listed: the item's record and whether it
        was decided are asked by its id. At 10,000 items each decided, every decision listed
        20,000 records (20 requests on S3).

        Returns:
            The decision record, and the items that still wait for a decision as this worker
            knows them, oldest first.
        """
        with self._decide_lock:
            submitted = FEEDBACK_ID.fullmatch(feedback_id) and self._pending.one(feedback_id)
            if not submitted:
                raise unknown_feedback(feedback_id)
            decided = self.decided(feedback_id)
            if decided is not None:
                raise ReviewError(
                    409, f"feedback {feedback_id!r} was already {decided}: decisions are final"
                )
            self._claim(feedback_id, decision, reviewer)
            try:
                return self._decide(submitted, decision, reviewer, label)
            except BaseException:
                self._release(feedback_id)
                raise

    def _claim(self, feedback_id: str, decision: str, reviewer: str) -> None:
        """Claim the decision on ``feedback_id`` for this request, in the store: the lock
        above holds within one worker only, and two workers (or replicas) that both found
        the item undecided both wrote their decision: an accept and a reject of one item,
        both answered 200, and the rejected image trained. The store lets one claim in."""
        claim = {"decision": decision, "reviewer": reviewer, "claimed_at": now().isoformat()}
        if self._create_once(DECISION_CLAIMS, feedback_id, claim):
            return
        held = self._claim_of(feedback_id)
        raise ReviewError(
            409,
            f"feedback {feedback_id!r} is being decided by another request "
            f"({held.get('reviewer')}: {held.get('decision')}, since {held.get('claimed_at')}): "
            "decisions are final; GET /review shows the outcome. A claim with no decision "
            f"a minute later was left by a worker that stopped: delete {feedback_id}.json "
            "from the review_decision_claims store and decide again",
        )

    def _release(self, feedback_id: str) -> None:
        """Delete the claim of a decision that failed (nothing was decided: decide again)."""
        try:
            self._catalog.get(DECISION_CLAIMS).delete(feedback_id)
        except Exception as error:
            logger.error(
                "The claim on feedback %s could not be deleted (%r): delete %s.json from the "
                "review_decision_claims store, or every decision on it answers 409",
                feedback_id,
                error,
                feedback_id,
            )

    def _claim_of(self, feedback_id: str) -> dict:
        """The claim on ``feedback_id`` ({} if it is gone or unreadable: only a message uses it)."""
        return self._stored(DECISION_CLAIMS, feedback_id)

    def _create_once(self, store: str, feedback_id: str, record: dict) -> bool:
        """Create ``feedback_id`` in ``store`` unless it is there (the store's exclusive
        create decides between workers); whether this call created it."""
        try:
            return self._catalog.get(store).create(feedback_id, record)
        except Exception as error:
            raise StoreError.refused(error) from error

    def _stored(self, store: str, feedback_id: str) -> dict:
        """The record ``feedback_id`` of ``store``, read now ({} if it is gone or unreadable)."""
        loaders = self._catalog.get(store).loaders([feedback_id])
        try:
            record, _ = read_record(loaders[feedback_id])
        except (KeyError, FileNotFoundError):
            return {}
        return record or {}

    def revoke(self, feedback_id: str, reviewer: str, reason: str) -> dict[str, Any]:
        """Take an accepted label back from training, for good, with who, when and why.

        Decisions are final and the stores only grow, so a label accepted by mistake (the
        batch a rollback was for) trained again at every run, and a rollback held only until
        the next new image. A revocation is a record of its own, created once (the store's
        exclusive create, as a decision's claim): ``data_processing`` leaves the image out
        from its next run, and the audit log gets an entry. The accepted record and image
        stay, so what a version trained on can still be rebuilt. The right label is sent
        again as new feedback (another label, another id) and reviewed as any.

        Raises ``ReviewError`` 422 (no reason), 404 (unknown id) or 409 (not accepted, or
        revoked already).
        """
        if not reason.strip():
            raise ReviewError(
                422,
                "a revocation needs a reason (why the label must not train), e.g. "
                '{"feedback_id": "...", "reason": "wrong label, rolled back in version 7"}',
            )
        if not FEEDBACK_ID.fullmatch(feedback_id) or not self._pending.one(feedback_id):
            raise unknown_feedback(feedback_id)
        decided = self.decided(feedback_id)
        if decided != "accepted":
            raise ReviewError(
                409,
                f"feedback {feedback_id!r} is {decided or 'pending'}: only an accepted label "
                "can be revoked (a pending one is rejected with POST /review)",
            )
        accepted = self._stored(ACCEPTED_RECORDS, feedback_id)
        revocation = {
            "feedback_id": feedback_id,
            "label": accepted.get("label"),
            "accepted_as": accepted.get("accepted_as"),
            "reviewer": reviewer,
            "reason": reason,
            "revoked_at": now().isoformat(),
        }
        if not self._create_once(REVOKED_RECORDS, feedback_id, revocation):
            held = self._stored(REVOKED_RECORDS, feedback_id)
            raise ReviewError(
                409,
                f"feedback {feedback_id!r} was already revoked by {held.get('reviewer')} at "
                f"{held.get('revoked_at')}",
            )
        audit = {
            "feedback_id": feedback_id,
            "reviewer": reviewer,
            "decided_at": revocation["revoked_at"],
            "decision": "revoke",
            "label": None,
            "reason": reason,
            "previous_state": {"status": "accepted", "label": revocation["label"]},
        }
        stands = f"The revocation of feedback {feedback_id} stands"
        self._add_to_journal(
            AUDIT_LOG, _audit_name(audit["decided_at"], feedback_id), audit, stands
        )
        return revocation

    def _decide(
        self, submitted: dict, decision: str, reviewer: str, label: str | None
    ) -> tuple[dict[str, Any], list[dict]]:
        """Write the decision ``decide`` claimed: the image and record, then the audit entry."""
        feedback_id = submitted["feedback_id"]
        accepted = decision in ("accept", "auto_accept")
        final_label = (label or submitted["label"]) if accepted else None
        name = submitted["image"].split("/", 1)[1]
        record = {
            **submitted,
            "submitted_label": submitted["label"],
            "label": final_label,
            "accepted_as": f"{final_label}/{name}" if accepted else None,
            "decision": decision,
            "reviewer": reviewer,
            "decided_at": now().isoformat(),
        }
        audit = {
            "feedback_id": feedback_id,
            "reviewer": reviewer,
            "decided_at": record["decided_at"],
            "decision": decision,
            "label": final_label,
            "previous_state": {"status": "pending", "label": submitted["label"]},
        }
        try:
            if accepted:
                (image,) = self.images([feedback_id])
                if image is None:
                    raise ReviewError(409, f"cannot accept: {missing_image(submitted)}")
                self._catalog.save(ACCEPTED_IMAGES, {record["accepted_as"]: image})
                self._catalog.save(ACCEPTED_RECORDS, {feedback_id: record})
            else:
                self._catalog.save(REJECTED_RECORDS, {feedback_id: record})
        except ReviewError:
            raise
        except Exception as error:
            raise StoreError.refused(error) from error
        (self._accepted if accepted else self._rejected).add(feedback_id, record)
        stands = f"The decision on feedback {feedback_id} ({decision}) stands"
        audit_name = _audit_name(record["decided_at"], feedback_id)
        self._add_to_journal(AUDIT_LOG, audit_name, audit, stands)
        return record, self.waiting()


def unknown_feedback(feedback_id: str) -> ReviewError:
    """404 for an id no pending record has (or that is not shaped as the service makes ids)."""
    return ReviewError(404, f"no feedback {feedback_id!r}: GET /review lists the ids")


def _read_or_none(images: ImageFolderDataset, path: str) -> bytes | None:
    try:
        return images.read(path)
    except FileNotFoundError:
        return None


def missing_image(record: dict) -> str:
    """What to do about a pending item whose image is not in the store."""
    return (
        f"the image of feedback {record['feedback_id']!r} ({record['image']}) is missing from "
        "the pending image store (deleted by hand?): restore it from a backup, or reject the item"
    )


def _decoded(
    items: list[dict], images: list[bytes | None]
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The pixels of each image read, by id, and why each that no longer decodes does not:
    one such image answered 500 to every ``GET /review`` that showed it."""
    pixels, undecodable = {}, {}
    for item, image in zip(items, images, strict=True):
        if image is None:
            continue
        try:
            pixels[item["feedback_id"]] = preprocess_image(image)
        except InvalidImageError as error:
            undecodable[item["feedback_id"]] = str(error)
    return pixels, undecodable


def undecodable_image(record: dict, why: str) -> str:
    """What to do about a pending item whose stored image no longer decodes."""
    return (
        f"the image of feedback {record['feedback_id']!r} ({record['image']}) no longer decodes "
        f"({why}): it was checked when it was sent, so it changed in the pending image store "
        "since (a hand edit, a disk error); restore it from a backup, or reject the item"
    )


def _submitted_at(record: dict) -> datetime:
    return datetime.fromisoformat(record["submitted_at"])


def _submitter_folder(submitter: str | None) -> str:
    """A submitter (a client address) as a folder name: its hash, a name any store takes."""
    return hashlib.sha256(str(submitter).encode()).hexdigest()[:16]


def _submission_name(submitter: str | None, at: datetime, feedback_id: str) -> str:
    return f"{at:%Y%m%dT%H%M}/{_submitter_folder(submitter)}/{at.timestamp():.6f}-{feedback_id}"


def _audit_name(decided_at: str, feedback_id: str) -> str:
    """``<minute>/<ISO time>-<id>``: a journal of the decisions, listed by minute."""
    at = datetime.fromisoformat(decided_at)
    return f"{at:%Y%m%dT%H%M}/{at:%Y-%m-%dT%H%M%S.%fZ}-{feedback_id}"


def _minutes(since: datetime, until: datetime) -> list[str]:
    """The journals' minute folders (``%Y%m%dT%H%M``) from ``since`` to ``until``."""
    minute, minutes = since.replace(second=0, microsecond=0), []
    while minute <= until:
        minutes.append(f"{minute:%Y%m%dT%H%M}")
        minute += timedelta(minutes=1)
    return minutes


def _id_after(name: str, separator: str) -> str:
    """The feedback id of a journal entry ``<minute>/.../<time><separator><id>``."""
    return name.rsplit("/", 1)[-1].split(separator, 1)[-1]


def _sent_at(name: str) -> datetime | None:
    """When a submission named ``<minute>/<submitter>/<unix time>-<id>`` was sent; None for a
    name edited by hand (left out: it cannot refuse a submission)."""
    try:
        return datetime.fromtimestamp(float(name.rsplit("/", 1)[-1].split("-", 1)[0]), UTC)
    except ValueError:
        return None


def count_waiting(waiting: list[dict]) -> None:
    """/metrics: how many items wait for a review, and when the oldest of ``waiting`` (oldest
    first) was sent (0 when none waits): alert ``MedicalCTFeedbackWaitsForReview``."""
    metrics.feedback_pending.set(len(waiting))
    metrics.feedback_oldest_pending.set(_submitted_at(waiting[0]).timestamp() if waiting else 0)


# ---- flags: each with a reason a person can read ----
class Submissions:
    """Every submitted record, indexed for the flags that compare: the labels each image was
    sent with, and when each submitter sent theirs (sorted).

    Kept by the queue and extended with the records read since (``add``): pending records
    are never rewritten and the worker's cache only grows. Built anew from every pending
    record ever sent, it cost each ``GET /review`` 0.33 s at 100,000 of them, in the
    worker that also answers /predict.
    """

    def __init__(self) -> None:
        self.labels_by_image: dict[str, set[str]] = defaultdict(set)
        self.times_by_submitter: dict[str | None, list[datetime]] = defaultdict(list)
        self.indexed = 0  # how many records of the worker's cache, in its order

    @classmethod
    def of(cls, pending: dict[str, dict]) -> "Submissions":
        submissions = cls()
        submissions.add(pending)
        return submissions

    def add(self, pending: dict[str, dict]) -> None:
        """Index the records of ``pending`` past the first ``indexed`` (a dict keeps the
        order its records were added in)."""
        sent_by = set()
        for record in itertools.islice(pending.values(), self.indexed, None):
            self.labels_by_image[record["sha256"]].add(record["label"])
            self.times_by_submitter[record.get("submitter")].append(_submitted_at(record))
            sent_by.add(record.get("submitter"))
        for submitter in sent_by:  # sorted but for the new tail: a merge for timsort
            self.times_by_submitter[submitter].sort()
        self.indexed = max(self.indexed, len(pending))  # a request's older copy adds nothing

    def burst_size(self, item: dict) -> int:
        """Items of the same submitter within a minute either side of ``item``."""
        at, minute = _submitted_at(item), timedelta(minutes=1)
        times = self.times_by_submitter.get(item.get("submitter"), [])
        return bisect.bisect_right(times, at + minute) - bisect.bisect_left(times, at - minute)


def flags_for(
    item: dict,
    model_view: dict,
    ood_ratio: float | None,
    submissions: Submissions,
    config: ReviewConfig,
) -> list[dict[str, str]]:
    """The flags of one pending item (see conf/base/review.yml for the thresholds).

    Args:
        item: The pending record.
        model_view: The champion's answer for the image now (label, confidence, probabilities).
        ood_ratio: The image's distance to the nearest class of the training reference, in
            the reference's 99th percentile (see ood.py; None when no reference was built).
        submissions: Every submitted record (for conflicting labels and bursts).
    """
    flags = []
    label_probability = model_view["probabilities"].get(item["label"], 0.0)
    if (
        label_probability < config.disagree_max_label_probability
        and model_view["confidence"] >= config.disagree_min_confidence
    ):
        flags.append(
            {
                "flag": "model_disagrees_confidently",
                "reason": f"the champion gives {item['label']} {label_probability:.1%} and is "
                f"{model_view['confidence']:.1%} sure it is {model_view['label']}",
            }
        )
    others = sorted(submissions.labels_by_image.get(item["sha256"], set()) - {item["label"]})
    if others:
        flags.append(
            {
                "flag": "conflicting_labels",
                "reason": f"the same image was also submitted as {', '.join(others)}",
            }
        )
    burst = submissions.burst_size(item)
    if burst > config.burst_flag_per_minute:
        flags.append(
            {
                "flag": "burst",
                "reason": f"{item.get('submitter')} sent {burst} items within a minute of this "
                f"one (more than {config.burst_flag_per_minute})",
            }
        )
    if model_view.get("out_of_distribution"):
        far = ood_ratio is not None and not ood_ratio <= config.ood_max_distance_ratio
        flags.append(
            {
                "flag": "out_of_distribution",
                "reason": f"{ood_ratio:.1f}x farther from the nearest class of the training "
                f"images than 99% of them are (the champion's features; limit "
                f"{config.ood_max_distance_ratio}x)"
                if far
                else "the image is one flat grey: nothing to classify",
            }
        )
    return flags


def retry_after_s(recent: list[datetime], limit: int) -> int | None:
    """Seconds until a submitter with ``recent`` items in the last minute is under ``limit``;
    None when they are under it now."""
    if len(recent) < limit:
        return None
    frees_at = recent[len(recent) - limit] + timedelta(minutes=1)
    return max(1, int((frees_at - now()).total_seconds()) + 1)


def agrees_confidently(item_label: str, model_view: dict, config: ReviewConfig) -> bool:
    """The auto-accept policy: the champion already says ``item_label``, confidently."""
    return (
        config.auto_accept == "agree_with_model"
        and model_view["label"] == item_label
        and model_view["confidence"] >= config.auto_accept_min_confidence
    )


class ReviewQueue:
    """What the service's review routes do: the store, the flags, the policy, the metrics."""

    def __init__(self, catalog: CatalogProtocol, config: ReviewConfig) -> None:
        self.store = ReviewStore(catalog)
        self.config = config
        metrics.start_at_zero(metrics.feedback_reviews_total, decision=DECISIONS)
        self._catalog = catalog
        self._stop = threading.Event()
        self._image_problems_logged: set[str] = set()
        self._submissions = Submissions()
        self._submissions_lock = threading.Lock()

    def watch(self) -> None:
        """Look at the stores now and every ``look_every_s`` seconds, in a daemon thread,
        listing every record store at the first look and every ``list_every_s`` seconds
        (``ReviewStore.look``: the looks between read only what the journals name).

        The pending count on /metrics (``medical_ct_feedback_pending``) and the unreadable
        records' were set only by a request: after each start they said 0 until someone sent
        feedback or opened the review, and they missed what other replicas decided. The first
        look also reads every record before the first request would (0.5 s at 10,000 items,
        locally; a GET each on S3). A store that does not answer is tried at the next look.
        """

        def look() -> None:
            listed_at = None
            while True:
                every = self.config.list_every_s
                listing = listed_at is None or time.monotonic() - listed_at >= every
                try:
                    self.store.look(listing)
                    count_waiting(self.store.waiting())
                    listed_at = time.monotonic() if listing else listed_at
                except Exception as error:  # a store down: logged, tried at the next look
                    logger.warning("The feedback stores could not be read (%r)", error)
                if self._stop.wait(self.config.look_every_s):
                    return

        threading.Thread(target=look, name="review-watcher", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def submit(
        self,
        image: bytes,
        pixels: np.ndarray,
        label: str,
        record: dict[str, Any],
        served: ServedModel,
    ) -> tuple[dict[str, Any], str]:
        """Store ``image`` as pending (or auto-accept it); return the record and its status.

        Args:
            pixels: ``image`` as the service already preprocessed it (for the policy).

        Raises:
            ReviewError: 429 when the submitter is past the burst limit (``retry_after_s``).
        """
        recent = self.store.recent_from(record["submitter"], timedelta(minutes=1))
        wait = retry_after_s(recent, self.config.burst_refuse_per_minute)
        if wait is not None:
            raise ReviewError(
                429,
                f"{len(recent)} items from {record['submitter']} in the last minute; the limit "
                f"is {self.config.burst_refuse_per_minute}: retry in {wait} s",
                retry_after_s=wait,
            )
        stored, new = self.store.submit(image, label, record)
        feedback_id = stored["feedback_id"]
        status = "pending" if new else self.store.decided(feedback_id) or "pending"
        if status == "pending" and self.config.auto_accept == "agree_with_model":
            answer = self._answers(served, {feedback_id: pixels})[feedback_id]
            with self._submissions_lock:
                self._submissions.add(self.store.pending())
                shown = self._shown(stored, answer, {}, self._submissions)
            # Only an item GET /review would show unflagged: the champion is often confidently
            # wrong far from its data, and noise it called Hand at 1.0 was accepted to train.
            if not shown["flags"] and agrees_confidently(label, shown["model"], self.config):
                try:
                    self.decide(feedback_id, "auto_accept", AUTO_REVIEWER)  # counts what waits
                    return stored, "accepted"
                except ReviewError:  # a reviewer was faster: say what they decided
                    status = self.store.decided(feedback_id) or "pending"
        count_waiting(self.store.waiting())
        return stored, status

    def decide(
        self, feedback_id: str, decision: str, reviewer: str, label: str | None = None
    ) -> dict[str, Any]:
        """The decision record (what still waits is counted on /metrics)."""
        record, waiting = self.store.decide(feedback_id, decision, reviewer, label)
        metrics.feedback_reviews_total.labels(decision=decision).inc()
        count_waiting(waiting)
        return record

    def queue(self, served: ServedModel, limit: int) -> list[dict[str, Any]]:
        """Pending items, oldest first: the champion's view now, the flags and their reasons
        (what waits as this worker knows it after a look, ``ReviewStore.look``)."""
        self.store.look()
        waiting = self.store.waiting()
        count_waiting(waiting)
        items = waiting[:limit]
        images = self.store.images([item["feedback_id"] for item in items])
        pixels, undecodable = _decoded(items, images)
        answers = self._answers(served, pixels)
        with self._submissions_lock:  # one request at a time extends the index and reads it
            self._submissions.add(self.store.pending())
            return [
                self._shown(item, answers.get(item["feedback_id"]), undecodable, self._submissions)
                for item in items
            ]

    def _answers(
        self, served: ServedModel, pixels: dict[str, np.ndarray]
    ) -> dict[str, tuple[dict | InvalidModelOutputError, float | None]]:
        """The champion's view and the out-of-distribution ratio of each image decoded, by id."""
        if not pixels:
            return {}
        answers = served.classify(np.stack(list(pixels.values())))
        ratios = (
            None if isinstance(answer, Exception) else answer["out_of_distribution_ratio"]
            for answer in answers
        )
        return dict(zip(pixels, zip(answers, ratios, strict=True), strict=True))

    def _shown(
        self,
        item: dict,
        answer: tuple[dict | InvalidModelOutputError, float | None] | None,
        undecodable: dict[str, str],
        submissions: Submissions,
    ) -> dict[str, Any]:
        if answer is not None and isinstance(answer[0], InvalidModelOutputError):
            flag = {"flag": "model_output_invalid", "reason": str(answer[0])}
            return _queue_item(item, None, None, [flag])
        if answer is None:
            why = undecodable.get(item["feedback_id"])
            flag = {
                "flag": "image_unreadable" if why else "image_missing",
                "reason": undecodable_image(item, why) if why else missing_image(item),
            }
            self._log_once(item, flag["reason"])
            return _queue_item(item, None, None, [flag])
        view, ratio = answer
        flags = flags_for(item, view, ratio, submissions, self.config)
        return _queue_item(item, view, ratio, flags)

    def _log_once(self, item: dict, reason: str) -> None:
        """Log each missing or broken image once a worker: the queue shows it on every /review."""
        if item["feedback_id"] not in self._image_problems_logged:
            self._image_problems_logged.add(item["feedback_id"])
            logger.error("GET /review: %s", reason)


def _queue_item(item: dict, view: dict | None, ratio: float | None, flags: list[dict]) -> dict:
    """One item of ``GET /review``; ``model`` is null when its image is missing."""
    model = None
    if view is not None:
        model = {
            "version": view["model_version"],
            "label": view["label"],
            "confidence": view["confidence"],
            "label_probability": view["probabilities"].get(item["label"], 0.0),
        }
    corrected = None
    if item.get("corrected_model_version"):
        corrected = {
            "model_version": item["corrected_model_version"],
            "label": item["corrected_label"],
        }
    return {
        "feedback_id": item["feedback_id"],
        "label": item["label"],
        "submitted_at": item["submitted_at"],
        "submitter": item.get("submitter"),
        "model": model,
        "corrected": corrected,
        "out_of_distribution_ratio": ratio if ratio is None or math.isfinite(ratio) else None,
        "flags": flags,
        "image_url": f"/review/image?{urlencode({'feedback_id': item['feedback_id']})}",
    }
