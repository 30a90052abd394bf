"""Fashion-MNIST as Debian packages it, the mini world's class names and its caption grammar.

Input: `apt-get install dataset-fashion-mnist` (IDX files in /usr/share/datasets/fashion-mnist;
MIT licence, Zalando Research). The training split trains the mini CLIP; shifted target
domains are made from the test split only.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

CLASSES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
"""Our names for Fashion-MNIST labels 0-9, in label order."""

SYNONYMS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("t-shirt", "tee", "tee shirt"),
    "trouser": ("trouser", "trousers", "pants", "jeans"),
    "pullover": ("pullover", "sweater", "jumper"),
    "dress": ("dress", "gown", "frock"),
    "coat": ("coat", "jacket", "overcoat"),
    "sandal": ("sandal", "sandals", "flip flop"),
    "shirt": ("shirt", "blouse", "button shirt"),
    "sneaker": ("sneaker", "trainer", "running shoe"),
    "bag": ("bag", "handbag", "purse"),
    "ankle boot": ("ankle boot", "boot", "short boot"),
}

PARTS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("with short sleeves", "with a round neck", "without a collar"),
    "trouser": ("with two long legs", "with a waistband", "with long narrow legs"),
    "pullover": ("with long sleeves", "with a ribbed hem", "made of knitted wool"),
    "dress": ("with a flared skirt", "without sleeves", "with a long skirt"),
    "coat": ("with long sleeves and buttons", "with a zip", "with a wide collar"),
    "sandal": ("with thin straps", "with an open toe", "with a flat sole and straps"),
    "shirt": ("with a collar and buttons", "with long sleeves and a collar", "with a button placket"),
    "sneaker": ("with laces", "with a flat rubber sole", "with a low top"),
    "bag": ("with a handle", "with a shoulder strap", "with a square body"),
    "ankle boot": ("with a heel", "with a high top", "with a thick sole"),
}
"""Visual parts that tell the classes apart; the descriptions of the domains reuse them."""

LOOKS = ("", "small", "large", "bright", "dark", "plain", "grey", "blurry", "noisy", "colourful",
         "red", "blue", "green", "yellow", "white", "black", "striped", "patterned")
"""Appearance words with no class information: the text tower learns them, but they do not
decide the class (captions of one class are all positives of its images)."""

TEMPLATES = (
    "a photo of a {}.", "a photo of the {}.", "a good photo of a {}.", "a close-up photo of a {}.",
    "a cropped photo of the {}.", "a photo of the small {}.", "a photo of the large {}.",
    "a product photo of a {}.", "a picture of a {}.", "an image of the {}.", "this is a {}.", "a {}.",
)
"""Includes every template of the `generic` set, which the mini domains' dataset.yaml names."""


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format: big-endian magic, dims, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        _, _, dtype_code, ndim = struct.unpack(">BBBB", f.read(4))
        if dtype_code != 0x08:
            raise ValueError(f"{path}: expected uint8 IDX data, got type code {dtype_code:#x}")
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def load_split(split: str, source: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] uint8) of the `train` or `test` split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
    return images, labels


def caption(label: int, rng: np.random.Generator) -> str:
    """One caption of class `label` from the grammar: template x synonym, sometimes with an
    appearance word in front and a visual part after."""
    name = CLASSES[label]
    noun = str(rng.choice(SYNONYMS[name]))
    look = str(rng.choice(LOOKS)) if rng.random() < 0.4 else ""
    phrase = f"{look} {noun}".strip()
    if rng.random() < 0.5:
        phrase = f"{phrase} {rng.choice(PARTS[name])}"
    template = str(rng.choice(TEMPLATES))
    text = template.format(phrase)
    return text.replace("a a", "an a").replace("a e", "an e").replace("a o", "an o")
