"""CLIP (open_clip) and DINO (timm) loading, model profiles, and the VPT wrapper."""

from nola_core.models.config import ModelConfig
from nola_core.models.loading import (
    ClipModel,
    DinoModel,
    UnsafeCheckpointError,
    WeightsUnavailableError,
    load_clip,
    load_dino,
)
from nola_core.models.registry import PROFILES, get_profile
from nola_core.models.vpt import PromptedVisionEncoder, PromptTunedClassifier

__all__ = [
    "PROFILES",
    "ClipModel",
    "DinoModel",
    "ModelConfig",
    "PromptTunedClassifier",
    "PromptedVisionEncoder",
    "UnsafeCheckpointError",
    "WeightsUnavailableError",
    "get_profile",
    "load_clip",
    "load_dino",
]
