"""Benchmark images made from real pictures: the bundled Fashion-MNIST demo images, coloured,
scaled up and composed on textured backgrounds, saved as JPEG.

JPEG decode time depends on content (entropy-coded detail), so pure noise or flat colour
would misstate it; these images have real edges, smooth regions and sensor-like grain.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from nola_core.demo import demo_dataset_path

CLASSES = ("t-shirt", "trouser", "sneaker", "bag")


def _sources() -> list[Image.Image]:
    folder = demo_dataset_path()
    paths = sorted((folder / "unlabeled").glob("*.png")) + sorted((folder / "labeled").rglob("*.png"))
    return [Image.open(p).convert("L") for p in paths]


def make_image(sources: list[Image.Image], rng: np.random.Generator, short_side: tuple[int, int]) -> Image.Image:
    """One picture: a coloured, upscaled item on a mosaic of other items, with grain."""
    short = int(rng.integers(short_side[0], short_side[1] + 1))
    aspect = float(rng.choice([1.0, 4 / 3, 3 / 4, 3 / 2]))
    width, height = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))

    def coloured(image: Image.Image) -> Image.Image:
        dark, light = rng.integers(0, 120, 3), rng.integers(135, 256, 3)
        return ImageOps.colorize(image, black=tuple(int(v) for v in dark), white=tuple(int(v) for v in light))

    tiles = 4
    background = Image.new("RGB", (width, height))
    tile_w, tile_h = -(-width // tiles), -(-height // tiles)
    for ty in range(tiles):
        for tx in range(tiles):
            tile = coloured(sources[int(rng.integers(len(sources)))]).resize((tile_w, tile_h), Image.Resampling.BILINEAR)
            background.paste(tile, (tx * tile_w, ty * tile_h))
    background = background.resize((width // 2, height // 2), Image.Resampling.BOX).resize(
        (width, height), Image.Resampling.BILINEAR)  # softened, like an out-of-focus backdrop
    item_side = int(min(width, height) * rng.uniform(0.55, 0.9))
    item = coloured(sources[int(rng.integers(len(sources)))]).resize((item_side, item_side), Image.Resampling.BICUBIC)
    mask = item.convert("L").point(lambda v: 255 if v > 40 else 0)
    x = int(rng.integers(0, width - item_side + 1))
    y = int(rng.integers(0, height - item_side + 1))
    background.paste(item, (x, y), mask)
    pixels = np.asarray(background, dtype=np.float32)
    pixels += rng.normal(0.0, 6.0, pixels.shape)  # sensor grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_images(folder: Path, count: int, seed: int = 0, short_side: tuple[int, int] = (224, 320),
                 quality: int = 90, start: int = 0) -> list[Path]:
    """`count` JPEGs named img_<start+i>.jpg under `folder`; deterministic in (seed, index)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = _sources()
    paths = []
    for index in range(start, start + count):
        rng = np.random.default_rng([seed, index])
        path = folder / f"img_{index:07d}.jpg"
        make_image(sources, rng, short_side).save(path, quality=quality)
        paths.append(path)
    return paths


def write_dataset(root: Path, count: int, seed: int = 0, short_side: tuple[int, int] = (224, 320)) -> Path:
    """A dataset folder (dataset.yaml + unlabeled/) of `count` generated images, 4 demo classes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.yaml").write_text(
        "name: benchmark\nclasses: [" + ", ".join(CLASSES) + "]\ntemplates: generic\n", encoding="utf-8")
    write_images(root / "unlabeled", count, seed, short_side)
    return root


def folder_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
