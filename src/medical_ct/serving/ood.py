"""How far an image is from anything the champion was trained on (review's flag).

The measure: the distance, in the champion's penultimate-layer features (the input of its
class head, ``model.feature_extractor``), from the image to the nearest class centroid of a
sample of the raw store, divided by that class's own 99th-percentile distance. About 1 or
less is "looks like a training image of that class"; well above 1 is an image unlike all
of them (another modality, an inverted or noised image, a photo of a screen...). Softmax
confidence cannot tell this: a model is often confidently wrong far from its data, so the
reference is built from the data itself.

Measured on the 240-image sample with a sample-trained champion (reference: half the
sample). With average pooling (the default until 2026-12-02): held-out sample images
0.2-1.8, inverted images 2.0-2.3, images with Gaussian noise (sigma 40) 1.7-1.9, uniform
noise 4.2-4.7. With avg_max pooling (the default since; the average part of its features):
held-out 0.2-1.3, inverted 0.8-2.6 (3 of 12 over 2.0), uniform noise 3.0; and with the
conv_pool stem too (the default since 2026-12-02 09:36; the champions of two test
projects): held-out 0.1-1.5, inverted 0.3-2.4 (2 of 12 over 2.0), uniform noise 2.8-3.4.
Raw 16x16 thumbnails separated none of these (all 0.5-1.2): the features are the model's.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from kedro.io import CatalogProtocol

from medical_ct.preprocessing import InvalidImageError, preprocess_image

logger = logging.getLogger(__name__)
RAW_IMAGES = "raw_images"


@dataclass(frozen=True)
class OodReference:
    """Per-class centroids of the reference features and each class's 99th-percentile radius."""

    centroids: np.ndarray
    radii: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray) -> "OodReference":
        classes = np.unique(labels)
        centroids = np.stack([features[labels == c].mean(0) for c in classes])
        radii = np.array(
            [
                np.percentile(np.linalg.norm(features[labels == c] - centroids[i], axis=1), 99)
                for i, c in enumerate(classes)
            ]
        )
        return cls(centroids=centroids, radii=np.maximum(radii, 1e-6))

    def ratios(self, features: np.ndarray) -> np.ndarray:
        """For each image, min over classes of distance to the centroid / class radius."""
        distances = np.linalg.norm(features[:, None, :] - self.centroids[None], axis=2)
        return (distances / self.radii[None]).min(axis=1)


def build_reference(
    features: Callable[[np.ndarray], np.ndarray], catalog: CatalogProtocol, per_class: int
) -> OodReference | None:
    """Embed ``per_class`` images of each class of the raw store (evenly spread by name).

    None when the raw store has too few images: the flag is then not raised, and the log
    says why.
    """
    files = catalog.load(RAW_IMAGES)
    by_class: dict[str, list[str]] = {}
    for key in sorted(files):
        by_class.setdefault(key.split("/", 1)[0], []).append(key)
    pixels, labels = [], []
    for index, keys in enumerate(by_class.values()):
        step = max(1, len(keys) // per_class)
        for key in keys[::step][:per_class]:
            try:
                pixels.append(preprocess_image(files[key]()))
            except InvalidImageError:
                continue
            labels.append(index)
    if len(set(labels)) < 2 or len(labels) < 2 * len(set(labels)):
        logger.warning("No out-of-distribution reference: the raw store has too few images")
        return None
    return OodReference.fit(features(np.stack(pixels)), np.array(labels))
