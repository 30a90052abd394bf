"""The dataset spec: a folder with `dataset.yaml`, `unlabeled/` images and optional `labeled/`.

A spec is checked completely when it is loaded, so a typo in `dataset.yaml` fails in the first
second with the file and field named, not an hour later inside a training run.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

import yaml

SPEC_FILENAME = "dataset.yaml"
MIN_CLASSES = 2
"""Classification needs at least two classes to choose between."""


class DatasetSpecError(ValueError):
    """A dataset folder or `dataset.yaml` that cannot be used; names the file and the field."""


@dataclass(frozen=True)
class DatasetSpec:
    """What the user wrote in `dataset.yaml`, validated, with paths resolved.

    `templates` names a prompt-template set; `domain` (e.g. "satellite photo") is put into
    the questions asked to the LLM; `descriptions` is an optional file of ready-made class
    descriptions inside the dataset folder.
    """

    root: Path
    name: str
    classes: tuple[str, ...]
    templates: str = "generic"
    domain: str | None = None
    descriptions: Path | None = None

    @property
    def unlabeled_dir(self) -> Path:
        return self.root / "unlabeled"

    @property
    def labeled_dir(self) -> Path:
        return self.root / "labeled"


def load_dataset_spec(root: str | Path) -> DatasetSpec:
    """Read and validate `root/dataset.yaml`. Unknown extra keys are ignored."""
    root = Path(root).resolve()
    path = root / SPEC_FILENAME
    if not path.is_file():
        raise DatasetSpecError(f"{path}: file not found (a dataset folder needs {SPEC_FILENAME})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DatasetSpecError(f"{path}: malformed YAML: {error}") from error
    if not isinstance(raw, dict):
        raise DatasetSpecError(
            f"{path}: top level must be a mapping with fields 'name' and 'classes', "
            f"got {type(raw).__name__}"
        )

    spec = DatasetSpec(
        root=root,
        name=check_dataset_name(_required_string(raw, "name", path), f"{path}: field 'name'"),
        classes=_classes(raw, path),
        templates=_optional_string(raw, "templates", path) or DatasetSpec.templates,
        domain=_optional_string(raw, "domain", path),
        descriptions=_descriptions_path(raw, root, path),
    )
    if not spec.unlabeled_dir.is_dir():
        raise DatasetSpecError(
            f"{path}: folder {spec.unlabeled_dir} is missing; the images to classify go there"
        )
    return spec


def check_dataset_name(name: str, what: str = "dataset name") -> str:
    """`name` if it is a plain folder name (a dataset's folder directly under the data root and
    its partition key); anything that could lead elsewhere ('..', '/', '\\', NUL, a leading
    '.') raises DatasetSpecError naming it."""
    if (not isinstance(name, str) or not name.strip() or name in (".", "..") or name.startswith(".")
            or any(c in name for c in "/\\\0")):
        raise DatasetSpecError(f"{what} {name!r} is not a plain folder name: a dataset is a folder directly under "
                               "the data root (no '/', '\\', '..', NUL or leading '.')")
    return name


def _required_string(raw: dict, field: str, path: Path) -> str:
    if field not in raw or raw[field] is None:
        raise DatasetSpecError(f"{path}: field '{field}' is missing")
    value = raw[field]
    if not isinstance(value, str):
        raise DatasetSpecError(
            f"{path}: field '{field}' must be a string, got {type(value).__name__} {value!r}"
        )
    if not value.strip():
        raise DatasetSpecError(f"{path}: field '{field}' is blank")
    return value.strip()


def _optional_string(raw: dict, field: str, path: Path) -> str | None:
    if raw.get(field) is None:
        return None
    return _required_string(raw, field, path)


def _classes(raw: dict, path: Path) -> tuple[str, ...]:
    if raw.get("classes") is None:
        raise DatasetSpecError(f"{path}: field 'classes' is missing")
    classes = raw["classes"]
    if not isinstance(classes, list):
        raise DatasetSpecError(
            f"{path}: field 'classes' must be a list of class names, got {type(classes).__name__}"
        )
    if not classes:
        raise DatasetSpecError(f"{path}: field 'classes' is empty")
    if len(classes) < MIN_CLASSES:
        raise DatasetSpecError(
            f"{path}: field 'classes' has {len(classes)} class; classification needs at least "
            f"{MIN_CLASSES}"
        )
    names: list[str] = []
    seen: dict[str, str] = {}
    for position, value in enumerate(classes, start=1):
        if not isinstance(value, str):
            raise DatasetSpecError(
                f"{path}: field 'classes' item {position} is {type(value).__name__} {value!r}, "
                "not a string (quote it in the YAML)"
            )
        name = value.strip()
        if not name:
            raise DatasetSpecError(f"{path}: field 'classes' item {position} is blank")
        # Case- and Unicode-normalisation-insensitive: labeled/<class>/ folders of two such
        # names would collide on macOS and Windows file systems.
        key = unicodedata.normalize("NFC", name).casefold()
        if key in seen:
            raise DatasetSpecError(
                f"{path}: field 'classes' has duplicate class name {name!r} "
                f"(item {position}, same as {seen[key]!r})"
            )
        seen[key] = name
        names.append(name)
    return tuple(names)


def _descriptions_path(raw: dict, root: Path, path: Path) -> Path | None:
    value = _optional_string(raw, "descriptions", path)
    if value is None:
        return None
    resolved = (root / value).resolve()
    if not resolved.is_relative_to(root):
        raise DatasetSpecError(
            f"{path}: field 'descriptions' points to {resolved}, outside the dataset folder {root}"
        )
    if not resolved.is_file():
        raise DatasetSpecError(f"{path}: field 'descriptions' file {resolved} does not exist")
    return resolved
