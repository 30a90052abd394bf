"""CDE zero-shot (NoLA, Sec. 3.1): the Class Description Embedding classifier on its own.

Recipe: per class, the LLM descriptions plus the dataset's templates, each embedded by the
CLIP text encoder and L2-normalised, averaged and renormalised (`nola_core.text.cde_classifier`);
classification by cosine similarity as for zero-shot CLIP. No training, no seed. With no
descriptions (no LLM) it equals zero-shot CLIP, which the run records by its inputs, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from nola_core.features import FeatureTable
from nola_core.methods.common import MethodRun
from nola_core.methods.zero_shot import classifier_run
from nola_core.models import ClipModel
from nola_core.predictions import PREDICTION_CHUNK_SIZE
from nola_core.stage_names import CDE_STAGE
from nola_core.text import cde_classifier, get_templates

METHOD = "cde"


@dataclass(frozen=True)
class CDEConfig:
    """`templates`: a template-set name; None takes the dataset's own."""

    templates: str | None = None
    logit_scale: float = 100.0


def cde_weights(
    clip: ClipModel,
    classes: Sequence[str],
    templates: str,
    descriptions: Mapping[str, Sequence[str]],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """[C, D] unit rows: NoLA's CDE classifier from descriptions + the named template set."""
    return cde_classifier(clip, classes, get_templates(templates), descriptions, device)


def run_cde(
    clip_table: FeatureTable,
    weights: torch.Tensor,
    unlabeled_ids: Sequence[str],
    config: CDEConfig = CDEConfig(),
    chunk_size: int = PREDICTION_CHUNK_SIZE,
) -> MethodRun:
    """The CDE classifier on precomputed CLIP features (the shared feature table), streamed."""
    return classifier_run(METHOD, CDE_STAGE, clip_table, weights, unlabeled_ids, config.logit_scale, chunk_size)
