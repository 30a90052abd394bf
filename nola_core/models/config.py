"""Which CLIP and DINO to load, and the identity of that choice for cache keys."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from nola_core.models.registry import get_profile


@dataclass(frozen=True)
class ModelConfig:
    """Defaults are the NoLA paper's backbones (OpenAI CLIP ViT-B/16, DINO ViT-B/16).

    A local checkpoint path, when given, replaces the download for that model. A model with
    neither pretrained weights nor a checkpoint is randomly initialised from `init_seed`, so
    every stage that loads it gets the same weights.
    """

    clip_name: str = "ViT-B-16"
    clip_pretrained: str | None = "openai"
    clip_checkpoint: str | None = None
    dino_name: str = "vit_base_patch16_224.dino"
    dino_pretrained: bool = True
    dino_checkpoint: str | None = None
    init_seed: int = 0

    @classmethod
    def from_profile(cls, profile: str = "paper", **overrides) -> "ModelConfig":
        chosen = get_profile(profile)
        base = cls(
            clip_name=chosen.clip_name,
            clip_pretrained=chosen.clip_pretrained,
            dino_name=chosen.dino_name,
            dino_pretrained=chosen.dino_pretrained,
        )
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def clip_is_random(self) -> bool:
        return self.clip_pretrained is None and self.clip_checkpoint is None

    @property
    def dino_is_random(self) -> bool:
        return not self.dino_pretrained and self.dino_checkpoint is None

    def clip_identity(self) -> dict[str, str]:
        """Everything that changes the CLIP weights, for cache and artifact keys."""
        return {
            "clip_name": self.clip_name,
            "clip_weights": _weights_identity(self.clip_checkpoint, self.clip_pretrained, self.init_seed),
        }

    def dino_identity(self) -> dict[str, str]:
        tag = "pretrained" if self.dino_pretrained else None
        return {
            "dino_name": self.dino_name,
            "dino_weights": _weights_identity(self.dino_checkpoint, tag, self.init_seed),
        }


def _weights_identity(checkpoint: str | None, tag: str | None, init_seed: int) -> str:
    if checkpoint is not None:
        # Size and mtime stand in for a content hash of a file that may be gigabytes.
        stat = os.stat(checkpoint)
        return f"file:{os.path.abspath(checkpoint)}:{stat.st_size}:{stat.st_mtime_ns}"
    if tag is not None:
        return f"tag:{tag}"
    return f"random:{init_seed}"
