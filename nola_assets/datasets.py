"""Dataset folders as the sensor and the manifest asset see them: cheap state, image-set version."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nola_core.data import Manifest

from nola_assets.artifacts import ArtifactRef, ArtifactStore

UNLABELED_TABLE = "unlabeled.parquet"
LABELED_TABLE = "labeled.parquet"


def folder_state(dataset_dir: Path) -> str:
    """SHA-256 over (path, size, mtime) of dataset.yaml and every file under unlabeled/.

    Costs one stat per file and no reads: it tells the sensor whether hashing is needed at all.
    Linked folders are entered once (a symlink loop ends the walk there) and only when they stay
    inside the dataset folder or unlabeled/'s own real location, as in the manifest; a dangling
    link or a file deleted while walking counts as missing instead of failing the tick.
    """
    digest = hashlib.sha256()
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
    for path in entries:
        try:
            info = path.stat()
            state = f"{info.st_size}\0{info.st_mtime_ns}"
        except OSError:  # dangling link, deleted meanwhile, unreadable
            state = "missing"
        digest.update(f"{path.relative_to(dataset_dir).as_posix()}\0{state}\n".encode())
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
