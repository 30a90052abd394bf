"""Prompt templates and text classifiers (zero-shot, CDE)."""

from nola_core.text.classifiers import (
    cde_classifier,
    cde_texts,
    class_text_embeddings,
    embed_texts,
    zero_shot_classifier,
    zero_shot_texts,
)
from nola_core.text.templates import fill_templates, get_templates, template_set_names

__all__ = [
    "cde_classifier",
    "cde_texts",
    "class_text_embeddings",
    "embed_texts",
    "fill_templates",
    "get_templates",
    "template_set_names",
    "zero_shot_classifier",
    "zero_shot_texts",
]
from nola_core.text.limits import clip_token_counter, colliding_class_names, normalise_class_name, truncated_texts

__all__ += ["clip_token_counter", "colliding_class_names", "normalise_class_name", "truncated_texts"]
