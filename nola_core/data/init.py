"""Turn a folder of images and a list of class names into a dataset folder (`nola init`).

The images stay where the user has them: each is either linked (a relative symlink, the
default) or moved under `unlabeled/`, never copied. If the folder already sorts its images into
subfolders named after classes, those can also become the evaluation split: `labeled/<class>/`
then holds a link to each of their images (where it now lives), so accuracy is reported on the
very images adapted on (the transductive split). `dataset.yaml` is written last and read back
with `load_dataset_spec`, so a folder `init_dataset` returns is one every command accepts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import yaml

from nola_core.data.images import is_image_path
from nola_core.data.spec import (
    MIN_CLASSES,
    SPEC_FILENAME,
    DatasetSpec,
    DatasetSpecError,
    check_dataset_name,
    load_dataset_spec,
)
from nola_core.text.limits import colliding_class_names, normalise_class_name

Placement = Literal["link", "move"]
PLACEMENTS: tuple[Placement, ...] = ("link", "move")
SPLIT_FOLDERS = ("unlabeled", "labeled")


@dataclass(frozen=True)
class InitResult:
    spec: DatasetSpec
    placed: int  # images linked or moved under unlabeled/
    placement: Placement
    labeled: dict[str, int]  # class -> images linked under labeled/<class>/ (empty: no evaluation split)
    warnings: tuple[str, ...]  # similar class names (plural forms): kept, but worth a look


def parse_classes(text: str) -> list[str]:
    """Class names from "a, b, c" or from a file's text (one per line, or comma-separated; blank
    lines and lines starting with '#' ignored). An empty name between commas is an error, so a
    stray comma never silently drops or invents a class."""
    names: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for position, item in enumerate(line.split(","), start=1):
            name = item.strip()
            if not name:
                raise DatasetSpecError(f"class list line {number}, item {position}: empty class name in {line.strip()!r}")
            names.append(name)
    return names


def check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    """Refuse what cannot work (fewer than two classes, an empty name, a '/' in a name, names
    equal once case, spacing, '-' and '_' are folded away); return warnings for names that differ
    only by a plural 's' ("bag" / "bags"): two real classes may, so that is the user's call."""
    if len(classes) < MIN_CLASSES:
        raise DatasetSpecError(f"{len(classes)} class(es) given; classification needs at least {MIN_CLASSES}")
    for name in classes:
        if not name.strip():
            raise DatasetSpecError("empty class name")
        if any(c in name for c in "/\\\0"):
            raise DatasetSpecError(f"class name {name!r} contains '/', '\\' or NUL; it must be usable as a folder name")
    warnings = []
    for group in colliding_class_names(classes):
        if len({normalise_class_name(name) for name in group}) < len(group):
            raise DatasetSpecError(f"class names {group} collide: they are the same name once case, spacing, "
                                   "'-' and '_' are ignored; CLIP cannot tell them apart")
        warnings.append(f"class names {group} differ only by a plural form; keep them only if they are "
                        "really different classes")
    return tuple(warnings)


def find_class_folders(folder: str | Path, classes: Sequence[str]) -> dict[str, str]:
    """Immediate subfolders of `folder` that hold images and name a class (compared with
    case, spacing, '-' and '_' folded away): subfolder name -> class name."""
    by_key = {normalise_class_name(name): name for name in classes}
    found = {}
    for entry in sorted(Path(folder).iterdir()):
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in SPLIT_FOLDERS:
            name = by_key.get(normalise_class_name(entry.name))
            if name is not None and any(is_image_path(p) for p in entry.rglob("*")):
                found[entry.name] = name
    return found


def init_dataset(
    folder: str | Path,
    classes: Sequence[str],
    *,
    placement: Placement = "link",
    name: str | None = None,
    evaluate_class_folders: bool = False,
    domain: str | None = None,
) -> InitResult:
    """Make `folder` a dataset: its images (any nesting, outside unlabeled/ and labeled/) linked
    or moved to `unlabeled/<same relative path>`; with `evaluate_class_folders`, its class
    subfolders linked as `labeled/<class>/`; then `dataset.yaml` (name: the folder's name unless
    given). Refuses a folder that already has a dataset.yaml, or holds no image."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    root = Path(folder).resolve()
    if not root.is_dir():
        raise DatasetSpecError(f"{root}: not a folder")
    if (root / SPEC_FILENAME).exists():
        raise DatasetSpecError(f"{root / SPEC_FILENAME} already exists: this folder is already a dataset")
    classes = [name.strip() for name in classes]
    warnings = check_classes(classes)
    name = check_dataset_name(name or root.name, "dataset name (the folder's name unless --name is given)")
    class_folders = find_class_folders(root, classes) if evaluate_class_folders else {}
    images = _loose_images(root)
    if not images and not any(p.is_file() for p in (root / "unlabeled").rglob("*") if is_image_path(p)):
        raise DatasetSpecError(f"{root}: no image file found (suffixes: .jpg .jpeg .png .webp .bmp .tif .tiff .gif)")

    placed_at = {}
    for source in images:
        target = root / "unlabeled" / source.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        if placement == "move":
            shutil.move(source, target)
        else:
            target.symlink_to(os.path.relpath(source, target.parent))
        placed_at[source] = target
    if placement == "move":  # folders the move emptied go too, deepest first
        for emptied in sorted({s.parent for s in images} - {root}, key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                emptied.rmdir()
    labeled: dict[str, int] = {}
    if evaluate_class_folders:
        for source, target in placed_at.items():
            first, *rest = source.relative_to(root).parts
            class_name = class_folders.get(first) if rest else None
            if class_name is None:
                continue
            # Link to the file itself: the original after a link, its new place after a move.
            real = source if placement == "link" else target
            link = root / "labeled" / class_name / Path(*rest)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(real, link.parent))
            labeled[class_name] = labeled.get(class_name, 0) + 1

    fields = {"name": name, "classes": list(classes), "templates": DatasetSpec.templates}
    if domain:
        fields["domain"] = domain
    header = f"# Written by `nola init` ({placement}: images under unlabeled/"
    header += ", class subfolders as labeled/<class>/ for evaluation only)\n" if labeled else ")\n"
    (root / SPEC_FILENAME).write_text(header + yaml.safe_dump(fields, sort_keys=False, allow_unicode=True),
                                      encoding="utf-8")
    return InitResult(spec=load_dataset_spec(root), placed=len(placed_at), placement=placement,
                      labeled=labeled, warnings=warnings)


def _loose_images(root: Path) -> list[Path]:
    """Image files under root, outside unlabeled/ and labeled/ and hidden entries, sorted."""
    found = []
    for current, folders, files in os.walk(root):
        here = Path(current)
        folders[:] = sorted(f for f in folders if not f.startswith(".")
                            and not (here == root and f in SPLIT_FOLDERS))
        found += [here / f for f in sorted(files) if not f.startswith(".") and is_image_path(f)]
    return found
