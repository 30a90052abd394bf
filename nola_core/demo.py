"""Where the bundled demo dataset lives, so demos and tests need no download."""

from __future__ import annotations

from pathlib import Path

DEMO_DATASET = "fashion_mini"


def demo_dataset_path() -> Path:
    """Root of the bundled Fashion-MNIST demo dataset (4 classes, 120 unlabeled images),
    ready for `load_dataset_spec`. It is package data: treat it as read-only and copy it
    before adding or removing images."""
    path = Path(__file__).resolve().parent / "demo_data" / DEMO_DATASET
    if not (path / "dataset.yaml").is_file():
        raise FileNotFoundError(f"{path}: demo dataset missing from this nola_core install")
    return path
