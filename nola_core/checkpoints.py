"""Trained stages rebuilt from their saved tensors: the DL network and the prompt-tuned classifier.

The artifact store (nola_assets) and any script that kept the safetensors files read them back
through these, with the shapes and configs saved beside them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from nola_core.alignment import alignment_network
from nola_core.models import ClipModel, PromptTunedClassifier
from nola_core.tuning import TuningConfig, build_prompt_classifier, load_trainable


def load_alignment_network(path: str | Path, in_dim: int, num_classes: int, hidden_dim: int) -> nn.Sequential:
    """The DL network `train_alignment` returned, from its state dict saved as safetensors (CPU, eval)."""
    network = alignment_network(in_dim, num_classes, hidden_dim)
    network.load_state_dict(load_file(str(path)))
    return network.eval()


def load_tuned_classifier(clip: ClipModel, class_embeddings: torch.Tensor, tuning: TuningConfig,
                          trainable: str | Path, device: str | torch.device,
                          trained_on: dict | None = None) -> PromptTunedClassifier:
    """The prompt-tuned classifier whose trainable tensors `save_trainable` wrote to `trainable`,
    rebuilt on `clip` with the CDE head `class_embeddings` and the `tuning` it was trained with.
    `trained_on`, the identity of the CLIP it was tuned on, must be `clip`'s: tensors tuned on one
    CLIP mean nothing on another."""
    if trained_on is not None and clip.config.clip_identity() != trained_on:
        raise ValueError(f"{trainable} was tuned on CLIP {trained_on}, not on {clip.config.clip_identity()}")
    classifier = build_prompt_classifier(clip, class_embeddings, tuning)
    return load_trainable(classifier, Path(trainable)).to(device)
