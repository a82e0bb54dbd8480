"""The feedback store: corrected labels written where data_processing reads them."""

import hashlib
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kedro.io import CatalogProtocol
from PIL import Image

FEEDBACK_IMAGES = "feedback_images"
FEEDBACK_METADATA = "feedback_metadata"


class FeedbackStoreError(RuntimeError):
    """The feedback could not be stored; nothing was acknowledged."""


@dataclass(frozen=True)
class FeedbackReceipt:
    feedback_id: str
    stored_as: str


def image_extension(image: bytes) -> str:
    """The file extension of the image's format (``jpeg``, ``png``...), ``img`` if unknown."""
    with Image.open(io.BytesIO(image)) as opened:
        return (opened.format or "img").lower()


class FeedbackStore:
    """Writes ``<label>/<content-hash>.<ext>`` through the catalog, plus one metadata record.

    The same image and label always get the same file and id, so a retried or repeated
    feedback is stored once.
    """

    def __init__(self, catalog: CatalogProtocol) -> None:
        self._catalog = catalog

    def save(self, image: bytes, label: str, record: dict[str, Any]) -> FeedbackReceipt:
        """Store the image under ``label`` and its metadata; return only once both are written.

        Raises:
            FeedbackStoreError: The store refused a write.
        """
        digest = hashlib.sha256(image).hexdigest()
        stored_as = f"{label}/{digest}.{image_extension(image)}"
        feedback_id = f"{label}-{digest[:32]}"
        metadata = {
            "feedback_id": feedback_id,
            "image": stored_as,
            "label": label,
            "received_at": datetime.now(UTC).isoformat(),
            **record,
        }
        try:
            self._catalog.save(FEEDBACK_IMAGES, {stored_as: image})
            self._catalog.save(FEEDBACK_METADATA, {feedback_id: metadata})
        except Exception as error:
            raise FeedbackStoreError(
                f"the feedback store refused the write ({type(error).__name__})"
            ) from error
        return FeedbackReceipt(feedback_id=feedback_id, stored_as=stored_as)
