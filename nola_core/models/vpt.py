"""Visual prompt tuning (VPT) around open_clip's VisionTransformer.

open_clip splits the vision forward into `_embeds` (patchify, class token, positions,
`ln_pre`), `transformer`, `_pool` and `proj`; prompt tokens go in right after `_embeds`, between
the class token and the patches, and are dropped again before pooling. Written against
open_clip 3.3 (pinned in pyproject); `tests/test_models.py` fails loudly if that split changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PromptedVisionEncoder(nn.Module):
    """Frozen open_clip ViT plus learnable prompt tokens: shallow (first layer) or deep (every layer)."""

    def __init__(self, visual: nn.Module, num_prompts: int = 16, deep: bool = False, init_seed: int = 0):
        super().__init__()
        if not getattr(visual.transformer, "batch_first", False):
            raise ValueError("VPT expects an open_clip VisionTransformer with batch_first=True")
        self.visual = visual
        self.num_prompts = num_prompts
        width = visual.conv1.out_channels
        patch = visual.conv1.kernel_size[0]
        depth = len(visual.transformer.resblocks) if deep else 1
        # VPT's initialisation: uniform, scaled by the patch embedding's fan-in plus width.
        bound = math.sqrt(6.0 / float(3 * patch * patch + width))
        generator = torch.Generator().manual_seed(init_seed)
        initial = (torch.rand(depth, num_prompts, width, generator=generator) * 2 - 1) * bound
        self.prompts = nn.Parameter(initial.to(visual.conv1.weight.dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.visual._embeds(images)
        batch = x.shape[0]
        for layer, block in enumerate(self.visual.transformer.resblocks):
            if layer < self.prompts.shape[0]:
                prompts = self.prompts[layer].to(x.dtype).expand(batch, -1, -1)
                patches = x[:, 1:] if layer == 0 else x[:, 1 + self.num_prompts :]
                x = torch.cat([x[:, :1], prompts, patches], dim=1)
            x = block(x)
        x = torch.cat([x[:, :1], x[:, 1 + self.num_prompts :]], dim=1)
        pooled, _ = self.visual._pool(x)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled


HEAD_INPUTS = ("projected", "normalized")


class PromptTunedClassifier(nn.Module):
    """Prompted CLIP vision encoder + linear head (no bias) initialised from text embeddings.

    The head reads the projected CLS feature as it comes out of the encoder (`head_input`
    "projected", NoLA's and LaFTer's reference: their adapter takes the unnormalised feature, so
    the feature norm acts as the logit scale) or L2-normalised ("normalized", a cosine-style
    head), and its output is multiplied by `logit_scale` (1 in both references).
    Trainable: the prompt tokens, every LayerNorm affine of the vision tower, the head.
    Everything else stays frozen, so a checkpoint is only `trainable_state_dict()`.
    """

    def __init__(
        self,
        visual: nn.Module,
        class_embeddings: torch.Tensor,
        num_prompts: int = 16,
        deep_prompts: bool = False,
        logit_scale: float = 1.0,
        head_input: str = "projected",
        init_seed: int = 0,
    ):
        super().__init__()
        if head_input not in HEAD_INPUTS:
            raise ValueError(f"head_input {head_input!r} is not one of {HEAD_INPUTS}")
        self.encoder = PromptedVisionEncoder(visual, num_prompts=num_prompts, deep=deep_prompts, init_seed=init_seed)
        num_classes, dim = class_embeddings.shape
        self.head = nn.Linear(dim, num_classes, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(F.normalize(class_embeddings.float(), dim=-1))
        self.logit_scale = logit_scale
        self.head_input = head_input
        for parameter in self.encoder.visual.parameters():
            parameter.requires_grad_(False)
        for module in self.encoder.visual.modules():
            if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                for parameter in module.parameters():
                    parameter.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.visual.eval()  # frozen tower: dropout / patch dropout stay off
        return self

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The projected CLS feature, unnormalised (cosine scorers normalise it themselves)."""
        return self.encoder(images)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        if self.head_input == "normalized":
            features = F.normalize(features, dim=-1)
        return self.logit_scale * self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.image_features(images))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = {name for name, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = expected - set(tensors), set(tensors) - expected
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match this model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        parameters = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                if parameters[name].shape != tensor.shape:
                    raise ValueError(f"checkpoint tensor {name}: shape {tuple(tensor.shape)}, "
                                     f"model expects {tuple(parameters[name].shape)}")
                parameters[name].copy_(tensor)


def interpolate_trainable(
    untuned: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """WiSE-FT on the trainable tensors: (1 − α)·untuned + α·tuned.

    Written so α = 0 gives the untuned tensors and α = 1 the tuned ones exactly (a lerp
    `a + α(b − a)` would not). Everything frozen is shared, so this interpolates the model.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"WiSE-FT mixing coefficient must be in [0, 1], got {alpha}")
    if set(untuned) != set(tuned):
        raise ValueError("untuned and tuned tensors have different names")
    return {name: (1.0 - alpha) * untuned[name] + alpha * tuned[name] for name in tuned}
