"""Nodes of the rebuild pipeline: a version's model input from its manifest and the stores."""

import logging
from collections.abc import Mapping
from typing import Any

from medical_ct import lifecycle
from medical_ct.datasets import StoredFile
from medical_ct.manifest import FEEDBACK, RAW, SPLITS, fingerprint, model_input_table
from medical_ct.manifest import rebuild_model_input as rebuild_from_manifest
from medical_ct.registry import MODEL_NAME, RegisteredVersion

logger = logging.getLogger(__name__)


class FingerprintMismatchError(RuntimeError):
    """The rebuilt model input is not the one the version was trained on."""


def validate_rebuild(rebuild: dict[str, Any]) -> str:
    """The version to rebuild, as a string; ``ValueError`` when ``rebuild.version`` is unusable."""
    version = rebuild.get("version")
    if (isinstance(version, int) and not isinstance(version, bool) and version > 0) or (
        isinstance(version, str) and version.isdigit() and int(version) > 0
    ):
        return str(int(version))
    raise ValueError(
        "parameters rebuild: version must be a registered version number, got "
        f'{version!r}: kedro run --pipelines rebuild --params "rebuild.version=3"'
    )


def rebuild_model_input(
    registered_versions: dict[str, RegisteredVersion],
    raw_images: Mapping[str, StoredFile],
    feedback_images: Mapping[str, StoredFile],
    rebuild: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rebuild a version's train, validation and test sets and check its dataset fingerprint.

    Every image of the version's training manifest is read from the raw or feedback store,
    decoded with the shared preprocessing and checked against its content hash, so a version
    can be reproduced, audited or retrained on exactly its data.

    Returns:
        The model input (``train``, ``validation``, ``test`` sets as ``build_model_input``
        makes them, and ``class_names``) and a report of the rebuild.

    Raises:
        ManifestImagesMissingError: Images are missing from the stores or changed: it names them.
        FingerprintMismatchError: The rebuilt input is not what the version was trained on.
    """
    version = validate_rebuild(rebuild)
    if version not in registered_versions:
        registered = ", ".join(sorted(registered_versions, key=int)) or "none"
        raise ValueError(f"version {version} of {MODEL_NAME} does not exist ({registered})")
    details = registered_versions[version]
    try:
        manifest = details.read_manifest()
    except FileNotFoundError as error:
        raise ValueError(f"version {version} cannot be rebuilt: {error}") from None
    stores = {RAW: raw_images, FEEDBACK: feedback_images}
    sets, class_names = rebuild_from_manifest(manifest, stores)
    rebuilt = fingerprint(model_input_table(sets, class_names))
    expected = details.tags.get(lifecycle.DATASET_FINGERPRINT)
    if rebuilt != expected:
        raise FingerprintMismatchError(
            f"the model input rebuilt from version {version}'s manifest has fingerprint "
            f"{rebuilt}, but the version was trained on {expected}: its manifest does not "
            "describe its training data"
        )
    logger.info(
        "Rebuilt version %s's model input (%d images), fingerprint %s matches",
        version,
        len(manifest),
        rebuilt[:12],
    )
    report = {
        "version": version,
        "dataset_fingerprint": rebuilt,
        "fingerprint_matches": True,
        "images_per_split": {split: len(sets[split]["labels"]) for split in SPLITS},
        "images_per_source": manifest["source"].value_counts().to_dict(),
    }
    return {**sets, "class_names": class_names}, report
