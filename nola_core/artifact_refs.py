"""The artifact store's pointers, read without Dagster: `nola export` and the store share them.

The store (nola_assets.artifacts.ArtifactStore, which writes it) keeps under its root

    <dataset>/<asset>/<digest>/...        one materialization's files, ref.json written last
    refs/<dataset>/<asset>.json           the ArtifactRef of the last materialization

A reader outside a Dagster run (the sensor, `nola export`) follows `refs/`.

The root may be a URL (`s3://bucket/prefix`, `gs://…`; `nola_core.storage`): the pointer is then read
from the store and the finished artifact it names is downloaded into its local copy under the cache
directory (`ref_at`: ranged reads, ref.json last), where its files are read as on a local root.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from nola_core.data import check_dataset_name
from nola_core.storage import DEFAULT_CACHE_DIR, download, is_remote, local_root, open_storage

ARTIFACT_ROOT_ENV = "NOLA_ARTIFACT_ROOT"
CACHE_DIR_ENV = "NOLA_CACHE_DIR"
DEFAULT_ARTIFACT_ROOT = "artifacts"  # relative to the working directory
REFS_FOLDER = "refs"


@dataclass(frozen=True)
class ArtifactRef:
    """Where one materialization's files are, what they were keyed on, and small facts about them."""

    asset: str
    dataset: str
    digest: str
    path: str
    key: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)

    def file(self, name: str) -> Path:
        return Path(self.path) / name

    def with_facts(self, **facts: Any) -> "ArtifactRef":
        return dataclasses.replace(self, facts={**self.facts, **facts})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ArtifactRef":
        return cls(**data)


def artifact_root(environ: Mapping[str, str]) -> str | Path:
    """The store's root as the Dagster resource resolves it: $NOLA_ARTIFACT_ROOT (a URL kept as it
    is, a folder resolved), else artifacts/."""
    location = environ.get(ARTIFACT_ROOT_ENV, "").strip() or DEFAULT_ARTIFACT_ROOT
    return location if is_remote(location) else local_root(location, DEFAULT_CACHE_DIR)


def cache_dir(environ: Mapping[str, str]) -> str:
    """Where a URL root's objects are copied to be read: $NOLA_CACHE_DIR, else `DEFAULT_CACHE_DIR`."""
    return environ.get(CACHE_DIR_ENV, "").strip() or DEFAULT_CACHE_DIR


def ref_path(root: Path, asset: str, dataset: str) -> Path:
    return Path(root) / REFS_FOLDER / check_dataset_name(dataset) / f"{asset}.json"


def load_ref(location: str | Path, asset: str, dataset: str, cache: str | Path = DEFAULT_CACHE_DIR) -> ArtifactRef | None:
    """The artifact of the last materialization of `asset` for `dataset` under the root `location`,
    if any. Its path is rebuilt under the local root, so the whole store can be moved or mounted
    elsewhere; for a URL root that is the artifact's copy under `cache` (`ref_at`)."""
    if is_remote(location):
        digest = pointed_digest(location, asset, dataset)
        return None if digest is None else ref_at(location, asset, dataset, digest, cache)
    root = local_root(location, cache)
    path = ref_path(root, asset, dataset)
    if not path.is_file():
        return None
    ref = ArtifactRef.from_json(json.loads(path.read_text(encoding="utf-8")))
    return dataclasses.replace(ref, path=str(root / dataset / asset / ref.digest))


def pointed_digest(location: str | Path, asset: str, dataset: str) -> str | None:
    """The digest the `refs/` pointer of `asset` for `dataset` names, if any: the pointer is read,
    the artifact is not fetched."""
    try:
        if is_remote(location):
            text = open_storage(location).read_bytes(f"{REFS_FOLDER}/{check_dataset_name(dataset)}/{asset}.json")
        else:
            text = ref_path(local_root(location, DEFAULT_CACHE_DIR), asset, dataset).read_bytes()
    except FileNotFoundError:
        return None
    return json.loads(text)["digest"]


def ref_at(location: str | Path, asset: str, dataset: str, digest: str,
           cache: str | Path = DEFAULT_CACHE_DIR) -> ArtifactRef | None:
    """The ref.json of the artifact folder `digest`, re-rooted under the local root; None while
    unfinished. For a URL root a finished artifact not yet in the cache is downloaded first."""
    folder = local_root(location, cache) / check_dataset_name(dataset) / asset / digest
    if not (folder / "ref.json").is_file() and not _download(location, f"{dataset}/{asset}/{digest}", folder):
        return None
    ref = ArtifactRef.from_json(json.loads((folder / "ref.json").read_text(encoding="utf-8")))
    return dataclasses.replace(ref, path=str(folder))


def _download(location: str | Path, prefix: str, folder: Path) -> bool:
    """Copy the finished artifact at `prefix` of a URL root into `folder`, its ref.json last; False
    for a local root or when the store holds no finished artifact there."""
    if not is_remote(location):
        return False
    remote = open_storage(location)
    if not remote.exists(f"{prefix}/ref.json"):
        return False
    for item in remote.listing(prefix):
        if item.key != "ref.json":  # every file again: what a failed local attempt left may differ
            download(remote.url(f"{prefix}/{item.key}"), folder / item.key)
    download(remote.url(f"{prefix}/ref.json"), folder / "ref.json")
    return True
