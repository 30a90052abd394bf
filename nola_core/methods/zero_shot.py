"""Zero-shot CLIP (Radford et al. 2021): one text embedding per class from prompt templates.

Recipe: the mean of the L2-normalised CLIP text embeddings of the dataset's templates filled
with each class name, renormalised; an image goes to the class of highest cosine similarity
(softmax at CLIP's logit scale 100 for probabilities). No training, no seed. The classifier is
built by `nola_core.text.zero_shot_classifier`, the same one NoLA reports as its first stage,
and scored the same way: streamed over the (possibly memory-mapped) feature table, keeping only
each image's top class (`predictions.cosine_top_classes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from nola_core.features import FeatureTable
from nola_core.methods.common import MethodRun, PseudoLabels, StageOutput
from nola_core.models import ClipModel
from nola_core.predictions import PREDICTION_CHUNK_SIZE, cosine_top_classes
from nola_core.stage_names import ZERO_SHOT_STAGE
from nola_core.text import get_templates, zero_shot_classifier

METHOD = "zero-shot"


@dataclass(frozen=True)
class ZeroShotConfig:
    """`templates`: a template-set name; None takes the dataset's own (`dataset.yaml: templates`)."""

    templates: str | None = None
    logit_scale: float = 100.0


def zero_shot_weights(
    clip: ClipModel, classes: Sequence[str], templates: str, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """[C, D] unit rows: the zero-shot classifier of the named template set."""
    return zero_shot_classifier(clip, classes, get_templates(templates), device)


def classifier_run(
    method: str,
    stage: str,
    clip_table: FeatureTable,
    weights: torch.Tensor,
    unlabeled_ids: Sequence[str],
    logit_scale: float = 100.0,
    chunk_size: int = PREDICTION_CHUNK_SIZE,
) -> MethodRun:
    """A training-free text classifier as a one-stage method: the top class of every image in
    `clip_table` (scored `chunk_size` rows at a time), which is also the pseudo-label of the
    unlabeled images."""
    top = cosine_top_classes(clip_table, clip_table.ids, weights, logit_scale, chunk_size=chunk_size)
    output = StageOutput(
        stage=stage,
        ids=clip_table.ids,
        probabilities=top,
        pseudo_labels=PseudoLabels.argmax(clip_table.ids, top, unlabeled_ids),
        final=True,
    )
    return MethodRun(method=method, seed=None, stages=[output], tensors={"classifier": weights.float().cpu()})


def run_zero_shot(
    clip_table: FeatureTable,
    weights: torch.Tensor,
    unlabeled_ids: Sequence[str],
    config: ZeroShotConfig = ZeroShotConfig(),
    chunk_size: int = PREDICTION_CHUNK_SIZE,
) -> MethodRun:
    """Zero-shot CLIP on precomputed CLIP features (the shared feature table)."""
    return classifier_run(METHOD, ZERO_SHOT_STAGE, clip_table, weights, unlabeled_ids, config.logit_scale, chunk_size)
