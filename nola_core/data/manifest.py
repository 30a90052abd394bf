"""The manifest: which images a dataset split holds, identified by content.

An image's id is the SHA-256 of its bytes, so features, pseudo-labels and predictions stay
attached to the picture when files are renamed or moved, duplicates are found for free, and
the sorted ids give the image-set fingerprint used in cache keys and sensor run keys.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from nola_core.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    ImageLoadError,
    check_image,
    is_image_path,
)
from nola_core.data.spec import DatasetSpec, DatasetSpecError
from nola_core.runtime import available_cpus

logger = logging.getLogger("nola_core.data")

Split = Literal["unlabeled", "labeled"]
Progress = Callable[[int, int], None]
"""Called as progress(files_done, files_total) while a split is scanned."""


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: content id, posix path relative to the dataset root, class index
    (only under labeled/, and only ever used to report accuracy)."""

    image_id: str
    path: str
    label: int | None = None


@dataclass(frozen=True)
class SkippedFile:
    """An image file left out of the manifest, and why (unreadable, duplicate, symlink...)."""

    path: str
    reason: str


@dataclass(frozen=True)
class FileStat:
    """Size and modification time of a hashed file, so a rescan can reuse its id."""

    path: str
    size: int
    mtime_ns: int
    image_id: str


_FRAME_SCHEMA = {
    "path": pl.String,
    "image_id": pl.String,
    "label": pl.Int64,
    "size": pl.Int64,
    "mtime_ns": pl.Int64,
    "skipped": pl.String,
}


@dataclass(frozen=True)
class Manifest:
    """Records sorted by path, files left out, and the stats that make rescans cheap."""

    records: tuple[ImageRecord, ...]
    skipped: tuple[SkippedFile, ...] = ()
    file_stats: tuple[FileStat, ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(record.image_id for record in self.records)

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the sorted image ids: changes exactly when the set of pictures does
        (not on renames, touches or duplicates)."""
        return hashlib.sha256("\n".join(sorted(self.ids)).encode("ascii")).hexdigest()

    def records_frame(self) -> pl.DataFrame:
        """The usable images only (image_id, path, label), in manifest order."""
        return pl.DataFrame(
            {
                "image_id": [r.image_id for r in self.records],
                "path": [r.path for r in self.records],
                "label": [r.label for r in self.records],
            },
            schema={"image_id": pl.String, "path": pl.String, "label": pl.Int64},
        )

    def to_polars(self) -> pl.DataFrame:
        """Everything, losslessly, one row per scanned file, for storing as parquet.

        Records are the rows whose `skipped` is null; duplicates keep their id and stats;
        unreadable files have a null id. Read it back with `Manifest.from_polars`.
        """
        stats = {stat.path: stat for stat in self.file_stats}
        labels = {r.path: r.label for r in self.records}
        rows = [(r.path, r.image_id, None) for r in self.records]
        rows += [
            (s.path, stats[s.path].image_id if s.path in stats else None, s.reason)
            for s in self.skipped
        ]
        rows.sort(key=lambda row: row[0])
        return pl.DataFrame(
            {
                "path": [path for path, _, _ in rows],
                "image_id": [image_id for _, image_id, _ in rows],
                "label": [labels.get(path) for path, _, _ in rows],
                "size": [stats[path].size if path in stats else None for path, _, _ in rows],
                "mtime_ns": [
                    stats[path].mtime_ns if path in stats else None for path, _, _ in rows
                ],
                "skipped": [reason for _, _, reason in rows],
            },
            schema=_FRAME_SCHEMA,
        )

    @classmethod
    def from_polars(cls, frame: pl.DataFrame) -> Manifest:
        """Inverse of `to_polars`."""
        missing = set(_FRAME_SCHEMA) - set(frame.columns)
        if missing:
            raise ValueError(f"manifest table lacks columns {sorted(missing)}")
        records, skipped, stats = [], [], []
        for row in frame.sort("path").iter_rows(named=True):
            if row["skipped"] is None:
                records.append(ImageRecord(row["image_id"], row["path"], row["label"]))
            else:
                skipped.append(SkippedFile(row["path"], row["skipped"]))
            if row["image_id"] is not None and row["size"] is not None:
                stats.append(FileStat(row["path"], row["size"], row["mtime_ns"], row["image_id"]))
        return cls(tuple(records), tuple(skipped), tuple(stats))


def build_manifest(
    spec: DatasetSpec,
    split: Split = "unlabeled",
    previous: Manifest | None = None,
    progress: Progress | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
) -> Manifest:
    """Scan a split folder into a manifest.

    Walks any nesting in sorted order. Files without an image suffix and hidden files
    (".DS_Store", "._x.jpg") are ignored silently; image files that do not decode, symlinks
    leading outside the dataset root (or outside the split folder's own real location) and
    content duplicates (the first path in sorted order wins) are listed in `skipped`.

    `previous` (an earlier manifest of the same split) lets files whose (path, size,
    mtime_ns) are unchanged keep their id without being read again; unreadable files are
    always re-checked. Files are read, hashed and decode-checked by `workers` threads (default
    `scan_workers()`; reading, hashing and decoding release the GIL), and taken in sorted order,
    so the result does not depend on the thread count.

    For "labeled", each image's label is the class named by its first folder under
    labeled/; a folder naming no class raises `DatasetSpecError`. A missing labeled/ folder
    means the dataset has no labels: the result is an empty manifest. Any split folder that
    exists but holds no readable image raises `DatasetSpecError`.
    """
    if split not in ("unlabeled", "labeled"):
        raise ValueError(f"split must be 'unlabeled' or 'labeled', got {split!r}")
    root = spec.root.resolve()
    split_dir = root / split
    if not split_dir.is_dir():
        if split == "labeled":
            return Manifest(records=())
        raise DatasetSpecError(f"{split_dir}: folder is missing")
    class_of_folder = _class_folders(spec, split_dir) if split == "labeled" else {}

    files, skipped = _walk(split_dir, allowed=(root, split_dir.resolve()), root=root)
    reuse = {stat.path: stat for stat in previous.file_stats} if previous else {}
    first_of: dict[str, ImageRecord] = {}
    records: list[ImageRecord] = []
    stats: list[FileStat] = []

    def examine(path: Path) -> tuple[str, int | None, FileStat | SkippedFile]:
        rel = _relative(path, root)
        label = _label(path, split_dir, class_of_folder)
        if split == "labeled" and label is None:
            return rel, label, SkippedFile(rel, "not inside a labeled/<class name>/ folder")
        return rel, label, _identify(path, rel, reuse.get(rel), max_pixels)

    workers = scan_workers() if workers is None else max(1, workers)
    with concurrent.futures.ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for done, (rel, label, outcome) in enumerate(_in_order(pool, examine, files, 4 * workers), start=1):
            if progress is not None:
                progress(done, len(files))
            if isinstance(outcome, SkippedFile):
                skipped.append(outcome)
                continue
            stats.append(outcome)
            first = first_of.setdefault(outcome.image_id, ImageRecord(outcome.image_id, rel, label))
            if first.path == rel:
                records.append(first)
            else:
                conflict = "" if first.label == label else " with a different label"
                skipped.append(SkippedFile(rel, f"duplicate of {first.path}{conflict}"))

    skipped.sort(key=lambda s: s.path)
    for item in skipped:
        level = logging.INFO if item.reason.startswith("duplicate of") else logging.WARNING
        logger.log(level, "skipped %s: %s", item.path, item.reason)
    if not records:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise DatasetSpecError(
            f"{split_dir}: no readable image in {split_dir} "
            f"({len(skipped)} image files skipped; image suffixes read: {suffixes})"
        )
    logger.info("%s: %d images, %d skipped", split_dir, len(records), len(skipped))
    return Manifest(tuple(records), tuple(skipped), tuple(stats))


def scan_workers() -> int:
    """Threads that read and check files: more than the CPUs, as `ThreadPoolExecutor`'s own
    default, since part of each file's time is spent waiting for the disk or network share."""
    return min(32, available_cpus() + 4)


def _in_order(pool, function, items, window: int):
    """`function(item)` for each item, yielded in order, with at most `window` running ahead
    (a million files must not become a million pending futures); serial without a pool."""
    if pool is None:
        yield from map(function, items)
        return
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def known_labels(unlabeled: Manifest, labeled: Manifest) -> dict[str, int]:
    """image_id -> class index for unlabeled images whose content also sits under labeled/.

    For REPORTING ONLY (pseudo-label precision, accuracy): nothing that trains or selects a
    model may read these labels, or the method stops being label-free.
    """
    wanted = set(unlabeled.ids)
    return {
        r.image_id: r.label
        for r in labeled.records
        if r.image_id in wanted and r.label is not None
    }


def _identify(
    path: Path, rel: str, known: FileStat | None, max_pixels: int
) -> FileStat | SkippedFile:
    """The file's id and stats, reusing `known` when size and mtime are unchanged."""
    try:
        info = path.stat()
        if known and (known.size, known.mtime_ns) == (info.st_size, info.st_mtime_ns):
            return known
        return FileStat(rel, info.st_size, info.st_mtime_ns, _inspect_file(path, max_pixels))
    except ImageLoadError as error:
        return SkippedFile(rel, error.reason)
    except OSError as error:
        return SkippedFile(rel, f"cannot read file ({error.strerror or error})")


def _inspect_file(path: Path, max_pixels: int) -> str:
    """Read a file once: check that it decodes, return the SHA-256 of its bytes."""
    data = path.read_bytes()
    check_image(path, max_pixels, data=data)
    return hashlib.sha256(data).hexdigest()


def _class_folders(spec: DatasetSpec, labeled_dir: Path) -> dict[str, int]:
    """Map each class folder under labeled/ to its class index; unknown folders are errors."""
    index = {_nfc(name): i for i, name in enumerate(spec.classes)}
    mapping = {}
    for entry in sorted(os.scandir(labeled_dir), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if _nfc(entry.name) not in index:
            raise DatasetSpecError(
                f"{Path(entry.path)}: folder names no class of dataset '{spec.name}'; "
                f"field 'classes' in {spec.root / 'dataset.yaml'} lists {list(spec.classes)}"
            )
        mapping[entry.name] = index[_nfc(entry.name)]
    return mapping


def _label(path: Path, split_dir: Path, class_of_folder: dict[str, int]) -> int | None:
    parts = path.relative_to(split_dir).parts
    return class_of_folder.get(parts[0]) if len(parts) > 1 else None


def _walk(
    split_dir: Path, allowed: tuple[Path, ...], root: Path
) -> tuple[list[Path], list[SkippedFile]]:
    """Image files under split_dir sorted by relative path, plus symlinks refused."""
    files: list[Path] = []
    skipped: list[SkippedFile] = []
    visited: set[Path] = set()

    def visit(folder: Path) -> None:
        real = folder.resolve()
        if real in visited:  # a symlink loop, or a folder linked in twice
            return
        visited.add(real)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                try:
                    target = path.resolve()
                except (OSError, RuntimeError) as error:
                    reason = f"unresolvable symlink: {error}"
                    skipped.append(SkippedFile(_relative(path, root), reason))
                    continue
                if not any(target.is_relative_to(base) for base in allowed):
                    if entry.is_dir() or is_image_path(path):
                        skipped.append(SkippedFile(
                            _relative(path, root),
                            f"symlink to {target}, outside the dataset root; not followed",
                        ))
                    continue
            if entry.is_dir():
                visit(path)
            elif is_image_path(path):
                if entry.is_file():
                    files.append(path)
                else:
                    reason = "broken symlink or not a regular file"
                    skipped.append(SkippedFile(_relative(path, root), reason))

    visit(split_dir)
    files.sort(key=lambda p: _relative(p, root))
    return files, skipped


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _nfc(name: str) -> str:
    """macOS stores file names decomposed (NFD); class names are usually typed composed."""
    return unicodedata.normalize("NFC", name)
