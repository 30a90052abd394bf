"""Which CLIP and DINO to load, and the identity of that choice for cache keys."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from nola_core.models.registry import get_profile, shipped_weights


@dataclass(frozen=True)
class ModelConfig:
    """Defaults are the NoLA paper's backbones (OpenAI CLIP ViT-B/16, DINO ViT-B/16).

    A local checkpoint path, when given, replaces the download for that model; with a
    `*_checkpoint_sha256` the loader refuses a file whose content differs (the `mini`
    profile's shipped weights). A model with neither pretrained weights nor a checkpoint is
    randomly initialised from `init_seed`, so every stage that loads it gets the same weights.
    Weights found in `weights_dir` are the pretrained tag's own file, so they do not change the
    identity (cache keys) of the model.
    """

    clip_name: str = "ViT-B-16"
    clip_pretrained: str | None = "openai"
    clip_checkpoint: str | None = None
    clip_checkpoint_sha256: str | None = None
    dino_name: str = "vit_base_patch16_224.dino"
    dino_pretrained: bool = True
    dino_checkpoint: str | None = None
    dino_checkpoint_sha256: str | None = None
    init_seed: int = 0
    weights_dir: str | None = None  # `nola weights download` folder, read first (edges: NOLA_WEIGHTS_DIR)

    @classmethod
    def from_profile(cls, profile: str = "paper", **overrides) -> "ModelConfig":
        chosen = get_profile(profile)
        clip_file, clip_sha = shipped_weights(chosen.clip_checkpoint) if chosen.clip_checkpoint else (None, None)
        dino_file, dino_sha = shipped_weights(chosen.dino_checkpoint) if chosen.dino_checkpoint else (None, None)
        base = cls(
            clip_name=chosen.clip_name,
            clip_pretrained=chosen.clip_pretrained,
            clip_checkpoint=clip_file,
            clip_checkpoint_sha256=clip_sha,
            dino_name=chosen.dino_name,
            dino_pretrained=chosen.dino_pretrained,
            dino_checkpoint=dino_file,
            dino_checkpoint_sha256=dino_sha,
        )
        overrides = {k: v for k, v in overrides.items() if v is not None}
        # Another weights file or architecture: the shipped file's hash no longer applies.
        for model in ("clip", "dino"):
            if {f"{model}_checkpoint", f"{model}_name", f"{model}_pretrained"} & overrides.keys():
                overrides.setdefault(f"{model}_checkpoint_sha256", None)
                if f"{model}_checkpoint" not in overrides:
                    overrides.setdefault(f"{model}_checkpoint", None)
        return dataclasses.replace(base, **overrides)

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
            "clip_weights": _weights_identity(self.clip_checkpoint, self.clip_checkpoint_sha256,
                                              self.clip_pretrained, self.init_seed),
            "clip_quick_gelu": str(self.clip_quick_gelu),
        }

    @property
    def clip_quick_gelu(self) -> bool:
        """Whether the CLIP tower runs QuickGELU: what its pretrained tag was trained with
        (open_clip's tag config; OpenAI's weights), which open_clip only warns about when the
        architecture's config says GELU. A checkpoint file keeps its architecture's activation."""
        if self.clip_checkpoint is not None or self.clip_pretrained is None:
            return False
        from open_clip.pretrained import get_pretrained_cfg

        return bool(get_pretrained_cfg(self.clip_name, self.clip_pretrained).get("quick_gelu", False))

    def dino_identity(self) -> dict[str, str]:
        tag = "pretrained" if self.dino_pretrained else None
        return {
            "dino_name": self.dino_name,
            "dino_weights": _weights_identity(self.dino_checkpoint, self.dino_checkpoint_sha256, tag, self.init_seed),
        }


def _weights_identity(checkpoint: str | None, sha256: str | None, tag: str | None, init_seed: int) -> str:
    if checkpoint is not None and sha256 is not None:
        return f"sha256:{sha256}"  # verified on load, and the same wherever the package is installed
    if checkpoint is not None:
        # Size and mtime stand in for a content hash of a file that may be gigabytes.
        stat = os.stat(checkpoint)
        return f"file:{os.path.abspath(checkpoint)}:{stat.st_size}:{stat.st_mtime_ns}"
    if tag is not None:
        return f"tag:{tag}"
    return f"random:{init_seed}"
