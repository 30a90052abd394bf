"""Load CLIP through open_clip and DINO through timm, each with its own preprocessing.

Staged as open_clip does: resolve the config, build, load weights strictly, attach the
preprocessing the weights were trained with. Models come back frozen and in eval mode.

Where the weights come from, in order: a checkpoint file the config names (checked against its
SHA-256 when it has one); the weights folder (`weights_dir`, which the edges fill from
NOLA_WEIGHTS_DIR: see nola_core.models.weights), its file checked against the manifest's SHA-256;
else open_clip's and timm's own download and caches.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from nola_core.data.transforms import CLIP_MEAN, CLIP_STD, Preprocess
from nola_core.models.config import ModelConfig
from nola_core.models.registry import DINO_CONFIGS, TimmModelSpec, register_tiny_clip_configs
from nola_core.models.weights import (
    WEIGHTS_DIR_ENV,
    CheckpointHashError,  # noqa: F401  (raised by verify_checkpoint; imported from here by callers)
    WeightsUnavailableError,
    download_command,
    local_weights,
    resolve_weights_dir,
    verify_checkpoint,
)

logger = logging.getLogger(__name__)


class UnsafeCheckpointError(ValueError):
    """A checkpoint that is a pickle of more than plain tensors: refused, never executed."""


def _unsafe_checkpoint(error: BaseException, path: str | None) -> UnsafeCheckpointError | None:
    if path is not None and (isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error)):
        return UnsafeCheckpointError(
            f"{path}: refused, it is a pickle holding more than plain tensors and loading it could run "
            "code. Use a safetensors file, or a state dict saved with torch.save(model.state_dict())."
        )
    return None


@dataclass
class ClipModel:
    model: nn.Module  # open_clip CLIP, frozen
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Preprocess
    embed_dim: int
    config: ModelConfig

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @torch.inference_mode()
    def encode_text(self, texts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        tokens = self.tokenizer(texts).to(device)
        return self.model.encode_text(tokens, normalize=True).float()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)


@dataclass
class DinoModel:
    model: nn.Module  # timm ViT, frozen, no head
    preprocess: Preprocess
    feature_dim: int
    config: ModelConfig

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """CLS features through timm's uniform interface (never by reaching into blocks)."""
        tokens = self.model.forward_features(images)
        return self.model.forward_head(tokens, pre_logits=True)


def load_clip(config: ModelConfig, device: torch.device | str = "cpu") -> ClipModel:
    import open_clip

    register_tiny_clip_configs()
    if config.clip_name not in open_clip.list_models():
        raise ValueError(
            f"unknown CLIP architecture {config.clip_name!r}; open_clip knows "
            f"{len(open_clip.list_models())} (see open_clip.list_models())"
        )
    weights, file, preprocess = config.clip_checkpoint or config.clip_pretrained, config.clip_checkpoint, None
    verify_checkpoint(config.clip_checkpoint, config.clip_checkpoint_sha256)
    if file is None and config.clip_pretrained is not None:
        file = local_weights(resolve_weights_dir(config.weights_dir), "clip", config.clip_name, config.clip_pretrained)
        if file is not None:
            # The tag's preprocessing, which open_clip attaches only when it loads by tag.
            tag_cfg = open_clip.pretrained.get_pretrained_cfg(config.clip_name, config.clip_pretrained)
            weights, preprocess = file, open_clip.transform.merge_preprocess_dict({}, tag_cfg)
    with _seeded_init(config.init_seed):
        try:
            model = open_clip.create_model(config.clip_name, pretrained=weights, device=device,
                                           force_preprocess_cfg=preprocess,
                                           force_quick_gelu=config.clip_quick_gelu)
        except (RuntimeError, OSError, pickle.UnpicklingError) as error:
            if unsafe := _unsafe_checkpoint(error, file):
                raise unsafe from error
            raise WeightsUnavailableError(
                f"could not load CLIP {config.clip_name!r} with weights {weights!r}: {error}. "
                f"Offline? Run `{download_command('clip', config.clip_name, config.clip_pretrained)} --to DIR` "
                f"on a connected machine and set {WEIGHTS_DIR_ENV}=DIR, or pass the local file as "
                "clip_checkpoint (env NOLA_CLIP_CHECKPOINT), or use the 'tiny' model profile."
            ) from error
    _freeze(model)
    tokenizer = open_clip.get_tokenizer(config.clip_name)
    return ClipModel(
        model=model,
        tokenizer=tokenizer,
        preprocess=_clip_preprocess(model),
        embed_dim=int(model.visual.output_dim),
        config=config,
    )


def load_dino(config: ModelConfig, device: torch.device | str = "cpu") -> DinoModel:
    import timm

    spec = DINO_CONFIGS.get(config.dino_name, TimmModelSpec(timm_name=config.dino_name))
    kwargs: dict[str, Any] = dict(spec.overrides, num_classes=0)
    if spec.input_size is not None:
        kwargs["pretrained_cfg_overlay"] = dict(input_size=(3, spec.input_size, spec.input_size))
    verify_checkpoint(config.dino_checkpoint, config.dino_checkpoint_sha256)
    file = config.dino_checkpoint
    if file is None and config.dino_pretrained:
        file = local_weights(resolve_weights_dir(config.weights_dir), "dino", config.dino_name, None)
    if file is not None:
        # timm's pretrained config (preprocessing) stays; only where the weights are read changes.
        kwargs["pretrained_cfg_overlay"] = dict(kwargs.get("pretrained_cfg_overlay", {}), file=file)
    pretrained = config.dino_pretrained or file is not None
    with _seeded_init(config.init_seed):
        try:
            model = timm.create_model(spec.timm_name, pretrained=pretrained, **kwargs)
        except (RuntimeError, OSError, pickle.UnpicklingError) as error:
            if unsafe := _unsafe_checkpoint(error, file):
                raise unsafe from error
            source = file or f"the hub ({spec.timm_name})"
            raise WeightsUnavailableError(
                f"could not load DINO {config.dino_name!r} from {source}: {error}. "
                f"Offline? Run `{download_command('dino', config.dino_name, None)} --to DIR` on a connected "
                f"machine and set {WEIGHTS_DIR_ENV}=DIR, or pass the local file as "
                "dino_checkpoint (env NOLA_DINO_CHECKPOINT), or use the 'tiny' model profile."
            ) from error
    model.to(device)
    _freeze(model)
    data_config = timm.data.resolve_model_data_config(model)
    preprocess = Preprocess(
        image_size=int(data_config["input_size"][-1]),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        interpolation=data_config.get("interpolation", "bicubic"),
        crop_pct=float(data_config.get("crop_pct", 1.0)),
    )
    return DinoModel(model=model, preprocess=preprocess, feature_dim=int(model.num_features), config=config)


def _clip_preprocess(model: nn.Module) -> Preprocess:
    """Read the preprocessing open_clip attached to the model for its pretrained tag."""
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", model.visual.image_size)
    size = size if isinstance(size, int) else size[-1]
    return Preprocess(
        image_size=int(size),
        mean=tuple(cfg.get("mean", CLIP_MEAN)),
        std=tuple(cfg.get("std", CLIP_STD)),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=1.0,
    )


def _freeze(model: nn.Module) -> None:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


@contextlib.contextmanager
def _seeded_init(seed: int):
    """Make random initialisation reproducible without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
