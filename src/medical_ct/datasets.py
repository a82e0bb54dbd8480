"""Kedro datasets of this project: image folders that may be empty, and registered models."""

from typing import Any

from kedro.io import AbstractDataset, DatasetError
from kedro_datasets.partitions import PartitionedDataset

from medical_ct import registry

_IMAGE_BYTES = {
    "type": "text.TextDataset",
    "fs_args": {"open_args_load": {"mode": "rb"}, "open_args_save": {"mode": "wb"}},
}


class ImageFolderDataset(PartitionedDataset):
    """Image files as ``{"<Class>/<file>": load function returning bytes}``, on any fsspec store.

    Unlike ``PartitionedDataset``, an empty or missing folder loads as ``{}``: a raw store
    before ingest and a feedback store nobody wrote to yet are normal states, not errors.
    Saving takes ``{"<Class>/<file>": bytes or a function returning bytes}``.
    """

    def __init__(self, *, path: str, **kwargs: Any) -> None:
        kwargs.setdefault("dataset", _IMAGE_BYTES)
        super().__init__(path=path, **kwargs)

    def load(self) -> dict[str, Any]:
        try:
            return super().load()
        except DatasetError:
            if self._list_partitions():
                raise
            return {}


class RegisteredModelDataset(AbstractDataset[None, registry.RegisteredClassifier | None]):
    """A model version of the MLflow Model Registry, by alias; ``None`` when the alias is unset.

    Read-only: versions are registered and aliases moved by the evaluation pipeline's gate.
    """

    def __init__(self, alias: str = registry.CHAMPION_ALIAS, model_name: str = registry.MODEL_NAME):
        self._alias = alias
        self._model_name = model_name

    def load(self) -> registry.RegisteredClassifier | None:
        return registry.load_alias(self._alias, self._model_name)

    def save(self, data: None) -> None:
        raise DatasetError(f"{type(self).__name__} is read-only")

    def _describe(self) -> dict[str, Any]:
        return {"model_uri": registry.model_uri(self._alias, self._model_name)}
