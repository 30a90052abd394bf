"""Shifted target domains of the mini world, written as ordinary dataset folders.

Every domain is made from the Fashion-MNIST *test* split (the mini CLIP trained on the training
split), one image at a time with its own seeded generator, so a domain of any size is a prefix
of the same images and running the generator again writes identical files:

- `textured`: the garment in a random colour on a random procedural texture (stripes, checks
  or blotches in two colours); `strength` blends from the clean image (0) to that (1).
- `negative`: the inverted image (dark garment on a light ground) with Gaussian and
  salt-and-pepper noise; `strength` scales both noises.
- `sketch`: a white line drawing of the garment's edges on black (Sobel magnitude, with pencil
  noise), blended with the image; `strength` is the weight of the drawing.
- `blurred`: the image out of focus (Gaussian blur); `strength` is the blur's radius in pixels.
  A shift that removes detail but keeps each garment's shape, so the mini DINO's features still
  tell the classes apart where the mini CLIP's zero-shot does not: the domain with room for
  label-free adaptation (docs/mini_world.md, "A domain with room").

Strengths are chosen (docs/mini_world.md) so that zero-shot of the mini CLIP lands between
chance and its clean accuracy. Folder layout as the demo dataset's (nola_core/demo_data/
fashion_mini/README.md): `unlabeled/` flat, shuffled, uninformative names; `labeled/<class>/`
the same images under other shuffled names plus held-out ones, matched by content hash.

    python -m nola_core.mini.domains --out DIR [--per-class 100] [--held-out-per-class 20]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from nola_core.llm.describe import DescriptionSet
from nola_core.mini.fashion import CLASSES, FASHION_MNIST_DIR, PARTS, SYNONYMS, load_split


@dataclass(frozen=True)
class Shift:
    name: str
    strength: float
    domain: str  # dataset.yaml `domain`: put into LLM questions
    looks: tuple[str, ...]  # appearance words (known to the text tower) for the descriptions


SHIFTS: dict[str, Shift] = {
    "textured": Shift("textured", 0.7, "colourful garment on a patterned background", ("colourful", "patterned")),
    "negative": Shift("negative", 0.6, "noisy photo negative", ("noisy", "dark")),
    "sketch": Shift("sketch", 0.75, "white line drawing on black", ("white", "plain")),
    "blurred": Shift("blurred", 3.0, "out-of-focus grayscale product photo", ("grey", "plain")),
}
RENDERED_SHIFTS = ("textured", "negative", "sketch")
"""The shifts the mini DINO trained on (random renderings of source images, and these domains'
unlabeled images): `blurred` came later, so it is a domain the DINO never saw, like a target
of the papers' ImageNet-trained DINO."""
FASHION_LICENCE = Path(__file__).resolve().parents[1] / "demo_data" / "fashion_mini" / "LICENSE-DATA.md"
SOURCE = "source"
"""The clean domain: test-split images as they are (grayscale), for the source zero-shot."""


def _texture(rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """A [size, size] pattern in [0, 1]: stripes, checks or smooth blotches."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(3)
    angle = rng.uniform(0, np.pi)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    period = rng.uniform(3.0, 8.0)
    if kind == 0:
        return (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
    if kind == 1:
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    coarse = rng.random((5, 5)).astype(np.float32)
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3).astype(np.float32)


def _textured(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    gray = image.astype(np.float32) / 255.0
    alpha = np.clip(gray * 2.0, 0.0, 1.0)[..., None]
    garment = (1 - strength) * gray[..., None] + strength * _colour(rng) * (0.4 + 0.6 * gray[..., None])
    pattern = _texture(rng)[..., None]
    ground = pattern * _colour(rng) + (1 - pattern) * _colour(rng)
    rgb = alpha * garment + (1 - alpha) * strength * ground
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def _negative(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    gray = 1.0 - image.astype(np.float32) / 255.0
    gray = gray + rng.normal(0.0, 0.25 * strength, size=gray.shape)
    flips = rng.random(gray.shape) < 0.15 * strength
    gray[flips] = rng.integers(0, 2, size=int(flips.sum()))
    return (np.clip(gray, 0, 1) * 255).round().astype(np.uint8)


def _blurred(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(strength)))


def _sketch(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    gray = image.astype(np.float32) / 255.0
    padded = np.pad(gray, 1, mode="edge")
    gx = (padded[1:-1, 2:] - padded[1:-1, :-2]) * 2 + (padded[:-2, 2:] - padded[:-2, :-2]) + (padded[2:, 2:] - padded[2:, :-2])
    gy = (padded[2:, 1:-1] - padded[:-2, 1:-1]) * 2 + (padded[2:, :-2] - padded[:-2, :-2]) + (padded[2:, 2:] - padded[:-2, 2:])
    edges = np.hypot(gx, gy)
    edges = np.clip(edges / max(float(edges.max()), 1e-6) * 1.5, 0, 1)
    edges = edges * rng.uniform(0.7, 1.0, size=edges.shape)  # pencil pressure
    drawing = (1 - strength) * gray + strength * edges
    return (np.clip(drawing, 0, 1) * 255).round().astype(np.uint8)


_SHIFT_FUNCTIONS = {"textured": _textured, "negative": _negative, "sketch": _sketch, "blurred": _blurred}


def shift_images(name: str, images: np.ndarray, indices: np.ndarray, seed: int = 0,
                 strength: float | None = None) -> list[np.ndarray]:
    """The shifted versions of `images[indices]`; image i always gets generator (seed, domain, i),
    so the result does not depend on which other images are asked for."""
    if name == SOURCE:
        return [images[i] for i in indices]
    shift = SHIFTS[name]
    function = _SHIFT_FUNCTIONS[name]
    domain_id = list(SHIFTS).index(name) + 1
    chosen = shift.strength if strength is None else strength
    return [function(images[i], chosen, np.random.default_rng([seed, domain_id, int(i)])) for i in indices]


RENDERING_STRENGTHS = (0.3, 1.0)
"""Range of a random rendering's strength (the domains' fixed strengths lie inside it)."""


def random_rendering(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`image` [28, 28] uint8 as RGB uint8 in a random style: as it is, or one of the shifts at a
    random strength, drawn with `rng` (its own texture and colours). Two renderings of one
    garment share only its shape: the mini DINO's views of a source image (train.py)."""
    kind = rng.integers(len(RENDERED_SHIFTS) + 1)
    if kind == 0:
        pixels = image
    else:
        name = RENDERED_SHIFTS[kind - 1]
        pixels = _SHIFT_FUNCTIONS[name](image, float(rng.uniform(*RENDERING_STRENGTHS)), rng)
    return np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels


def _png(pixels: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def domain_indices(labels: np.ndarray, per_class: int, held_out_per_class: int, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Test-split indices (unlabeled, held-out) of a domain: a seeded per-class permutation
    of the split, the first `per_class` for adaptation, the next ones held out. The same for
    every domain and a prefix across sizes, so the shipped small domain is part of the big one."""
    rng = np.random.default_rng(seed)
    unlabeled, held_out = [], []
    for label in range(len(CLASSES)):
        order = rng.permutation(np.flatnonzero(labels == label))
        unlabeled.append(order[:per_class])
        held_out.append(order[per_class: per_class + held_out_per_class])
    return np.concatenate(unlabeled), np.concatenate(held_out)


def descriptions(shift: Shift | None) -> dict[str, list[str]]:
    """Class descriptions written from the caption grammar's words (what the text tower knows):
    every synonym and visual part of the class, with the domain's appearance words."""
    looks = shift.looks if shift is not None else ("grey",)
    result = {}
    for name in CLASSES:
        lines = [f"a photo of a {look} {noun}." for noun in SYNONYMS[name] for look in looks]
        lines += [f"a {name} {part}." for part in PARTS[name]]
        result[name] = lines
    return result


def write_domain(out: Path, name: str, images: np.ndarray, labels: np.ndarray, per_class: int,
                 held_out_per_class: int, seed: int = 0, dataset_name: str | None = None) -> Path:
    """Write one domain folder (dataset.yaml, unlabeled/, labeled/<class>/, descriptions.json)."""
    unlabeled_idx, held_idx = domain_indices(labels, per_class, held_out_per_class, seed)
    unlabeled = [(CLASSES[labels[i]], _png(p)) for i, p in zip(unlabeled_idx, shift_images(name, images, unlabeled_idx, seed))]
    held_out = [(CLASSES[labels[i]], _png(p)) for i, p in zip(held_idx, shift_images(name, images, held_idx, seed))]
    seen: set[str] = set()
    for _, png in unlabeled + held_out:  # the system identifies images by content
        digest = hashlib.sha256(png).hexdigest()
        if digest in seen:
            raise ValueError(f"{name}: two images with the same content; change the seed")
        seen.add(digest)

    folder = out / (dataset_name or f"fashion_{name}")
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "unlabeled").mkdir(parents=True)
    rng = np.random.default_rng([seed, 1000])
    labeled: list[tuple[str, bytes]] = []
    for number, position in enumerate(rng.permutation(len(unlabeled)), start=1):
        cls, png = unlabeled[position]
        (folder / "unlabeled" / f"img_{number:05d}.png").write_bytes(png)
        labeled.append((cls, png))
    labeled += held_out
    counters = dict.fromkeys(CLASSES, 0)
    for position in rng.permutation(len(labeled)):
        cls, png = labeled[position]
        counters[cls] += 1
        (folder / "labeled" / cls).mkdir(parents=True, exist_ok=True)
        (folder / "labeled" / cls / f"{counters[cls]:05d}.png").write_bytes(png)

    shift = SHIFTS.get(name)
    domain = shift.domain if shift else "grayscale product photo"
    classes = "\n".join(f"  - {c}" for c in CLASSES)
    (folder / "dataset.yaml").write_text(
        f"# Mini world domain {name!r}: Fashion-MNIST test split, {per_class} unlabeled and "
        f"{held_out_per_class} held-out images per class\n# (made by python -m nola_core.mini.domains; "
        f"see docs/mini_world.md).\nname: {folder.name}\nclasses:\n{classes}\ntemplates: generic\n"
        f"domain: {domain}\ndescriptions: descriptions.json\n", encoding="utf-8")
    (folder / "README.md").write_text(_readme(folder.name, name, shift, per_class, held_out_per_class, seed),
                                      encoding="utf-8")
    shutil.copy(FASHION_LICENCE, folder / "LICENSE-DATA.md")
    DescriptionSet(descriptions(shift), provenance={
        "provider": "file", "model": None,
        "source": "generated by nola_core.mini.domains from the mini caption grammar; not LLM output",
        "licence": "Apache-2.0, like the rest of the nola project", "written_for": domain,
    }).save(folder / "descriptions.json")
    return folder


def _readme(dataset: str, name: str, shift: Shift | None, per_class: int, held_out: int, seed: int) -> str:
    what = f"shift `{name}` at strength {shift.strength} ({shift.domain})" if shift else "clean images (the source domain)"
    return f"""# {dataset} — a mini-world domain

Fashion-MNIST test-split images (10 classes), {what}. `unlabeled/`: {per_class} images per
class, shuffled, uninformative names; `labeled/<class>/`: for **evaluation only**, the same images
under other names plus {held_out} held-out images per class (matched by content hash).
`descriptions.json` is generated from the mini caption grammar (words the mini CLIP's text tower
was trained on), not by an LLM.

Made by `python -m nola_core.mini.domains --domains {name} --per-class {per_class} --held-out-per-class {held_out} --seed {seed}`
(see docs/mini_world.md) from Debian's `dataset-fashion-mnist`. Images © 2017 Zalando SE, MIT licence
(`LICENSE-DATA.md`; Xiao, Rasul and Vollgraf, 2017, arXiv:1708.07747).
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=FASHION_MNIST_DIR)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--domains", nargs="+", default=[SOURCE, *SHIFTS], choices=[SOURCE, *SHIFTS])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--held-out-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--suffix", default="", help="appended to each folder name, e.g. _small")
    args = parser.parse_args(argv)
    images, labels = load_split("test", args.source)
    for name in args.domains:
        folder = write_domain(args.out, name, images, labels, args.per_class, args.held_out_per_class, args.seed,
                              dataset_name=f"fashion_{name}{args.suffix}")
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
