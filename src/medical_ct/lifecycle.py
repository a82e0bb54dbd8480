"""The champion's lifecycle in version tags: promotions, rollbacks, and what a version was.

Every move of the ``champion`` alias is written as tags of the versions it involves, so that
anyone who can read the registry (a service worker, the next weekly run, the MLflow UI)
knows when and why a version became champion or was rolled back, without another store.
These are pure functions from and to tags; ``registry.apply_champion_move`` writes them.
A version also carries the test figures the champion gate judged it on, which a rollback to
it checks against the gate of its day.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# On a version that became champion through the gate.
PROMOTED_AT = "champion.promoted_at"
PROMOTED_REASON = "champion.promoted_reason"
# The champion it replaced: a rollback without a target goes back along this chain.
PREVIOUS_CHAMPION = "champion.previous"
# On the version a rollback made champion again.
ROLLED_BACK_TO_AT = "champion.rolled_back_to_at"
ROLLED_BACK_TO_REASON = "champion.rolled_back_to_reason"
ROLLED_BACK_TO_BY = "champion.rolled_back_to_by"
ROLLED_BACK_TO_FROM = "champion.rolled_back_to_from"
# On the version a rollback took the alias away from.
ROLLED_BACK_AT = "champion.rolled_back_at"
ROLLED_BACK_REASON = "champion.rolled_back_reason"
ROLLED_BACK_BY = "champion.rolled_back_by"
# On the champion: "<version>:<fingerprint>,..." of the versions rolled back away from, whose
# training data the next run must not train on again unless told to (decide_training).
ROLLED_BACK_DATA = "champion.rolled_back_data"
_ROLLED_BACK_DATA_KEPT = 20  # a tag value holds at most 5,000 characters

# Set at registration: what the version was trained on (see medical_ct.manifest).
DATASET_FINGERPRINT = "dataset_fingerprint"
MODEL_DIGEST = "model_digest"  # medical_ct.model.model_digest: a retried task finds its version
TRAIN_IMAGES_RAW = "lineage.train_images.raw"
TRAIN_IMAGES_FEEDBACK = "lineage.train_images.feedback"
MODEL_INPUT_IMAGES = "lineage.model_input_images"
# Set at registration too: the figures the champion gate judged the version on (its test
# split), so that a rollback can check them against the gate of its day (gate_figures).
TEST_ACCURACY = "test_accuracy"
TEST_ECE = "test_ece"  # after calibration, as the gate's max_ece judges it
# + the class name (test_recall.Hand); none for a class with no test image, which has no recall
TEST_RECALL = "test_recall."

# Tags of the MLflow run that moved the alias: the alias history is the runs that have them.
MOVE_KIND = "champion_move"  # "promotion" or "rollback"
MOVE_FROM = "champion_move.from"
MOVE_TO = "champion_move.to"
# Who: the run's parameter rollback.by says None when it defaulted to the user running it.
MOVE_BY = "champion_move.by"


def champion_move(
    kind: str,
    from_version: str | None,
    to_version: str,
    reason: str,
    by: str,
    version_tags: dict[str, dict[str, str]],
) -> dict[str, Any]:
    """A move of the ``champion`` alias as ``registry.apply_champion_move`` applies it, and as
    its record (``promotion.json``, ``rollback.json``) says it."""
    return {
        "kind": kind,
        "alias": "champion",
        "from_version": from_version,
        "to_version": to_version,
        "reason": reason,
        "by": by,
        "at": now(),
        "version_tags": version_tags,
    }


def now() -> str:
    """The time of a move, as its tags and records write it (UTC, ISO 8601)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def promotion_move(version: str, previous_version: str | None, reason: str) -> dict[str, Any]:
    """The gate's promotion of ``version``: tagged with when, why and the champion it replaces."""
    move = champion_move("promotion", previous_version, version, reason, "champion_gate", {})
    tags = {PROMOTED_AT: move["at"], PROMOTED_REASON: reason}
    if previous_version is not None:
        tags[PREVIOUS_CHAMPION] = previous_version
    move["version_tags"] = {version: tags}
    return move


def rollback_tags(
    current: str,
    current_tags: Mapping[str, str],
    target_tags: Mapping[str, str],
    reason: str,
    by: str,
    at: str,
) -> tuple[dict[str, str], dict[str, str]]:
    """Tags of a rollback from version ``current``: for ``current``, and for the target.

    The target keeps its own promotion history; it learns which version it replaced (when it
    never was champion, that one becomes its previous champion, so that a second rollback
    without a target skips it) and whose training data was rolled away from (added to what
    it knew, less its own training data).
    """
    inherited = [
        *target_tags.get(ROLLED_BACK_DATA, "").split(","),
        *current_tags.get(ROLLED_BACK_DATA, "").split(","),
        f"{current}:{current_tags.get(DATASET_FINGERPRINT, '')}",
    ]
    rolled_back_data = [entry for entry in inherited if entry and not entry.endswith(":")]
    own = target_tags.get(DATASET_FINGERPRINT)
    kept = [entry for entry in dict.fromkeys(rolled_back_data) if entry.split(":")[1] != own]
    target = {
        ROLLED_BACK_TO_AT: at,
        ROLLED_BACK_TO_REASON: reason,
        ROLLED_BACK_TO_BY: by,
        ROLLED_BACK_TO_FROM: current,
        ROLLED_BACK_DATA: ",".join(kept[-_ROLLED_BACK_DATA_KEPT:]),
    }
    if PREVIOUS_CHAMPION not in target_tags:
        target[PREVIOUS_CHAMPION] = current
    return {ROLLED_BACK_AT: at, ROLLED_BACK_REASON: reason, ROLLED_BACK_BY: by}, target


def previous_champion(champion: str, tags_of: Mapping[str, Mapping[str, str]]) -> str | None:
    """The version a rollback without a target goes back to, ``None`` when none is known.

    Follows the ``champion.previous`` chain from ``champion``, skipping versions that were
    rolled back away from (they were bad once) and versions no longer registered.
    """
    seen = {champion}
    version = tags_of.get(champion, {}).get(PREVIOUS_CHAMPION)
    while version is not None and version not in seen:
        seen.add(version)
        tags = tags_of.get(version)
        if tags is not None and ROLLED_BACK_AT not in tags:
            return version
        version = (tags or {}).get(PREVIOUS_CHAMPION)
    return None


def rolled_back_data(tags: Mapping[str, str]) -> dict[str, str]:
    """Dataset fingerprint -> version, of the versions rolled back away from to reach ``tags``."""
    pairs = (entry.split(":", 1) for entry in tags.get(ROLLED_BACK_DATA, "").split(",") if entry)
    return {fingerprint: version for version, fingerprint in pairs}


def gate_figure_tags(
    accuracy: float, ece: float | None, recalls: Mapping[str, float]
) -> dict[str, str]:
    """Tags of the figures the gate checks, as registration sets them.

    ``recalls`` holds the classes the test split has images of: a class without has no
    recall, and a tag of 0 would make a rollback refuse the version for it.
    """
    tags = {TEST_ACCURACY: f"{accuracy:.6f}"}
    if ece is not None:
        tags[TEST_ECE] = f"{ece:.6f}"
    tags |= {f"{TEST_RECALL}{name}": f"{recall:.6f}" for name, recall in recalls.items()}
    return tags


@dataclass(frozen=True)
class GateFigures:
    """The figures the gate checks, as a version's tags record them (``None``: not recorded)."""

    accuracy: float | None
    recalls: dict[str, float]
    ece: float | None
    # The tags missing, or not a number: versions registered before ECE and recalls were
    # recorded have test_accuracy alone, versions registered by hand none of them.
    not_recorded: list[str]


def gate_figures(tags: Mapping[str, str]) -> GateFigures:
    """What ``tags`` record of the figures the champion gate checks."""

    def number(key: str) -> float | None:
        try:
            value = float(tags[key])
        except (KeyError, ValueError):
            return None
        return value if math.isfinite(value) else None

    recall_tags = [key for key in tags if key.startswith(TEST_RECALL)]
    recalls = {key: number(key) for key in recall_tags}
    not_recorded = [key for key in (TEST_ACCURACY, TEST_ECE) if number(key) is None]
    not_recorded += [key for key, recall in recalls.items() if recall is None]
    if not recall_tags:
        not_recorded.append(f"{TEST_RECALL}<class>")
    return GateFigures(
        accuracy=number(TEST_ACCURACY),
        recalls={
            key.removeprefix(TEST_RECALL): recall
            for key, recall in recalls.items()
            if recall is not None
        },
        ece=number(TEST_ECE),
        not_recorded=not_recorded,
    )


def lineage(tags: Mapping[str, str]) -> dict[str, Any]:
    """What ``GET /model`` says about a version's history, from its tags alone.

    Fields are ``None`` for what the tags do not say (versions registered before lineage was
    recorded, or never promoted or rolled back to).
    """

    def count(key: str) -> int | None:
        value = tags.get(key)
        return int(value) if value is not None and value.isdigit() else None

    promoted = rolled_back_to = None
    if PROMOTED_AT in tags:
        promoted = {
            "at": tags[PROMOTED_AT],
            "reason": tags.get(PROMOTED_REASON),
            "previous_champion": tags.get(PREVIOUS_CHAMPION),
        }
    if ROLLED_BACK_TO_AT in tags:
        rolled_back_to = {
            "at": tags[ROLLED_BACK_TO_AT],
            "reason": tags.get(ROLLED_BACK_TO_REASON),
            "by": tags.get(ROLLED_BACK_TO_BY),
            "from_version": tags.get(ROLLED_BACK_TO_FROM),
        }
    return {
        "trained_on": {
            "raw": count(TRAIN_IMAGES_RAW),
            "feedback": count(TRAIN_IMAGES_FEEDBACK),
            "model_input_images": count(MODEL_INPUT_IMAGES),
        },
        "dataset_fingerprint": tags.get(DATASET_FINGERPRINT),
        "promoted": promoted,
        "rolled_back_to": rolled_back_to,
    }


def last_move(tags: Mapping[str, str]) -> str:
    """How a version last became champion, from its tags: who, when and why, in words.

    The later of its promotion and its last rollback to it; a version with neither was given
    the alias by hand (the MLflow UI or API).
    """
    promoted, rolled_back_to = tags.get(PROMOTED_AT), tags.get(ROLLED_BACK_TO_AT)
    if rolled_back_to and (not promoted or rolled_back_to >= promoted):
        return (
            f"rolled back to by {tags.get(ROLLED_BACK_TO_BY)} at {rolled_back_to}: "
            f"{tags.get(ROLLED_BACK_TO_REASON)}"
        )
    if promoted:
        return f"promoted by the champion gate at {promoted}: {tags.get(PROMOTED_REASON)}"
    return "given the alias by hand (no promotion or rollback tags)"
