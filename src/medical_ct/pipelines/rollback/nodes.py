"""Nodes of the rollback pipeline: check the target version, then move ``champion`` to it."""

import getpass
import logging
from dataclasses import dataclass
from typing import Any

from medical_ct import lifecycle, registry
from medical_ct.checks import GateFailure, gate_failures, validate_gate
from medical_ct.registry import MODEL_NAME, RegisteredVersion

logger = logging.getLogger(__name__)

_EXAMPLE = 'kedro run --pipelines rollback --params "rollback.to_version=3,rollback.reason=<why>"'


class RollbackRefusedError(ValueError):
    """The rollback cannot be done as asked; the champion did not move."""


@dataclass(frozen=True)
class RollbackParams:
    """The ``rollback`` parameters, checked.

    ``to_version`` is ``None`` for "the previous champion"; ``reason`` is required, since a
    move nobody can explain later is what this history is for; ``by`` defaults to the user
    running it (``getpass.getuser()``: ``$LOGNAME``, ``$USER``, else the account's name);
    ``force`` rolls back to a version whose recorded test figures fail the champion gate.
    """

    to_version: str | None
    reason: str
    by: str
    force: bool = False

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
        force = rollback.get("force", False)
        if not isinstance(force, bool):
            raise ValueError(
                f"parameters rollback: force must be true or false, got {force!r}: {_EXAMPLE}"
            )
        return cls(
            to_version=None if to_version is None else str(int(to_version)),
            reason=str(reason).strip(),
            by=by,
            force=force,
        )


def validate_rollback(rollback: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming what is wrong with the ``rollback`` parameters."""
    RollbackParams.from_params(rollback)


def roll_back_champion(
    registered_versions: dict[str, RegisteredVersion],
    champion_version: str | None,
    rollback: dict[str, Any],
    champion_gate: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Plan the move of ``champion`` back to an earlier version, refusing unservable ones.

    The target must exist, differ from the champion, carry what the service needs to serve
    it (class names, the preprocessing spec of this code) and load as the service loads it
    (its model file can be missing while its metadata reads fine). A target whose recorded
    test figures (accuracy, each class's recall, ECE) fail today's gate (a version the gate
    refused, named by a typo), or that records no test accuracy (a registration killed before
    its tags), is refused unless ``rollback.force``. The move tags the version rolled back
    from (when, why, by whom) and the target (the same, and the training data of the version
    rolled back from, which the next weekly run will not train on again).

    Args:
        registered_versions: Every version of the registered model.
        champion_version: The version ``champion`` points to now.
        rollback: ``to_version`` (``None``: the previous champion), ``reason``, ``by``,
            ``force``.
        champion_gate: The gate's parameters: the limits a target's recorded figures must meet.

    Returns:
        The move, twice: for ``champion_move`` (which applies it) and as the run's record.

    Raises:
        RollbackRefusedError: Nothing to roll back, or the target is missing, incomplete or
            fails the gate.
    """
    params = RollbackParams.from_params(rollback)
    registered = ", ".join(sorted(registered_versions, key=int)) or "none"
    if champion_version is None:
        raise RollbackRefusedError(
            f"no version of {MODEL_NAME} is champion: there is nothing to roll back"
        )
    tags_of = {version: details.tags for version, details in registered_versions.items()}
    if params.to_version is None:
        _refuse_a_rerun(champion_version, tags_of[champion_version], params)
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
    _check_gate(target, registered_versions[target], champion_gate, params.force, champion_version)
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


def _refuse_a_rerun(champion: str, tags: dict[str, str], params: RollbackParams) -> None:
    """Refuse a rollback without a target that already landed: the champion became champion
    by a rollback with this reason, by this person.

    A rollback killed after moving the alias (no ``rollback.json``, its MLflow run left
    running) looks failed, and running the same command again, the natural reaction, rolled
    back once more, from the version just restored to the one before it. No time window: a
    second rollback for the same reason by the same person names its target.
    """
    same = (
        tags.get(lifecycle.ROLLED_BACK_TO_REASON) == params.reason
        and tags.get(lifecycle.ROLLED_BACK_TO_BY) == params.by
    )
    if same:
        raise RollbackRefusedError(
            f"version {champion} is champion already by this rollback: rolled back to from "
            f"version {tags.get(lifecycle.ROLLED_BACK_TO_FROM)} at "
            f"{tags.get(lifecycle.ROLLED_BACK_TO_AT)} by {params.by} ({params.reason!r}); "
            "nothing moved. To roll back further, name the version: rollback.to_version=N"
        )


def _check_gate(
    target: str,
    details: RegisteredVersion,
    champion_gate: dict[str, Any],
    force: bool,
    champion: str,
) -> None:
    """Refuse a target whose recorded test figures fail today's champion gate, unless ``force``.

    Nothing else stopped a typo (``to_version=2`` for 1) from serving a version the gate
    refused: at an accuracy far below what any promotion needs, or with one class's recall
    of 0.4 under a fine accuracy, or confidences off by 0.3. The comparison is the promotion
    gate's (``checks.gate_failures``). A version is checked on what its tags record: one
    registered before ECE and recalls were on its accuracy alone, with a warning naming what
    was not checked. One without ``test_accuracy`` is refused unless ``force``: registration
    tags it, so a version without it is most likely one whose registration was killed before
    its tags were written (served at 0.28 while its retry, the same model, was refused), or
    one registered by hand, which nobody checked either.
    """
    figures = lifecycle.gate_figures(details.tags)
    unchecked = _unchecked(target, figures)
    if figures.accuracy is None:
        untested = (
            f"version {target} records no test accuracy (tag {lifecycle.TEST_ACCURACY} missing "
            "or not a number): it may be a version whose registration was interrupted "
            "(registered, then killed before its tags were written: no recorded figures), "
            "which nobody checked against the gate. See what it is in the MLflow UI: version "
            f"{target} of {MODEL_NAME} (its tags) and "
            + (f"its run {details.run_id} (what it logged)" if details.run_id else "its source")
            + "; a retried registration of the same model is a later version that records "
            "its figures"
        )
        if not force:
            raise RollbackRefusedError(
                f"{untested}. The champion stays version {champion}; check "
                "rollback.to_version, or set rollback.force=true to roll back to it anyway"
            )
        logger.warning("%s; rolling back to it as rollback.force=true asks", untested)
    gate = validate_gate(champion_gate)
    failures = gate_failures(gate, figures.accuracy, figures.recalls, figures.ece)
    problem = f"version {target}'s " + "; its ".join(
        f"recorded {failure.figure} {failure.value:.4f} (tag {_tag_of(failure)}) is "
        f"{failure.side} champion_gate.{failure.limit} {failure.bound:.4f}"
        for failure in failures
    )
    if not failures or force:
        if unchecked:
            logger.warning("%s", unchecked)
        if failures:
            logger.warning("%s; rolling back to it as rollback.force=true asks", problem)
        return
    raise RollbackRefusedError(
        f"{problem}: the gate would refuse it today. "
        + (f"{unchecked}. " if unchecked else "")
        + f"The champion stays version {champion}; check rollback.to_version, or set "
        "rollback.force=true to roll back to it anyway"
    )


def _unchecked(target: str, figures: lifecycle.GateFigures) -> str | None:
    """What of the gate a target cannot be checked on, in words; ``None`` when nothing."""
    if not figures.not_recorded:
        return None
    recorded = [
        name
        for name, figure in (
            (lifecycle.TEST_ACCURACY, figures.accuracy),
            (lifecycle.TEST_ECE, figures.ece),
            (f"{lifecycle.TEST_RECALL}<class>", figures.recalls or None),
        )
        if figure is not None
    ]
    return (
        f"Version {target} does not record {', '.join(figures.not_recorded)} (missing or not "
        "a number: registered before the gate's figures were all recorded, or by hand): "
        "checked against the "
        + (f"champion gate on {', '.join(recorded)} only" if recorded else "gate on nothing")
    )


def _tag_of(failure: GateFailure) -> str:
    """The version tag that recorded the failing figure."""
    if failure.class_name is not None:
        return f"{lifecycle.TEST_RECALL}{failure.class_name}"
    return lifecycle.TEST_ECE if failure.limit == "max_ece" else lifecycle.TEST_ACCURACY


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
            "--pipelines rebuild` cannot rebuild its data, and the next weekly run cannot count "
            "new images against it (min_new_images does not apply: any other data trains). %s",
            target.version,
            error,
        )
