"""The MLflow Model Registry: model name, aliases, and what kedro-mlflow does not do for us.

kedro-mlflow logs parameters, metrics and artifacts; the registry's aliases and version tags,
and a model logged with a data-dependent signature and metadata, are done here directly.
"""

import logging
import subprocess
from dataclasses import dataclass
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from medical_ct.preprocessing import IMAGE_SIZE, PREPROCESSING_SPEC

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
    uri = f"models:/{model_name}/{version.version}"
    # Logged in MLflow's default "pt2" format (torch.export): a traced inference graph that
    # loads without unpickling code, already in eval mode (it does not support .eval()).
    model = mlflow.pytorch.load_model(uri)
    metadata = mlflow.models.get_model_info(uri).metadata or {}
    return RegisteredClassifier(
        model=model,
        version=str(version.version),
        class_names=list(metadata["class_names"]),
        tags=dict(version.tags),
    )


def log_and_register(
    model: torch.nn.Module,
    class_names: list[str],
    input_example: np.ndarray,
    tags: dict[str, str],
    model_name: str = MODEL_NAME,
) -> str:
    """Log the model to the active run and register it as a new version; return the version.

    The version carries the class names and preprocessing spec (model metadata), a tensor
    signature, a real input example and ``tags``.
    """
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 1, IMAGE_SIZE, IMAGE_SIZE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(class_names)))]),
    )
    model_info = mlflow.pytorch.log_model(
        model.cpu().eval(),
        name="model",
        signature=signature,
        input_example=input_example,
        metadata={"class_names": list(class_names), "preprocessing": PREPROCESSING_SPEC},
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "medical_ct"],
        registered_model_name=model_name,
    )
    version = str(model_info.registered_model_version)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    return version


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


def describe_version(version: str, model_name: str = MODEL_NAME) -> dict[str, Any]:
    """Aliases and tags of a registered version, for reports."""
    details = MlflowClient().get_model_version(model_name, version)
    return {"version": version, "aliases": list(details.aliases), "tags": dict(details.tags)}
