"""The one place that names models: profiles, and our tiny randomly initialised test configs.

Tiny models go through exactly the same loading code as the paper's backbones (open_clip's
config registry, timm's `create_model`); only their size and their lack of weights differ.
Nothing here runs at import time: `register_tiny_clip_configs` is called by the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_CLIP_NAME = "nola-tiny-clip"
TINY_DINO_NAME = "nola-tiny-dino"


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
}


@dataclass(frozen=True)
class ModelProfile:
    clip_name: str
    clip_pretrained: str | None
    dino_name: str
    dino_pretrained: bool


PROFILES: dict[str, ModelProfile] = {
    # The papers' backbones: OpenAI CLIP ViT-B/16 and self-supervised DINO ViT-B/16.
    "paper": ModelProfile("ViT-B-16", "openai", "vit_base_patch16_224.dino", True),
    # Random tiny models for tests and the demo: same code paths, meaningless accuracy.
    "tiny": ModelProfile(TINY_CLIP_NAME, None, TINY_DINO_NAME, False),
}


def get_profile(name: str) -> ModelProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown model profile {name!r}; choose one of {sorted(PROFILES)}") from None


def register_tiny_clip_configs() -> None:
    """Add our JSON configs to open_clip's registry (idempotent; open_clip keys by file stem)."""
    import open_clip

    if TINY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
