"""The champion inside a Bento: imported into BentoML's model store for ``bentoml build``.

    python -m medical_ct.serving.packaging     # then: bentoml build

A Bento serves the packaged model when the registry has no champion or cannot be reached,
and still follows the registry's champion whenever it can reach one.
"""

import logging
import shutil
import tempfile
from pathlib import Path

import bentoml
import mlflow
import mlflow.pytorch
from mlflow.tracking import MlflowClient

from medical_ct import registry
from medical_ct.serving.model_holder import ServedModel, load_served_model

logger = logging.getLogger(__name__)

BENTO_MODEL_TAG = f"{registry.MODEL_NAME}:latest"


def import_champion() -> bentoml.Model:
    """Copy the registry's champion into BentoML's model store (``$BENTOML_HOME``)."""
    served = load_served_model()
    if served is None:
        raise RuntimeError("no champion model is registered yet: train one with `make run`")
    version = MlflowClient().get_model_version(registry.MODEL_NAME, served.version)
    with tempfile.TemporaryDirectory() as download:
        local = mlflow.artifacts.download_artifacts(version.source, dst_path=download)
        with bentoml.models.create(
            registry.MODEL_NAME,
            labels={"mlflow_version": served.version},
            metadata={
                "mlflow_version": served.version,
                "class_names": served.class_names,
                # absent for versions registered before calibration
                **(
                    {"review_threshold": served.review_threshold}
                    if served.review_threshold is not None
                    else {}
                ),
                "test_metrics": served.test_metrics,
                "tags": served.classifier.tags,
            },
        ) as model:
            shutil.copytree(local, Path(model.path) / "mlflow_model")
    logger.info("Imported %s version %s as %s", registry.MODEL_NAME, served.version, model.tag)
    return model


def packaged_model() -> bentoml.models.BentoModel | None:
    """The packaged champion, declared on the service so ``bentoml build`` ships it."""
    reference = bentoml.models.BentoModel(BENTO_MODEL_TAG)
    return reference if reference.stored is not None else None


def load_packaged(stored: bentoml.Model) -> ServedModel:
    """The packaged champion, loaded from the model store without MLflow's tracking server."""
    metadata = stored.info.metadata
    classifier = registry.RegisteredClassifier(
        model=mlflow.pytorch.load_model(str(Path(stored.path) / "mlflow_model")),
        version=str(metadata["mlflow_version"]),
        class_names=list(metadata["class_names"]),
        tags=dict(metadata.get("tags", {})),
        review_threshold=metadata.get("review_threshold"),
    )
    return ServedModel(classifier=classifier, test_metrics=dict(metadata.get("test_metrics", {})))


if __name__ == "__main__":
    from medical_ct.serving.project import load_project, use_tracking_uri

    logging.basicConfig(level=logging.INFO)
    use_tracking_uri(load_project().tracking_uri)
    print(import_champion().tag)
