"""Build the bundled demo dataset nola_core/demo_data/fashion_mini from Fashion-MNIST.

Source: the Fashion-MNIST test set (MIT licence, Zalando Research) as packaged by Debian
(`apt-get install dataset-fashion-mnist`, files in /usr/share/datasets/fashion-mnist).
Seeded, so running it again writes byte-identical images:

    python scripts/make_demo_dataset.py [--source DIR] [--out DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from nola_core.mini.fashion import load_split

FASHION_MNIST_INDEX = {"t-shirt": 0, "trouser": 1, "sneaker": 7, "bag": 8}
"""Our class name -> Fashion-MNIST label (0 T-shirt/top, 1 Trouser, 7 Sneaker, 8 Bag):
four classes that look nothing alike, so even a small model has something to find."""

DATASET_YAML = """\
# Demo dataset: 4 Fashion-MNIST classes, 30 unlabeled images each (see README.md).
name: fashion_mini
classes:
{classes}
templates: generic
domain: grayscale product photo
"""


def png_bytes(pixels: np.ndarray) -> bytes:
    """The original 28x28 grayscale pixels as a PNG (no resizing: the demo stays real)."""
    buffer = BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "nola_core/demo_data/fashion_mini",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unlabeled-per-class", type=int, default=30)
    parser.add_argument("--held-out-per-class", type=int, default=10)
    args = parser.parse_args()

    images, labels = load_split("test", args.source)
    rng = np.random.default_rng(args.seed)
    per_class = args.unlabeled_per_class + args.held_out_per_class

    unlabeled: list[tuple[str, bytes]] = []  # (class, png)
    held_out: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    for name, fashion_label in FASHION_MNIST_INDEX.items():
        chosen: list[bytes] = []
        for index in rng.permutation(np.flatnonzero(labels == fashion_label)):
            png = png_bytes(images[index])
            digest = hashlib.sha256(png).hexdigest()
            if digest in seen:  # the system identifies images by content: keep them distinct
                continue
            seen.add(digest)
            chosen.append(png)
            if len(chosen) == per_class:
                break
        unlabeled += [(name, png) for png in chosen[: args.unlabeled_per_class]]
        held_out += [(name, png) for png in chosen[args.unlabeled_per_class :]]

    if args.out.exists():
        shutil.rmtree(args.out / "unlabeled", ignore_errors=True)
        shutil.rmtree(args.out / "labeled", ignore_errors=True)
    (args.out / "unlabeled").mkdir(parents=True, exist_ok=True)

    # Unlabeled: shuffled, names say nothing about the class.
    order = rng.permutation(len(unlabeled))
    labeled: list[tuple[str, bytes]] = []
    for number, position in enumerate(order, start=1):
        name, png = unlabeled[position]
        (args.out / "unlabeled" / f"img_{number:04d}.png").write_bytes(png)
        labeled.append((name, png))
    labeled += held_out

    # Labeled: the same 120 images plus the held-out ones, under differently shuffled names,
    # so they can only be matched to unlabeled/ by content hash.
    counters = dict.fromkeys(FASHION_MNIST_INDEX, 0)
    for position in rng.permutation(len(labeled)):
        name, png = labeled[position]
        counters[name] += 1
        folder = args.out / "labeled" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{counters[name]:04d}.png").write_bytes(png)

    classes = "\n".join(f"  - {name}" for name in FASHION_MNIST_INDEX)
    (args.out / "dataset.yaml").write_text(DATASET_YAML.format(classes=classes), encoding="utf-8")
    print(f"wrote {len(unlabeled)} unlabeled and {len(labeled)} labeled images to {args.out}")


if __name__ == "__main__":
    main()
