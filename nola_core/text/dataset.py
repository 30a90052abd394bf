"""A dataset's texts: its class descriptions, its two text classifiers, and checks on both.

Every method that reads descriptions or the zero-shot / CDE classifiers (NoLA, the zero-shot and
CDE baselines, LaFTer, a comparison, the Dagster text assets) takes them from here.
"""

from __future__ import annotations

import logging
import warnings
from typing import Mapping, Sequence

import torch

from nola_core.data.spec import DatasetSpec
from nola_core.llm import load_descriptions
from nola_core.models import ClipModel
from nola_core.text.classifiers import cde_classifier, zero_shot_classifier
from nola_core.text.limits import clip_token_counter, colliding_class_names, truncated_texts
from nola_core.text.templates import get_templates

logger = logging.getLogger(__name__)


def resolve_descriptions(spec: DatasetSpec, descriptions: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """Given descriptions, else the dataset's descriptions file, else none (templates only, with a warning)."""
    if descriptions is None and spec.descriptions is not None:
        descriptions = load_descriptions(spec.descriptions)
    if descriptions is None:
        warnings.warn(
            f"dataset {spec.name!r} has no class descriptions: the CDE classifier falls back to "
            "templates only (run `nola describe` or set `descriptions:` in dataset.yaml)",
            stacklevel=2,
        )
        return {name: [] for name in spec.classes}
    unknown = sorted(set(descriptions) - set(spec.classes))
    if unknown:
        logger.warning("descriptions for classes not in %s ignored: %s", spec.name, unknown[:10])
    return {name: list(descriptions.get(name, [])) for name in spec.classes}


def text_classifiers(
    clip: ClipModel, spec: DatasetSpec, descriptions: Mapping[str, Sequence[str]], device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero-shot template classifier, CDE classifier), both [C, D] unit rows."""
    templates = get_templates(spec.templates)
    zero_shot = zero_shot_classifier(clip, spec.classes, templates, device)
    return zero_shot, cde_classifier(clip, spec.classes, templates, descriptions, device)


def text_checks(clip: ClipModel, spec: DatasetSpec, descriptions: Mapping[str, Sequence[str]]) -> dict:
    """Class names that collide after normalisation, and descriptions CLIP will truncate; logged."""
    collisions = colliding_class_names(spec.classes)
    for group in collisions:
        logger.warning("%s: class names %s are the same after case/space/plural folding", spec.name, group)
    context = getattr(clip.tokenizer, "context_length", 77)
    truncated = truncated_texts(clip_token_counter(clip.tokenizer), descriptions, context)
    for name, count in truncated.items():
        logger.warning("%s: %d description(s) of class %r exceed CLIP's %d-token context and are truncated",
                       spec.name, count, name, context)
    return {"collisions": collisions, "truncated": truncated, "context_length": context}
