"""Where the bundled datasets live, so demos and tests need no download.

- `fashion_mini`: 4 Fashion-MNIST classes, 120 grayscale images; the unit tests' dataset.
- The mini world's shipped samples (made by `python -m nola_core.mini.domains`, see
  docs/mini_world.md): `MINI_DEMO_DATASET`, a small shifted target domain that `nola demo`
  adapts to with the `mini` profile, and `MINI_SOURCE_DATASET`, a small clean sample of the
  domain the mini CLIP was trained on.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DATASET = "fashion_mini"
MINI_DEMO_DATASET = "fashion_blurred_small"
MINI_SOURCE_DATASET = "fashion_source_small"
MINI_WORLD_NOTE = (
    "NOTE: mini world: a small CLIP and DINO trained by this project on Fashion-MNIST "
    "(docs/mini_world.md), adapted to a shifted domain made from its test split. Every accuracy "
    "above is a real measurement of this miniature (gains and losses alike), not the papers' numbers."
)


def bundled_dataset_path(name: str = DEMO_DATASET) -> Path:
    """Root of a bundled dataset, ready for `load_dataset_spec`. It is package data: treat it
    as read-only and copy it before adding or removing images."""
    path = Path(__file__).resolve().parent / "demo_data" / name
    if not (path / "dataset.yaml").is_file():
        raise FileNotFoundError(f"{path}: bundled dataset missing from this nola_core install")
    return path


def demo_dataset_path() -> Path:
    """Root of the bundled Fashion-MNIST unit-test dataset (4 classes, 120 unlabeled images)."""
    return bundled_dataset_path(DEMO_DATASET)
