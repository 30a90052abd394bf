"""The artifact store's pointers, read without Dagster: `nola export` and the store share them.

The store (nola_assets.artifacts.ArtifactStore, which writes it) keeps under its root

    <dataset>/<asset>/<digest>/...        one materialization's files, ref.json written last
    refs/<dataset>/<asset>.json           the ArtifactRef of the last materialization

A reader outside a Dagster run (the sensor, `nola export`) follows `refs/`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from nola_core.data import check_dataset_name

ARTIFACT_ROOT_ENV = "NOLA_ARTIFACT_ROOT"
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


def artifact_root(environ: Mapping[str, str]) -> Path:
    """The store's root as the Dagster resource resolves it: $NOLA_ARTIFACT_ROOT, else artifacts/."""
    return Path(environ.get(ARTIFACT_ROOT_ENV, "").strip() or DEFAULT_ARTIFACT_ROOT).resolve()


def ref_path(root: Path, asset: str, dataset: str) -> Path:
    return Path(root) / REFS_FOLDER / check_dataset_name(dataset) / f"{asset}.json"


def load_ref(root: Path, asset: str, dataset: str) -> ArtifactRef | None:
    """The artifact of the last materialization of `asset` for `dataset`, if any. Its path is
    rebuilt under `root`, so the whole store can be moved or mounted elsewhere."""
    path = ref_path(root, asset, dataset)
    if not path.is_file():
        return None
    ref = ArtifactRef.from_json(json.loads(path.read_text(encoding="utf-8")))
    return dataclasses.replace(ref, path=str(Path(root) / dataset / asset / ref.digest))
