"""How far an image is from anything the champion was trained on (``/predict``, review, monitoring).

The measure: the Mahalanobis distance, in the champion's penultimate-layer features (the
input of its class head, ``model.feature_extractor``), from the image to the nearest class
mean of a sample of the training images, under the classes' shared covariance (Ledoit-Wolf
shrinkage: a few hundred images for 128 features), divided by the 99th percentile of the
same distance over reference images left out of the fit. About 1 or less is "looks like a
training image"; well above is an image unlike all of them (another modality, an inverted
or noised image, a photo...). Softmax confidence cannot tell this: a model is often
confidently wrong far from its data (a flower photo was HeadCT at 0.99994), so the
reference is built from the data itself.

Measured with the champion of a default run on the 44,204-image dev set (2026-12-05,
reference 50 images a class, ratio cut 1.5): 0.12% of the 6,610 test images flagged, 51% of
300 inverted test images, every uniform-noise image, 7 of 44 odd inputs (photos, a text
page, noise, inverted images, a 4x4 thumbnail). The Euclidean distance over each class's
own radius, used until then, flagged none of the inverted images and 2 of the 44 at its cut
(2.0); at the 99.9th percentile of the validation images, 12% of the inverted against 67%
for Mahalanobis. Constant images (one grey level) sit near the means in both: the service
flags them by their pixels (``model_holder``).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from kedro.io import CatalogProtocol
from sklearn.covariance import LedoitWolf
from torch import nn

from medical_ct.model import embed, feature_extractor
from medical_ct.preprocessing import InvalidImageError, preprocess_image

logger = logging.getLogger(__name__)
RAW_IMAGES = "raw_images"


@dataclass(frozen=True)
class OodReference:
    """Class means of the reference features, the inverse of their shared covariance, and
    the radius the ratios are measured in."""

    centroids: np.ndarray
    precision: np.ndarray
    radius: float

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray) -> "OodReference":
        """Fit on every other image, take the radius from the others: distances of the very
        images a covariance was fitted on are too short, and every new image looked far."""
        fitted = np.arange(len(labels)) % 2 == 0
        centroids, precision = _gaussian(features[fitted], labels[fitted])
        held_out = _distances(centroids, precision, features[~fitted])
        radius = float(np.percentile(held_out, 99)) if len(held_out) else 0.0
        return cls(centroids=centroids, precision=precision, radius=max(radius, 1e-6))

    def ratios(self, features: np.ndarray) -> np.ndarray:
        """For each image, its distance to the nearest class mean over the radius."""
        return _distances(self.centroids, self.precision, features) / self.radius


def _gaussian(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The class means and the precision of the shared, shrunk covariance around them."""
    classes, rows = np.unique(labels, return_inverse=True)
    centroids = np.stack([features[rows == index].mean(0) for index in range(len(classes))])
    precision = LedoitWolf().fit(features - centroids[rows]).precision_
    return centroids, precision


def _distances(centroids: np.ndarray, precision: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each row of ``features`` to the nearest of ``centroids``."""
    offsets = features[:, None, :] - centroids[None]
    squared = np.einsum("nkd,de,nke->nk", offsets, precision, offsets)
    return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


@dataclass(frozen=True)
class OodCheck:
    """The out-of-distribution reference of a served version, and the ratio past which an
    image is answered ``out_of_distribution`` (conf/base/review.yml)."""

    reference: OodReference
    max_ratio: float


def check_builder(
    catalog: CatalogProtocol, per_class: int, max_ratio: float
) -> Callable[[nn.Module], OodCheck | None]:
    """What builds a model's ``OodCheck`` when the service loads it: a reference of
    ``per_class`` raw images a class, in that model's own features. A store that cannot be
    read leaves the version without one (logged): it is served, flagging nothing."""

    def build(model: nn.Module) -> OodCheck | None:
        extractor = feature_extractor(model)
        try:
            reference = build_reference(
                lambda images: embed(extractor, images[:, None]), catalog, per_class
            )
        except Exception as error:  # the store is down: serve, and say what is missing
            logger.error("No out-of-distribution reference, nothing is flagged: %r", error)
            return None
        return None if reference is None else OodCheck(reference, max_ratio)

    return build


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
