"""Text classifiers from the CLIP text encoder: zero-shot (templates) and CDE (descriptions).

Both are one function over per-class text lists. Classes may have different numbers of texts
(LLM descriptions are uneven), so texts are embedded as one flat batch and averaged per class
with `index_add_` instead of assuming a rectangular [classes, texts] layout.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from nola_core.text.templates import fill_templates


def embed_texts(
    encode_text,
    texts_per_class: Sequence[Sequence[str]],
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every text embedded on its own and L2-normalised, with its class index: ([T, D], [T]).

    LaFTer trains on the individual texts; `class_text_embeddings` averages them per class.
    """
    flat: list[str] = []
    owner: list[int] = []
    for class_index, texts in enumerate(texts_per_class):
        if not texts:
            raise ValueError(f"class #{class_index} has no text to embed")
        flat.extend(texts)
        owner.extend([class_index] * len(texts))
    chunks = [F.normalize(encode_text(flat[i : i + batch_size]).float(), dim=-1).cpu()
              for i in range(0, len(flat), batch_size)]
    return torch.cat(chunks), torch.tensor(owner, dtype=torch.long)


def class_text_embeddings(
    encode_text,
    texts_per_class: Sequence[Sequence[str]],
    batch_size: int = 256,
) -> torch.Tensor:
    """Mean of the L2-normalised text embeddings of each class, renormalised: [C, D] float32."""
    embeddings, owner = embed_texts(encode_text, texts_per_class, batch_size)
    sums = torch.zeros(len(texts_per_class), embeddings.shape[1])
    sums.index_add_(0, owner, embeddings)
    return F.normalize(sums, dim=-1)


def zero_shot_texts(classes: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    return [fill_templates(list(templates), name) for name in classes]


def cde_texts(
    classes: Sequence[str],
    templates: Sequence[str],
    descriptions: Mapping[str, Sequence[str]],
) -> list[list[str]]:
    """NoLA's Class Description Embedding inputs: a class's LLM descriptions plus its templates.

    Every class must be a key; an empty list deliberately means "templates only" for it.
    """
    missing = [name for name in classes if name not in descriptions]
    if missing:
        raise ValueError(f"descriptions missing for classes: {missing}")
    return [list(descriptions[name]) + fill_templates(list(templates), name) for name in classes]


def zero_shot_classifier(clip, classes: Sequence[str], templates: Sequence[str], device="cpu") -> torch.Tensor:
    return class_text_embeddings(lambda texts: clip.encode_text(texts, device), zero_shot_texts(classes, templates))


def cde_classifier(
    clip,
    classes: Sequence[str],
    templates: Sequence[str],
    descriptions: Mapping[str, Sequence[str]],
    device="cpu",
) -> torch.Tensor:
    texts = cde_texts(classes, templates, descriptions)
    return class_text_embeddings(lambda batch: clip.encode_text(batch, device), texts)
