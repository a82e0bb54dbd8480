"""Random variations of training batches, as MedNIST images vary: position, angle, size, contrast.

It works on what ``medical_ct.preprocessing.preprocess_image`` made (``uint8`` pixels of shape
``(batch, 1, IMAGE_SIZE, IMAGE_SIZE)``, read from the decoded shards): there is one decoding
for training, evaluation and serving, and training only adds variation after it. Only
training batches are augmented; validation, test and the service see the pixels as decoded.

- Geometry: one affine map per image (rotation, zoom, shift in pixels), bilinear, pixels from
  outside the image repeat its edge (black for most classes, grey for some CT slices: zeros
  would draw black corners that no real image has).
- Intensity: a random gain and gamma per image (CT slices come with different windowing,
  X-rays with different exposure); both keep black black, clipped to 0..255. And, for a
  share of images, inverted grey levels: X-rays come in both polarities (bone white or
  black; DICOM MONOCHROME1/2), and some MedNIST hands and chests have a white surround.
- Framing: for a share of images, the image shrunk to a picture on a plain surround of a
  random grey, somewhere in the frame: some MedNIST hands are a film photographed on a light
  box, a small dark picture in a white field, and those are what the default model calls CXR.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional

from medical_ct.preprocessing import IMAGE_SIZE

# A framed picture's side is at most this share of the image's, and its edge at most 0.9 of the
# way out from the centre: the surround shows on every side, as on a film on a light box.
_FRAME_LARGEST = 0.85
_LIMITS = {
    # parameter: (lowest, highest) accepted, and what it means
    "max_rotation_degrees": (0.0, 180.0),
    "max_shift_pixels": (0.0, IMAGE_SIZE / 4),
    "max_zoom": (0.0, 0.5),
    "max_gain": (0.0, 0.9),
    "max_gamma": (0.0, 1.0),
    "invert_probability": (0.0, 1.0),
    "frame_probability": (0.0, 1.0),
    "frame_size": (0.2, _FRAME_LARGEST),
    "probability": (0.0, 1.0),
}


@dataclass(frozen=True)
class AugmentationParams:
    """The ``training.augmentation`` parameters; zero (or ``enabled: false``) turns one off.

    ``max_zoom`` 0.1 scales by a factor in [0.9, 1.1]; ``max_gain`` 0.2 multiplies the pixels
    by [0.8, 1.2]; ``max_gamma`` 0.3 raises pixels (as 0..1) to a power in [1/1.3, 1.3];
    ``invert_probability`` is the share of augmented images whose grey levels are inverted;
    ``frame_probability`` the share shown as a picture of ``frame_size`` to 0.85 times the side
    on a plain surround; ``probability`` is the share of images of a batch that are augmented.
    """

    enabled: bool = False
    max_rotation_degrees: float = 0.0
    max_shift_pixels: float = 0.0
    max_zoom: float = 0.0
    max_gain: float = 0.0
    max_gamma: float = 0.0
    invert_probability: float = 0.0
    frame_probability: float = 0.0
    frame_size: float = 0.5
    probability: float = 1.0

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> "AugmentationParams":
        """Validate ``training.augmentation`` (``None`` or missing: no augmentation)."""
        problems = augmentation_problems(params)
        if problems:
            raise ValueError("invalid parameters training.augmentation: " + "; ".join(problems))
        return cls(**{key: value for key, value in (params or {}).items()})

    @property
    def active(self) -> bool:
        return self.enabled and self.probability > 0


def augmentation_problems(params: Any) -> list[str]:
    """What is wrong with ``training.augmentation``, one message each (empty when usable)."""
    if params is None:
        return []
    if not isinstance(params, dict):
        return [f"augmentation must be a mapping of parameters, got {params!r}"]
    problems = []
    unknown = set(params) - set(_LIMITS) - {"enabled"}
    if unknown:
        problems.append(
            f"augmentation has unknown keys {sorted(unknown)}; known: enabled, {', '.join(_LIMITS)}"
        )
    if not isinstance(params.get("enabled", False), bool):
        problems.append(f"augmentation.enabled must be true or false, got {params['enabled']!r}")
    for key, (low, high) in _LIMITS.items():
        if key not in params:
            continue
        value = params[key]
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not low <= value <= high
        ):
            problems.append(
                f"augmentation.{key} must be a number in [{low:g}, {high:g}], got {value!r}"
            )
    return problems


def augment_batch(
    images: torch.Tensor, params: AugmentationParams, generator: torch.Generator
) -> torch.Tensor:
    """A randomly varied copy of a batch of preprocessed images, as float pixel values 0..255.

    Args:
        images: ``(batch, 1, H, W)`` pixels 0..255 (``uint8`` or float), on any device.
        params: What to vary and how much; inactive params return ``images`` as floats.
        generator: A CPU generator: the same seed gives the same variations on any device.

    Returns:
        A float tensor of the shape and device of ``images``; the model scales it like uint8.
    """
    pixels = images.float()
    if not params.active or len(pixels) == 0:
        return pixels
    # Draw every random number of the batch on the CPU generator, whatever is applied.
    count = len(pixels)

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(count, generator=generator) * 2 - 1) * limit

    applied = torch.rand(count, generator=generator) < params.probability
    angle = uniform(math.radians(params.max_rotation_degrees))
    scale = 1 + uniform(params.max_zoom)
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size.
    shift = torch.stack([uniform(params.max_shift_pixels), uniform(params.max_shift_pixels)], 1)
    shift = shift * (2 / IMAGE_SIZE)
    gain = 1 + uniform(params.max_gain)
    gamma = torch.exp(uniform(math.log1p(params.max_gamma)))
    invert = torch.rand(count, generator=generator) < params.invert_probability
    # Only when framing is on, so that other settings keep the random numbers they drew before.
    frames = _draw_frames(count, params, generator) if params.frame_probability else None
    chosen = applied.nonzero().squeeze(1)
    if len(chosen) == 0:
        return pixels
    varied = pixels[chosen.to(pixels.device)]
    angle, scale, shift = angle[chosen], scale[chosen], shift[chosen]
    if params.max_rotation_degrees or params.max_shift_pixels or params.max_zoom:
        varied = _warp(varied, angle, scale, shift, padding_mode="border")
    if frames is not None:
        framed, size, centre, surround = (values[chosen] for values in frames)
        if framed.any():
            where = framed.nonzero().squeeze(1).to(pixels.device)
            varied[where] = _framed(varied[where], size[framed], centre[framed], surround[framed])
    if params.max_gamma:
        gamma = gamma[chosen].to(pixels.device).view(-1, 1, 1, 1)
        varied = (varied / 255).clamp_(0, 1).pow_(gamma).mul_(255)
    if params.max_gain:
        varied = varied.mul_(gain[chosen].to(pixels.device).view(-1, 1, 1, 1)).clamp_(0, 255)
    if params.invert_probability:
        flip = invert[chosen].to(pixels.device).view(-1, 1, 1, 1)
        varied = torch.where(flip, 255 - varied, varied)
    pixels[chosen.to(pixels.device)] = varied
    return pixels


def _warp(
    images: torch.Tensor,
    angle: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    padding_mode: str,
) -> torch.Tensor:
    """Each image rotated by ``angle``, scaled by ``scale`` and moved by ``shift`` ([-1, 1]
    coordinates); the grid samples the source at (rotation / scale) of the output + shift."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    ).to(images.device)
    grid = functional.affine_grid(theta, list(images.shape), align_corners=False)
    return functional.grid_sample(
        images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False
    )


def _draw_frames(
    count: int, params: AugmentationParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whether each image is framed, its picture's side, centre (inside the frame) and
    surround grey."""
    framed = torch.rand(count, generator=generator) < params.frame_probability
    size = torch.rand(count, generator=generator) * (_FRAME_LARGEST - params.frame_size)
    size = size + params.frame_size
    centre = torch.stack([torch.rand(count, generator=generator) for _ in "xy"], 1) * 2 - 1
    centre = centre * (0.9 - size).unsqueeze(1)
    surround = torch.rand(count, generator=generator) * 255
    return framed, size, centre, surround


def _framed(
    images: torch.Tensor, size: torch.Tensor, centre: torch.Tensor, surround: torch.Tensor
) -> torch.Tensor:
    """Each image shrunk to ``size`` of the side, centred at ``centre``, on a plain
    ``surround`` grey (0..255): outside the picture the warp reads zeros."""
    angle, shift = torch.zeros_like(size), -centre / size.unsqueeze(1)
    picture = _warp(images, angle, size, shift, padding_mode="zeros")
    inside = _warp(torch.ones_like(images), angle, size, shift, padding_mode="zeros")
    return picture + (1 - inside) * surround.to(images.device).view(-1, 1, 1, 1)
