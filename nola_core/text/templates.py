"""Named prompt-template sets: CLIP's published per-dataset sets plus a generic one."""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

TEMPLATE_FILE = Path(__file__).with_name("templates.yaml")
# These names use CLIP's 80 ImageNet templates, taken from open_clip rather than copied.
IMAGENET_SETS = ("imagenet", "imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2")


@functools.cache
def _file_sets() -> dict[str, tuple[str, ...]]:
    with TEMPLATE_FILE.open(encoding="utf-8") as handle:
        return {name: tuple(templates) for name, templates in yaml.safe_load(handle).items()}


def template_set_names() -> list[str]:
    return sorted(set(_file_sets()) | set(IMAGENET_SETS))


def get_templates(name: str) -> tuple[str, ...]:
    """Templates with one "{}" slot for the class name."""
    if name in IMAGENET_SETS:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
    try:
        return _file_sets()[name]
    except KeyError:
        raise ValueError(f"unknown template set {name!r}; choose one of {template_set_names()}") from None


def fill_templates(templates: tuple[str, ...] | list[str], class_name: str) -> list[str]:
    return [template.replace("{}", class_name) for template in templates]
