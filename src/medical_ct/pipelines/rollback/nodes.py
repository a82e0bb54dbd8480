"""Nodes of the rollback pipeline: check the target version, then move ``champion`` to it."""

import getpass
import logging
from dataclasses import dataclass
from typing import Any

from medical_ct import lifecycle, registry
from medical_ct.registry import MODEL_NAME, RegisteredVersion

logger = logging.getLogger(__name__)

_EXAMPLE = 'kedro run --pipeline rollback --params "rollback.to_version=3,rollback.reason=<why>"'


class RollbackRefusedError(ValueError):
    """The rollback cannot be done as asked; the champion did not move."""


@dataclass(frozen=True)
class RollbackParams:
    """The ``rollback`` parameters, checked.

    ``to_version`` is ``None`` for "the previous champion"; ``reason`` is required, since a
    move nobody can explain later is what this history is for; ``by`` defaults to the user
    running it (``getpass.getuser()``: ``$LOGNAME``, ``$USER``, else the account's name).
    """

    to_version: str | None
    reason: str
    by: str

    @classmethod
    def from_params(cls, rollback: dict[str, Any]) -> "RollbackParams":
        to_version = rollback.get("to_version")
        if to_version is not None and not (
            (isinstance(to_version, int) and not isinstance(to_version, bool) and to_version > 0)
            or (isinstance(to_version, str) and to_version.isdigit() and int(to_version) > 0)
        ):
            raise ValueError(
                "parameters rollback: to_version must be a registered version number such as "
                f"3 (or null for the previous champion), got {to_version!r}: {_EXAMPLE}"
            )
        reason = rollback.get("reason")
        if reason is None or not str(reason).strip():
            raise ValueError(f"parameters rollback: reason is required, say why: {_EXAMPLE}")
        by = str(rollback.get("by") or getpass.getuser()).strip()
        return cls(
            to_version=None if to_version is None else str(int(to_version)),
            reason=str(reason).strip(),
            by=by,
        )


def validate_rollback(rollback: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming what is wrong with the ``rollback`` parameters."""
    RollbackParams.from_params(rollback)


def roll_back_champion(
    registered_versions: dict[str, RegisteredVersion],
    champion_version: str | None,
    rollback: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Plan the move of ``champion`` back to an earlier version, refusing unservable ones.

    The target must exist, differ from the champion, carry what the service needs to serve
    it (class names, the preprocessing spec of this code) and load as the service loads it
    (its model file can be missing while its metadata reads fine). The move tags the version rolled
    back from (when, why, by whom) and the target (the same, and the training data of the
    version rolled back from, which the next weekly run will not train on again).

    Args:
        registered_versions: Every version of the registered model.
        champion_version: The version ``champion`` points to now.
        rollback: ``to_version`` (``None``: the previous champion), ``reason``, ``by``.

    Returns:
        The move, twice: for ``champion_move`` (which applies it) and as the run's record.

    Raises:
        RollbackRefusedError: Nothing to roll back, or the target is missing or incomplete.
    """
    params = RollbackParams.from_params(rollback)
    registered = ", ".join(sorted(registered_versions, key=int)) or "none"
    if champion_version is None:
        raise RollbackRefusedError(
            f"no version of {MODEL_NAME} is champion: there is nothing to roll back"
        )
    tags_of = {version: details.tags for version, details in registered_versions.items()}
    target = params.to_version or lifecycle.previous_champion(champion_version, tags_of)
    if target is None:
        raise RollbackRefusedError(
            f"champion version {champion_version} has no previous champion on record: name "
            f"the version (registered: {registered}), e.g. {_EXAMPLE}"
        )
    if target not in registered_versions:
        raise RollbackRefusedError(
            f"version {target} of {MODEL_NAME} does not exist (registered: {registered}); "
            f"the champion stays version {champion_version}"
        )
    if target == champion_version:
        raise RollbackRefusedError(
            f"version {target} is already the champion: nothing to roll back"
        )
    missing = registered_versions[target].missing_serving_metadata()
    if missing:
        raise RollbackRefusedError(
            f"version {target} lacks what the service needs to serve it: {'; '.join(missing)}. "
            f"The champion stays version {champion_version}; roll back to another version "
            f"(registered: {registered})"
        )
    unloadable = _load_problem(target, tags_of[target])
    if unloadable:
        raise RollbackRefusedError(
            f"version {target}'s model cannot be loaded ({unloadable}): the service and the "
            "next weekly run would fail to load it too. The champion stays version "
            f"{champion_version}; roll back to another version with rollback.to_version "
            f"(registered: {registered}), e.g. {_EXAMPLE}"
        )
    _warn_without_manifest(registered_versions[target])
    if lifecycle.ROLLED_BACK_AT in tags_of[target]:
        logger.warning("Version %s was rolled back from before; restoring it as asked", target)
    move = lifecycle.champion_move(
        "rollback", champion_version, target, params.reason, params.by, version_tags={}
    )
    from_tags, to_tags = lifecycle.rollback_tags(
        champion_version,
        tags_of[champion_version],
        tags_of[target],
        params.reason,
        params.by,
        move["at"],
    )
    move["version_tags"] = {champion_version: from_tags, target: to_tags}
    logger.info(
        "Rolling back %s@champion from version %s to %s: %s",
        MODEL_NAME,
        champion_version,
        target,
        params.reason,
    )
    return move, move


def _load_problem(version: str, tags: dict[str, str]) -> str | None:
    """Why ``version`` cannot be loaded as the service loads the champion; ``None`` if it can.

    Any error counts: whatever stops this load would stop every service worker's.
    """
    try:
        registry.load_version(version, tags)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def _warn_without_manifest(target: RegisteredVersion) -> None:
    """Warn when the target's run holds no training manifest: it can still be served, but
    what it was trained on cannot be listed again."""
    try:
        target.read_manifest()
    except FileNotFoundError as error:
        logger.warning(
            "Version %s has no training manifest, rolling back to it anyway: `kedro run "
            "--pipeline rebuild` cannot rebuild its data, and the next weekly run cannot count "
            "new images against it (min_new_images does not apply: any other data trains). %s",
            target.version,
            error,
        )
