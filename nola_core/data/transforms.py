"""Image transforms: evaluation, weak and strong views, normalised per backbone.

Each backbone states its own preprocessing in a `Preprocess` (CLIP and DINO differ: the NoLA
reference fed DINO the CLIP statistics, a bug), and every transform is built from one, never
from constants at the call site. All transforms take an RGB PIL image (see `load_rgb`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class Preprocess:
    """What a backbone expects: square input side, normalisation, resize filter, and the
    fraction of the resized image kept by the centre crop (timm's crop_pct)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"mean and std need 3 values, std positive; got {self.mean}, {self.std}"
            )
        valid = [mode.value for mode in InterpolationMode]
        if self.interpolation not in valid:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {valid}")

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop."""
        return math.floor(self.image_size / self.crop_pct)


def _interpolation(pre: Preprocess) -> InterpolationMode:
    return InterpolationMode(pre.interpolation)


def _to_normalized_tensor(pre: Preprocess) -> list:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(pre.mean), std=list(pre.std)),
    ]


def eval_transform(pre: Preprocess) -> Transform:
    """Deterministic view: shorter side to image_size / crop_pct, centre crop, normalise."""
    return v2.Compose([
        v2.Resize(pre.resize_size, interpolation=_interpolation(pre), antialias=True),
        v2.CenterCrop(pre.image_size),
        *_to_normalized_tensor(pre),
    ])


def weak_transform(pre: Preprocess, flip_p: float = 0.5) -> Transform:
    """The view pseudo-labels are taken from: resize, random crop, horizontal flip.

    The crop is a plain RandomCrop of the resized image (no rescaling, no padding), so the
    weak view keeps the whole object at the evaluation scale, like the reference code's
    resize + centre crop; the randomness comes from the crop margin (1 - crop_pct of the
    shorter side, plus the longer side's excess) and the flip.
    """
    return v2.Compose([
        v2.Resize(pre.resize_size, interpolation=_interpolation(pre), antialias=True),
        v2.RandomCrop(pre.image_size),
        v2.RandomHorizontalFlip(p=flip_p),
        *_to_normalized_tensor(pre),
    ])


def strong_transform(
    pre: Preprocess,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    crop_interpolation: str = "bilinear",
    flip_p: float = 0.5,
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.0,
    perspective_distortion: float = 0.2,
    perspective_p: float = 0.5,
    perspective_interpolation: str = "bicubic",
    second_jitter: tuple[float, float, float, float] | None = (0.4, 0.4, 0.4, 0.1),
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    blur_p: float = 1.0,
) -> Transform:
    """The view the tuned model is trained on. Defaults are NoLA's reference
    (`utils/model_utils.py`, `get_random_transform`), in its order: RandomResizedCrop (scale
    0.2-1, torchvision's default bilinear filter), flip, ColorJitter p = 0.8, RandomPerspective
    (0.2, p = 0.5, bicubic), a second, unconditional ColorJitter, and PIL's Gaussian blur on
    every image (`PILGaussianBlur`). `jitter` is (brightness, contrast, saturation, hue).

    LaFTer's reference has no perspective and no second jitter (`perspective_p=0`,
    `second_jitter=None`) but a RandomGrayscale right after the first jitter (`grayscale_p`).
    Steps with probability 0 are left out of the composition.
    """
    brightness, contrast, saturation, hue = jitter
    steps = [
        v2.RandomResizedCrop(pre.image_size, scale=crop_scale, interpolation=InterpolationMode(crop_interpolation),
                             antialias=True),
        v2.RandomHorizontalFlip(p=flip_p),
        *_with_probability(v2.ColorJitter(brightness, contrast, saturation, hue), jitter_p),
    ]
    if grayscale_p > 0:
        steps.append(v2.RandomGrayscale(p=grayscale_p))
    if perspective_p > 0:
        steps.append(v2.RandomPerspective(distortion_scale=perspective_distortion, p=perspective_p,
                                          interpolation=InterpolationMode(perspective_interpolation)))
    if second_jitter is not None:
        steps.append(v2.ColorJitter(*second_jitter))
    steps += _with_probability(PILGaussianBlur(blur_sigma), blur_p)
    return v2.Compose([*steps, *_to_normalized_tensor(pre)])


def _with_probability(transform: Transform, p: float) -> list:
    """`transform` applied with probability p, as composition steps: none at 0, itself at 1."""
    if p <= 0:
        return []
    return [transform] if p >= 1 else [v2.RandomApply([transform], p=p)]


@dataclass(frozen=True)
class PILGaussianBlur:
    """PIL's `GaussianBlur(radius=sigma)`, sigma drawn uniformly from `sigma`: the blur of the
    NoLA and LaFTer references (their `GaussianBlur` class, from SimCLR). PIL blurs with three box
    passes and no truncated kernel, so torchvision's GaussianBlur would differ at large sigma.
    The draw comes from torch's RNG (the reference used `random`), so a seeded item repeats."""

    sigma: tuple[float, float] = (0.1, 2.0)

    def __call__(self, image: Image.Image) -> Image.Image:
        radius = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


def views_decode_min_side(weak: Preprocess, strong: Preprocess, crop_scale: tuple[float, float] = (0.2, 1.0)) -> int:
    """The shorter side a reduced JPEG decode (`data.load_rgb`'s `min_side`) must keep for a
    weak view (shorter side resized to `weak.resize_size`) and a strong view whose smallest
    `RandomResizedCrop` (area `crop_scale[0]`, aspect 3/4) is still shrunk to
    `strong.image_size`, never enlarged: 579 px for a 224 px CLIP."""
    return max(weak.resize_size, math.ceil(strong.image_size / math.sqrt(crop_scale[0] * 3 / 4)))


@dataclass(frozen=True)
class MultiView:
    """Several views of one image (e.g. weak and strong for FixMatch) as a tuple; a class
    rather than a lambda so DataLoader workers can pickle it. `decode_min_side`: the shorter
    side the image may be decoded down to for all views (`views_decode_min_side`), or None
    to decode in full."""

    transforms: tuple[Transform, ...]
    decode_min_side: int | None = None

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, ...]:
        return tuple(transform(image) for transform in self.transforms)
