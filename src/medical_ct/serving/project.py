"""The Kedro project the service belongs to: its config, catalog and MLflow store.

The service reads the same configuration as ``kedro run`` (``KEDRO_ENV`` included), so the
tracking URI and the feedback store are defined once, in ``conf/``.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from kedro.config import MissingConfigException
from kedro.framework.project import settings
from kedro.framework.startup import bootstrap_project
from kedro.io import CatalogProtocol
from kedro.utils import find_kedro_project

from medical_ct.serving.review import ReviewConfig

PROJECT_DIR_VARIABLE = "MEDICAL_CT_PROJECT_DIR"


@dataclass(frozen=True)
class ServingConfig:
    """conf/<env>/serving.yml, typed."""

    model_poll_interval_s: float
    max_batch_size: int
    max_latency_ms: int
    max_upload_bytes: int
    workers: int
    prediction_log_flush_interval_s: float
    log_pixels: bool
    prediction_log_enabled: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ServingConfig":
        try:
            serving = cls(
                model_poll_interval_s=float(config["model_poll_interval_s"]),
                max_batch_size=int(config["max_batch_size"]),
                max_latency_ms=int(config["max_latency_ms"]),
                max_upload_bytes=int(config["max_upload_bytes"]),
                workers=int(config["workers"]),
                prediction_log_flush_interval_s=float(config["prediction_log"]["flush_interval_s"]),
                log_pixels=_boolean(config["prediction_log"]["log_pixels"]),
                prediction_log_enabled=_boolean(config["prediction_log"]["enabled"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"conf serving.yml is invalid ({error!r}): got {config!r}") from None
        positive = (
            serving.model_poll_interval_s,
            serving.max_batch_size,
            serving.max_latency_ms,
            serving.workers,
            serving.prediction_log_flush_interval_s,
        )
        if min(positive) <= 0:
            raise ValueError(f"conf serving.yml needs positive numbers, got {serving}")
        return serving


def _boolean(value: Any) -> bool:
    """A YAML boolean, or the text of an environment variable (true/false, 1/0, yes/no)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in {"true", "false", "1", "0", "yes", "no"}:
        raise ValueError(f"{value!r} is not a boolean: use true or false")
    return text in {"true", "1", "yes"}


@dataclass(frozen=True)
class KedroProject:
    """What the service takes from the Kedro project."""

    path: Path
    env: str | None
    serving: ServingConfig
    review: ReviewConfig
    catalog: CatalogProtocol
    tracking_uri: str
    # globals.yml's root: where every store of the catalog lives (``data``, or ``s3://...``)
    data_root: str = "data"


def project_path() -> Path:
    """``$MEDICAL_CT_PROJECT_DIR``, else the Kedro project around the working directory."""
    configured = os.environ.get(PROJECT_DIR_VARIABLE)
    if configured:
        return Path(configured).resolve()
    found = find_kedro_project(Path.cwd())
    if found is None:
        raise RuntimeError(
            f"no Kedro project at or above {Path.cwd()}: run from the project root "
            f"or set {PROJECT_DIR_VARIABLE}"
        )
    return Path(found).resolve()


def load_project(path: Path | None = None, env: str | None = None) -> KedroProject:
    """Load the project's config (environment ``env``, default ``$KEDRO_ENV``) and catalog.

    Kedro resolves relative catalog paths (``data/...``) and the default sqlite store against
    the working directory, as for ``kedro run``: call this from the project root (service.py
    moves there once, explicitly, at start). It never changes the working directory itself.
    """
    path = path or project_path()
    env = env or os.environ.get("KEDRO_ENV") or None
    bootstrap_project(path)
    config_loader = settings.CONFIG_LOADER_CLASS(
        conf_source=str(path / settings.CONF_SOURCE), env=env, **settings.CONFIG_LOADER_ARGS
    )
    try:
        credentials = config_loader["credentials"]
    except MissingConfigException:
        credentials = {}
    catalog = settings.DATA_CATALOG_CLASS.from_config(
        catalog=config_loader["catalog"], credentials=credentials
    )
    tracking_uri = config_loader["mlflow"]["server"]["mlflow_tracking_uri"]
    return KedroProject(
        path=path,
        env=env,
        serving=ServingConfig.from_config(config_loader["serving"]),
        review=ReviewConfig.from_config(config_loader["review"]),
        catalog=catalog,
        tracking_uri=tracking_uri,
        data_root=str(config_loader["globals"].get("root", "data")),
    )


# A built Bento's root holds bento.yaml beside src/, the project's files (BentoML's layout).
BENTO_MANIFEST = "bento.yaml"


def refuse_state_inside_bento(project: KedroProject) -> None:
    """Refuse to serve from a built Bento whose stores or MLflow store would live inside it.

    ``bentoml serve medical_ct:latest`` runs from ``$BENTOML_HOME/bentos/medical_ct/<v>/src``:
    found there, the project kept the prediction log, the feedback and a new empty
    ``mlflow.db`` inside the Bento store, lost with the Bento and never seen by the weekly run.
    ``MEDICAL_CT_PROJECT_DIR``, set even to the Bento's own ``src`` (a volume mounted on its
    ``data/``), says where they belong and is taken as is.

    Raises:
        RuntimeError: Naming what would be written inside the Bento and what to set.
    """
    root = project.path.resolve()
    bento = root.parent
    if os.environ.get(PROJECT_DIR_VARIABLE) or not (bento / BENTO_MANIFEST).is_file():
        return
    inside = [
        f"{what} ({where})"
        for what, where in (
            ("the stores: prediction log and feedback", _local_path(project.data_root)),
            ("the MLflow store", _local_path(project.tracking_uri)),
        )
        if where is not None and (root / where).resolve().is_relative_to(bento)
    ]
    if inside:
        raise RuntimeError(
            f"serving from the Bento at {bento} would write {' and '.join(inside)} inside the "
            "Bento store, lost with the Bento and never seen by the weekly run: set "
            f"{PROJECT_DIR_VARIABLE} to the project folder the pipelines use (or to "
            f"{project.path} if its data/ is a mounted volume), or KEDRO_ENV=s3 with "
            "MEDICAL_CT_S3_BUCKET for the stores, and MLFLOW_TRACKING_URI for the registry"
        )


def _local_path(location: str) -> Path | None:
    """The local path of a store root or tracking URI, ``None`` for a remote one."""
    if location.startswith("sqlite:///"):
        return Path(location.removeprefix("sqlite:///"))
    if location.startswith("file:"):
        return Path(location.removeprefix("file:").removeprefix("//"))
    return None if "://" in location else Path(location)


def use_tracking_uri(tracking_uri: str) -> None:
    """Point MLflow (tracking and registry) at the project's store."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri)
