"""Named prompt-template sets (`templates.yaml`).

A dataset's own name (`imagenet`, `cifar100`, `eurosat`, ...) gives the paper recipe: NoLA's
reference per-dataset set, word for word (fazliimam/NoLA, utils/data_utils.py,
`ds_specific_templates`). CLIP's published sets stay available as `<dataset>_openai<N>`;
`imagenet_openai80`, CLIP's 80 ImageNet templates, is taken from open_clip rather than copied.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

TEMPLATE_FILE = Path(__file__).with_name("templates.yaml")
OPENAI_IMAGENET_SET = "imagenet_openai80"


@functools.cache
def _file_sets() -> dict[str, tuple[str, ...]]:
    with TEMPLATE_FILE.open(encoding="utf-8") as handle:
        return {name: tuple(templates) for name, templates in yaml.safe_load(handle).items()}


def template_set_names() -> list[str]:
    return sorted([*_file_sets(), OPENAI_IMAGENET_SET])


def get_templates(name: str) -> tuple[str, ...]:
    """Templates with one "{}" slot for the class name."""
    if name == OPENAI_IMAGENET_SET:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
    try:
        return _file_sets()[name]
    except KeyError:
        raise ValueError(f"unknown template set {name!r}; choose one of {template_set_names()}") from None


def fill_templates(templates: tuple[str, ...] | list[str], class_name: str) -> list[str]:
    return [template.replace("{}", class_name) for template in templates]
