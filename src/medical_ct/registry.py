"""The MLflow Model Registry: model name, aliases, and what kedro-mlflow does not do for us.

kedro-mlflow logs parameters, metrics and artifacts; the registry's aliases and version tags,
and a model logged with a data-dependent signature and metadata, are done here directly.
"""

from __future__ import annotations

import logging
import posixpath
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from medical_ct import lifecycle
from medical_ct.preprocessing import IMAGE_SIZE, PREPROCESSING_SPEC

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MODEL_NAME = "medical_ct_classifier"
CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"


@dataclass(frozen=True)
class RegisteredClassifier:
    """A registered model version, loaded, with what a consumer needs to use it."""

    model: torch.nn.Module
    version: str
    class_names: list[str]
    tags: dict[str, str]
    # Answers less confident than this need a human review; None for versions registered
    # before calibration (their answers are never marked for review).
    review_threshold: float | None = None


def model_uri(alias: str = CHAMPION_ALIAS, model_name: str = MODEL_NAME) -> str:
    """The ``models:/`` URI of a registered model alias."""
    return f"models:/{model_name}@{alias}"


def load_alias(
    alias: str = CHAMPION_ALIAS, model_name: str = MODEL_NAME
) -> RegisteredClassifier | None:
    """Load the version an alias points to, or ``None`` when the alias is not set yet."""
    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException as error:
        if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise
    return load_version(str(version.version), dict(version.tags), model_name)


def load_version(
    version: str, tags: dict[str, str], model_name: str = MODEL_NAME
) -> RegisteredClassifier:
    """Load a version as the service and the weekly run load the champion (``load_alias``).

    A rollback loads its target this way before moving the alias: a version whose metadata
    reads fine can still lack its model file, and the alias would then point at a model
    nothing can load.
    """
    uri = f"models:/{model_name}/{version}"
    # Logged in MLflow's default "pt2" format (torch.export): a traced inference graph that
    # loads without unpickling code, already in eval mode (it does not support .eval()).
    model = _pytorch_flavour().load_model(uri)
    metadata = mlflow.models.get_model_info(uri).metadata or {}
    return RegisteredClassifier(
        model=model,
        version=version,
        class_names=list(metadata["class_names"]),
        tags=tags,
        review_threshold=review_threshold(metadata),
    )


def _pytorch_flavour() -> Any:
    """``mlflow.pytorch``, imported on first use: it imports torch (about 3 s), and this module
    is imported by every pipeline through the catalog's datasets, data_processing included,
    which never loads or logs a model."""
    import mlflow.pytorch

    return mlflow.pytorch


def review_threshold(metadata: dict[str, Any]) -> float | None:
    """The review threshold in a model's metadata; ``None`` for versions registered before it."""
    value = (metadata.get("calibration") or {}).get("review_threshold")
    return None if value is None else float(value)


def log_and_register(
    model: torch.nn.Module,
    class_names: list[str],
    input_example: np.ndarray,
    tags: dict[str, str],
    calibration: dict[str, float] | None = None,
    model_name: str = MODEL_NAME,
) -> str:
    """Log the model to the active run and register it as a new version; return the version.

    The version carries the class names, preprocessing spec and ``calibration`` (temperature,
    review threshold: model metadata), a tensor signature, a real input example and ``tags``.
    An example of one image is sent twice: the export (torch.export) takes a batch of 1 for a
    fixed size, and the registered model would then refuse every batch of more images. The
    tags are written with the version, in one request: tagged one by one afterwards, a task
    killed in between left a version without its figures, which a rollback then served
    without checking them.
    """
    if len(input_example) == 1:
        input_example = np.repeat(input_example, 2, axis=0)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 1, IMAGE_SIZE, IMAGE_SIZE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(class_names)))]),
    )
    import torch  # loaded with the flavour below; imported here for its version

    model_info = _pytorch_flavour().log_model(
        model.cpu().eval(),
        name="model",
        signature=signature,
        input_example=input_example,
        metadata={
            "class_names": list(class_names),
            "preprocessing": PREPROCESSING_SPEC,
            **({"calibration": dict(calibration)} if calibration else {}),
        },
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "medical_ct"],
    )
    return str(mlflow.register_model(model_info.model_uri, model_name, tags=tags).version)


def registered_in_run(run_id: str, digest: str, model_name: str = MODEL_NAME) -> str | None:
    """The version this run already registered from the model of ``digest`` (tag
    ``model_digest``), if any: an Airflow task cleared or retried after it registered."""
    found = MlflowClient().search_model_versions(
        f"name='{model_name}' and run_id='{run_id}' and tags.model_digest='{digest}'"
    )
    return str(min(int(version.version) for version in found)) if found else None


def set_alias(version: str, alias: str, model_name: str = MODEL_NAME) -> None:
    """Point ``alias`` at ``version`` of the registered model."""
    MlflowClient().set_registered_model_alias(model_name, alias, version)


def git_commit() -> str:
    """The commit the code was run from, ``unknown`` outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


@dataclass(frozen=True)
class RegisteredVersion:
    """A registered version as the registry lists it; its model metadata is read on demand.

    Listing every version is one query; reading a version's metadata downloads its
    ``MLmodel`` file, so only the versions a node looks at pay for it.
    """

    version: str
    run_id: str | None
    tags: dict[str, str]
    read_metadata: Callable[[], dict[str, Any]] = field(repr=False, compare=False)
    # The training manifest logged in the version's run (medical_ct.manifest); raises
    # FileNotFoundError when the run has none (versions registered before manifests).
    read_manifest: Callable[[], pd.DataFrame] = field(repr=False, compare=False)

    def missing_serving_metadata(self) -> list[str]:
        """What the service would lack to serve this version: empty when it can serve it."""
        try:
            metadata = self.read_metadata()
        except (MlflowException, OSError) as error:
            return [f"its model cannot be read ({error})"]
        missing = []
        class_names = metadata.get("class_names")
        if not class_names or not all(isinstance(name, str) for name in class_names):
            missing.append("class_names")
        if metadata.get("preprocessing") != PREPROCESSING_SPEC:
            missing.append(f"preprocessing (expected {PREPROCESSING_SPEC})")
        return missing


def registered_versions(
    manifest_artifact: str, model_name: str = MODEL_NAME
) -> dict[str, RegisteredVersion]:
    """Every version of the registered model, by version number (as a string).

    Args:
        manifest_artifact: Where the training manifest lies in a version's run, e.g.
            ``model_input/training_manifest.parquet``; versions whose run has none there are
            read from ``LEGACY_MANIFEST`` beside it.
        model_name: The registered model.
    """
    client = MlflowClient()
    found = {}
    page_token = None
    while True:
        page = client.search_model_versions(f"name='{model_name}'", page_token=page_token)
        for details in page:
            version = str(details.version)
            found[version] = RegisteredVersion(
                version=version,
                run_id=details.run_id,
                tags=dict(details.tags),
                read_metadata=_metadata_reader(f"models:/{model_name}/{version}"),
                read_manifest=_manifest_reader(details.run_id, manifest_artifact),
            )
        page_token = page.token
        if not page_token:
            return found


def _metadata_reader(uri: str) -> Callable[[], dict[str, Any]]:
    return lambda: mlflow.models.get_model_info(uri).metadata or {}


# Where versions registered before the Parquet manifest (December 2026) logged it: a gzip CSV,
# slower to write and read at 500k rows. Read when a run has no manifest where the catalog says.
LEGACY_MANIFEST = "training_manifest.csv.gz"


def _manifest_reader(run_id: str | None, artifact: str) -> Callable[[], pd.DataFrame]:
    legacy = posixpath.join(posixpath.dirname(artifact), LEGACY_MANIFEST)

    def read() -> pd.DataFrame:
        if not run_id:
            raise FileNotFoundError("the version has no MLflow run, so no training manifest")
        errors = []
        for path in dict.fromkeys([artifact, legacy]):
            try:
                with tempfile.TemporaryDirectory() as folder:
                    local = mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path=path, dst_path=folder
                    )
                    if path.endswith(".parquet"):
                        return pd.read_parquet(local)
                    return pd.read_csv(local, dtype=str, keep_default_na=False)
            except (MlflowException, OSError) as error:
                errors.append(f"{path}: {error}")
        raise FileNotFoundError(
            f"run {run_id} has no training manifest ({'; '.join(errors)}): the version was "
            "registered before training manifests were logged, or by a `kedro run --pipelines "
            "evaluation` of its own before registration logged the manifest too (the "
            "data_processing run that logged it, an input dataset medical_ct_model_input whose "
            "digest starts the version's dataset_fingerprint, may still hold it), or the "
            "artifact was deleted; a version trained and registered now has one"
        )

    return read


def alias_version(alias: str = CHAMPION_ALIAS, model_name: str = MODEL_NAME) -> str | None:
    """The version an alias points to now, ``None`` when it is not set."""
    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException as error:
        if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


class ChampionMoveError(RuntimeError):
    """A move of ``champion`` failed; the alias and the versions' tags are as they were."""


class ChampionMovedError(ChampionMoveError):
    """``champion`` no longer points where the move was planned from: someone moved it since."""

    def __init__(self, message: str, current: str | None, moved_by: str) -> None:
        super().__init__(message)
        self.current = current
        self.moved_by = moved_by


def apply_champion_move(move: dict[str, Any], model_name: str = MODEL_NAME) -> None:
    """Tag the versions a move of ``champion`` involves, then move the alias.

    Tags come first: a service that sees the alias move loads the version with its new tags
    (its lineage). The alias is read again first and must still point where the move was
    planned from: a promotion landing during a rollback (or a rollback during a weekly run)
    would otherwise be replaced silently. When tagging or the alias move fails, the tags
    written are put back as they were, so no version tells of a move that never happened
    (a later rollback without a target would skip a version wrongly tagged rolled back from).
    The active MLflow run, if any, is tagged as the move's record (kind, from, to and who, as
    resolved: a rollback's parameters say ``None`` for the defaults), so the alias history is
    the experiment's runs with tag ``champion_move``.

    Raises:
        ChampionMovedError: The champion is not ``move["from_version"]``; nothing was written.
        ChampionMoveError: Tagging or moving failed; the tags were put back, nothing moved.
    """
    client = MlflowClient()
    _check_still_champion(client, move, model_name)
    before = {
        version: dict(client.get_model_version(model_name, version).tags)
        for version in move["version_tags"]
    }
    try:
        for version, tags in move["version_tags"].items():
            for key, value in tags.items():
                client.set_model_version_tag(model_name, version, key, value)
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, move["to_version"])
    except Exception as error:
        left = _restore_tags(client, model_name, move["version_tags"], before)
        raise ChampionMoveError(
            f"the {move['kind']} of {model_name}@champion from version {move['from_version']} "
            f"to {move['to_version']} failed ({error}): nothing moved, champion stays version "
            f"{move['from_version']}; "
            + (
                f"these tags could not be put back, set or delete them by hand: {left}; "
                if left
                else "the versions' tags are as they were; "
            )
            + f"run the {move['kind']} again once the registry answers"
        ) from error
    # before any record is saved: a run killed from here on says in its log what it did
    logger.info(
        "%s@champion moved from version %s to %s (%s by %s)",
        model_name,
        move["from_version"],
        move["to_version"],
        move["kind"],
        move["by"],
    )
    if mlflow.active_run() is not None:
        mlflow.set_tags(
            {
                lifecycle.MOVE_KIND: move["kind"],
                lifecycle.MOVE_FROM: move["from_version"] or "",
                lifecycle.MOVE_TO: move["to_version"],
                lifecycle.MOVE_BY: move["by"],
            }
        )


def _check_still_champion(client: MlflowClient, move: dict[str, Any], model_name: str) -> None:
    """Raise ``ChampionMovedError`` unless ``champion`` is still the move's ``from_version``.

    MLflow has no compare-and-set of an alias: this leaves a window of one request between
    the check and the move, where the whole run (a weekly training: hours) was one before.
    """
    current = alias_version(CHAMPION_ALIAS, model_name)
    if current == move["from_version"]:
        return
    moved_by = (
        lifecycle.last_move(client.get_model_version(model_name, current).tags)
        if current is not None
        else "the alias was deleted"
    )
    again = (
        "run the rollback again to roll back from the version now champion"
        if move["kind"] == "rollback"
        else "evaluate again against the version now champion"
    )
    raise ChampionMovedError(
        f"{model_name}@champion is version {current}, not version {move['from_version']} this "
        f"{move['kind']} to version {move['to_version']} was planned from ({moved_by}): "
        f"nothing moved or tagged; {again}",
        current,
        moved_by,
    )


def _restore_tags(
    client: MlflowClient,
    model_name: str,
    written: dict[str, dict[str, str]],
    before: dict[str, dict[str, str]],
) -> list[str]:
    """Put back the tags a failed move may have written; ``version:key`` of those it could not."""
    left = []
    for version, tags in written.items():
        for key in tags:
            try:
                if key in before[version]:
                    client.set_model_version_tag(model_name, version, key, before[version][key])
                else:
                    client.delete_model_version_tag(model_name, version, key)
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":  # a deleted version: no tags
                    left.append(f"{version}:{key}")
            except Exception:  # the registry unreachable: say what is left, raise the cause
                left.append(f"{version}:{key}")
    return left
