"""Dataset folders as the sensor and the manifest asset see them: cheap state, image-set version."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nola_core.data import Manifest

from nola_assets.artifacts import ArtifactRef, ArtifactStore

UNLABELED_TABLE = "unlabeled.parquet"
LABELED_TABLE = "labeled.parquet"


FileState = tuple[str, int, int]
"""(path relative to the dataset folder, size, mtime_ns); size and mtime -1 for a file that
vanished or a link that leads nowhere."""


def stat_walk(dataset_dir: Path) -> list[FileState]:
    """dataset.yaml and every file under unlabeled/, with size and mtime: one stat per file, no reads.

    What the sensor compares between ticks to tell whether a folder changed. Linked folders are
    entered once (a symlink loop ends the walk there) and only when they stay inside the dataset
    folder or unlabeled/'s own real location, as in the manifest; a dangling link or a file deleted
    while walking counts as missing instead of failing the tick.
    """
    spec_file = dataset_dir / "dataset.yaml"
    entries = [spec_file] if spec_file.is_file() else []
    unlabeled = dataset_dir / "unlabeled"
    allowed = (dataset_dir.resolve(), unlabeled.resolve())
    visited: set[Path] = set()
    for folder, subfolders, files in os.walk(unlabeled, followlinks=True):
        real = Path(folder).resolve()
        if real in visited or not any(real.is_relative_to(a) for a in allowed):
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = sorted(s for s in subfolders if not s.startswith("."))
        entries += [Path(folder) / name for name in sorted(files) if not name.startswith(".")]
    states = []
    for path in entries:
        try:
            info = path.stat()
            size, mtime = info.st_size, info.st_mtime_ns
        except OSError:  # dangling link, deleted meanwhile, unreadable
            size, mtime = -1, -1
        states.append((path.relative_to(dataset_dir).as_posix(), size, mtime))
    return states


def folder_state(files: list[FileState]) -> str:
    """SHA-256 over a `stat_walk`: changes when any file is added, removed, resized or touched."""
    digest = hashlib.sha256()
    for path, size, mtime in files:
        digest.update(f"{path}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def image_set_version(manifest: Manifest) -> str:
    """The manifest fingerprint (the set of pictures), extended by the files left out and why.

    Equal to `manifest.fingerprint` when nothing was skipped; a corrupt file added to the folder
    therefore changes the version (and so requests a run that reports it) without changing
    the pictures the method sees.
    """
    if not manifest.skipped:
        return manifest.fingerprint
    skipped = "\n".join(f"{s.path}\t{s.reason}" for s in manifest.skipped)
    return hashlib.sha256(f"{manifest.fingerprint}\n{skipped}".encode("utf-8")).hexdigest()


def load_manifests(store: ArtifactStore, ref: ArtifactRef) -> tuple[Manifest, Manifest | None]:
    """(unlabeled, labeled or None) from a `dataset_manifest` artifact."""
    unlabeled = Manifest.from_polars(store.read_table(ref, UNLABELED_TABLE))
    labeled = Manifest.from_polars(store.read_table(ref, LABELED_TABLE)) if ref.facts["has_labels"] else None
    return unlabeled, labeled
