"""Large JPEGs decode at reduced scale (PIL `draft`) for the evaluation view, and the result
matches a full decode closely.

Tolerance, on pictures made from real images (benchmarks/images.py, with sensor-like grain) at
1200-4500 px: after the evaluation transform (shorter side to the model's size, centre crop),
the mean absolute difference from a full decode is below 1 grey level of 255 and the cosine of
the two normalised input tensors is at least 0.9995 (measured at most 0.74 grey levels, cosine
>= 0.9996, over 36 images: 3 sizes x 4 EXIF orientations x 3 pictures); a 4500 x 3000 photo decodes and transforms
about 4x faster (BENCHMARKS.md, "Decoding large photos").
"""

import hashlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nola_core.data import CLIP_MEAN, CLIP_STD, ImageRecord, Preprocess, eval_transform, load_rgb
from nola_core.features import FeatureConfig, extract_features
from nola_core.models import ModelConfig, load_dino
from nola_core.runtime import ComputeSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.images import _sources, make_image  # noqa: E402

PRE = Preprocess(224, CLIP_MEAN, CLIP_STD)
MEAN_GREY_LEVELS = 1.0
INPUT_COSINE = 0.9995


def _jpeg(short_side: int, seed: int, exif_orientation: int | None = None) -> bytes:
    image = make_image(_sources(), np.random.default_rng(seed), (short_side, short_side))
    out = io.BytesIO()
    if exif_orientation is None:
        image.save(out, "JPEG", quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(out, "JPEG", quality=90, exif=exif)
    return out.getvalue()


def _grey_levels(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() * torch.tensor(PRE.std)[:, None, None] * 255).mean())


@pytest.mark.parametrize("short_side, orientation", [(1200, None), (3000, None), (1600, 6), (1600, 8)])
def test_a_large_jpeg_decodes_reduced_and_close_to_a_full_decode(short_side, orientation):
    data = _jpeg(short_side, seed=short_side, exif_orientation=orientation)
    full = load_rgb("photo.jpg", data=data)
    reduced = load_rgb("photo.jpg", data=data, min_side=PRE.resize_size)
    assert PRE.resize_size <= min(reduced.size) < 2 * PRE.resize_size < min(full.size)  # as small as allowed
    assert abs(reduced.size[0] / reduced.size[1] - full.size[0] / full.size[1]) < 0.01  # same shape, upright
    transform = eval_transform(PRE)
    a, b = transform(full), transform(reduced)
    assert _grey_levels(a, b) < MEAN_GREY_LEVELS
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) >= INPUT_COSINE


def test_small_jpegs_and_other_formats_decode_in_full(tmp_path):
    small = _jpeg(300, seed=1)  # under twice the size: nothing to gain
    assert load_rgb("a.jpg", data=small, min_side=PRE.resize_size).tobytes() == load_rgb("a.jpg", data=small).tobytes()
    big_png = io.BytesIO()
    Image.open(io.BytesIO(_jpeg(1200, seed=2))).save(big_png, "PNG")
    png = big_png.getvalue()
    assert load_rgb("a.png", data=png, min_side=PRE.resize_size).size == load_rgb("a.png", data=png).size


def test_feature_extraction_decodes_reduced_only_when_told_the_resize_size(tmp_path):
    dino = load_dino(ModelConfig.from_profile("tiny"))
    records = []
    for seed in range(3):
        data = _jpeg(800, seed=seed)
        (tmp_path / f"{seed}.jpg").write_bytes(data)
        records.append(ImageRecord(hashlib.sha256(data).hexdigest(), f"{seed}.jpg"))
    transform, config = eval_transform(dino.preprocess), FeatureConfig(batch_size=3,
                                                                       compute=ComputeSettings(num_workers=0))
    full = extract_features(dino.encode_image, tmp_path, records, transform, config, "cpu", dtype=torch.float32)
    reduced = extract_features(dino.encode_image, tmp_path, records, transform, config, "cpu", dtype=torch.float32,
                               decode_min_side=dino.preprocess.resize_size)
    assert not torch.equal(full.features, reduced.features)  # the reduced decode really ran
    cosine = torch.nn.functional.cosine_similarity(full.features, reduced.features, dim=1)
    assert cosine.min() >= 0.99, cosine


def test_the_reduced_decode_resizes_to_the_size_a_full_decode_resizes_to():
    """The pixel grid after torchvision's Resize is the full decode's for any photo size."""
    from torchvision.transforms import v2

    sizes = np.random.default_rng(0).integers(448, 4100, size=(40, 2))
    smaller = 0
    for (width, height), side in zip(sizes.tolist(), [224, 256, 240, 288] * 10):
        out = io.BytesIO()
        Image.new("RGB", (width, height), (90, 120, 150)).save(out, "JPEG", quality=50)
        full = load_rgb("a.jpg", data=out.getvalue())
        reduced = load_rgb("a.jpg", data=out.getvalue(), min_side=side)
        resize = v2.Resize(side, antialias=True)
        assert resize(reduced).size == resize(full).size, (width, height, side, reduced.size)
        smaller += reduced.size != full.size
    # sizes with no scale whose crop keeps the grid decode in full (about 1 in 10 at random sizes,
    # none among common camera sizes)
    assert smaller >= 0.75 * len(sizes)
    for camera in [(4032, 3024), (6000, 4000), (1920, 1080), (2048, 1536)]:
        out = io.BytesIO()
        Image.new("RGB", camera).save(out, "JPEG", quality=50)
        assert max(load_rgb("a.jpg", data=out.getvalue(), min_side=224).size) <= max(camera) // 4


def test_training_views_decode_as_far_as_the_strong_crop_allows():
    """One decode serves DINO's weak view and CLIP's strong view: the weak view matches a full
    decode's (same seed) closely; the strong view's smallest RandomResizedCrop (20 % of the area,
    aspect 3/4) still has at least 224 px on each side, so nothing is enlarged."""
    from nola_core.data import IMAGENET_MEAN, IMAGENET_STD, MultiView, strong_transform, weak_transform
    from nola_core.data.transforms import views_decode_min_side

    dino = Preprocess(224, IMAGENET_MEAN, IMAGENET_STD, crop_pct=0.875)
    views = MultiView((weak_transform(dino), strong_transform(PRE)), decode_min_side=views_decode_min_side(dino, PRE))
    assert views.decode_min_side == 579
    data = _jpeg(3000, seed=3)
    reduced = load_rgb("a.jpg", data=data, min_side=views.decode_min_side)
    full = load_rgb("a.jpg", data=data)
    assert views.decode_min_side <= min(reduced.size) < min(full.size) // 2
    area = 0.2 * reduced.size[0] * reduced.size[1]
    assert min((area * 3 / 4) ** 0.5, (area / (3 / 4)) ** 0.5) >= PRE.image_size
    for seed in range(5):
        torch.manual_seed(seed)
        weak_full = views(full)[0]
        torch.manual_seed(seed)
        weak_reduced = views(reduced)[0]
        assert _grey_levels(weak_full, weak_reduced) < MEAN_GREY_LEVELS
