"""The one place that names models: profiles, our tiny test configs and the mini world's.

Tiny and mini models go through exactly the same loading code as the paper's backbones
(open_clip's config registry, timm's `create_model`, a local checkpoint file): the tiny ones
are randomly initialised, the mini ones are weights this project trained
(`python -m nola_core.mini.train`) and ships in `nola_core/mini/weights`, checked against the
SHA-256 in its manifest when loaded. Nothing here runs at import time:
`register_tiny_clip_configs` is called by the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_CLIP_NAME = "nola-tiny-clip"
TINY_DINO_NAME = "nola-tiny-dino"
MINI_CLIP_NAME = "nola-mini-clip"
MINI_DINO_NAME = "nola-mini-dino"
MINI_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "mini" / "weights"
MINI_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TimmModelSpec:
    """A timm `arch.tag` plus the keyword overrides that shrink it (empty for real models)."""

    timm_name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    input_size: int | None = None


# Our own DINO-like configs. Any other name is passed to timm unchanged.
DINO_CONFIGS: dict[str, TimmModelSpec] = {
    TINY_DINO_NAME: TimmModelSpec(
        # The `.dino` tag keeps DINO's pretrained config: ImageNet mean/std, bicubic, crop 0.9.
        timm_name="vit_small_patch16_224.dino",
        overrides=dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
        input_size=32,
    ),
    # The mini world's DINO (trained by nola_core.mini.train): 32 px, patch 8, 4 blocks of
    # width 128; dynamic image size so DINO's 16 px local crops go through the same network.
    MINI_DINO_NAME: TimmModelSpec(
        timm_name="vit_small_patch16_224.dino",
        overrides=dict(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4, dynamic_img_size=True),
        input_size=32,
    ),
}


@dataclass(frozen=True)
class ModelProfile:
    """`*_checkpoint` names a weights file in `MINI_WEIGHTS_DIR` whose SHA-256 is in its manifest."""

    clip_name: str
    clip_pretrained: str | None
    dino_name: str
    dino_pretrained: bool
    clip_checkpoint: str | None = None
    dino_checkpoint: str | None = None


PROFILES: dict[str, ModelProfile] = {
    # The papers' backbones: OpenAI CLIP ViT-B/16 and self-supervised DINO ViT-B/16.
    "paper": ModelProfile("ViT-B-16", "openai", "vit_base_patch16_224.dino", True),
    # Random tiny models for tests and the demo: same code paths, meaningless accuracy.
    "tiny": ModelProfile(TINY_CLIP_NAME, None, TINY_DINO_NAME, False),
    # The mini world: small CLIP and DINO trained by this project on Fashion-MNIST (shipped).
    "mini": ModelProfile(MINI_CLIP_NAME, None, MINI_DINO_NAME, False,
                         clip_checkpoint=f"{MINI_CLIP_NAME}.safetensors",
                         dino_checkpoint=f"{MINI_DINO_NAME}.safetensors"),
}


def get_profile(name: str) -> ModelProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown model profile {name!r}; choose one of {sorted(PROFILES)}") from None


def shipped_weights(filename: str) -> tuple[str, str]:
    """(absolute path, expected SHA-256) of a weights file shipped in `MINI_WEIGHTS_DIR`."""
    import json

    manifest = MINI_WEIGHTS_DIR / MINI_MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: missing; train the mini world with `python -m nola_core.mini.train`")
    files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    if filename not in files:
        raise FileNotFoundError(f"{manifest}: no entry for {filename}; known: {sorted(files)}")
    return str(MINI_WEIGHTS_DIR / filename), files[filename]


def register_tiny_clip_configs() -> None:
    """Add our JSON configs (tiny and mini) to open_clip's registry (idempotent; open_clip
    keys by file stem)."""
    import open_clip

    if not {TINY_CLIP_NAME, MINI_CLIP_NAME} <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
