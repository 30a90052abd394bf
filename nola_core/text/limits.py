"""Checks on the text side that research code skips: truncated descriptions, colliding class names."""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from typing import Callable, Mapping, Sequence


def truncated_texts(
    count_tokens: Callable[[str], int],
    texts_per_class: Mapping[str, Sequence[str]],
    context_length: int = 77,
) -> dict[str, int]:
    """Per class, how many texts are longer than the text encoder's context (CLIP: 77 tokens,
    start and end tokens included) and so lose their end silently. Classes with none are left out."""
    report = {}
    for name, texts in texts_per_class.items():
        over = sum(1 for text in texts if count_tokens(text) + 2 > context_length)
        if over:
            report[name] = over
    return report


def clip_token_counter(tokenizer) -> Callable[[str], int]:
    """Token count (without start/end) with open_clip's BPE tokenizer."""
    return lambda text: len(tokenizer.encode(text))


def normalise_class_name(name: str) -> str:
    """Case, Unicode form, whitespace, hyphens and underscores folded away ("T_Shirt" → "t shirt")."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    return re.sub(r"[\s_\-]+", " ", folded).strip()


def _plurals(name: str) -> set[str]:
    forms = {name + "s", name + "es"}
    if name.endswith("y"):
        forms.add(name[:-1] + "ies")
    return forms


def colliding_class_names(classes: Sequence[str]) -> list[list[str]]:
    """Groups of class names that differ only by case, spacing or a plain English plural
    ("Bag" / "bags", "box" / "boxes", "butterfly" / "butterflies"). A report, not a verdict:
    two real classes may differ by an "s", so callers warn rather than refuse."""
    by_key: dict[str, list[str]] = defaultdict(list)
    for name in classes:
        by_key[normalise_class_name(name)].append(name)
    parent = {key: key for key in by_key}

    def root(key: str) -> str:
        while parent[key] != key:
            key = parent[key]
        return key

    for key in by_key:
        for plural in _plurals(key) & by_key.keys():
            parent[root(plural)] = root(key)
    groups: dict[str, list[str]] = defaultdict(list)
    for key, names in by_key.items():
        groups[root(key)].extend(names)
    return [names for names in groups.values() if len(names) > 1]
