"""The artifact store: tensors as safetensors, tables as parquet, facts as JSON; never pickles.

Layout under the artifact root (env `NOLA_ARTIFACT_ROOT`, default `artifacts/`):

    <dataset>/<asset>/<digest>/key.json       what the digest was computed from, readable
    <dataset>/<asset>/<digest>/<files>        the artifact itself
    <dataset>/<asset>/<digest>/ref.json       written last: the artifact is complete
    refs/<dataset>/<asset>.json               the artifact the last materialization produced
    evaluation/<dataset>/<method>.parquet     every method's evaluation rows (`method_comparison`)

The digest is a SHA-256 over the asset name, the dataset and a key that holds everything that
changes the content: the asset's code version, model identities, upstream digests, description
hash, image-set fingerprint, k, seeds, config values. Every file is written to a temporary name
in the same folder and renamed into place, so a reader never sees half a file. A folder with its
ref.json is finished and never written again: `complete_ref` finds it for a key, and the asset
reuses it instead of computing.

Assets return an `ArtifactRef` (a small JSON document) as their value; `ArtifactRefIOManager`
stores it under `refs/` and hands it to downstream assets, which read the files it points to. The
artifact a run reads is that of the upstream materialization this run depends on
(`materialized_ref`: the one made in this run, else the latest recorded before this run started),
found through the `artifact_digest` in the materialization's metadata: never the `refs/` pointer,
which a concurrent or later run of the same partition may have moved since. `refs/` only serves
readers outside a run (the sensor, `nola export`, reuse of an incremental feature table's rows).

The root may be a URL (`s3://bucket/prefix`, `gs://…`; `nola_core.storage`). Then the layout above
lives in object storage and `root()` is its local copy under the cache directory (env
`NOLA_CACHE_DIR`, default `.nola_cache/objects`): assets write and read files there as on a local
root. `save_ref` uploads a new artifact's files, then its ref.json (so a killed upload leaves an
artifact without ref.json: unfinished, never reused), then the `refs/` pointer; a finished artifact
is never uploaded again. `ref_at` on a machine without the finished folder downloads it (in ranged
reads, onto its local copy; `nola_core.artifact_refs.ref_at`) and writes the local ref.json last.
Folders outside that layout that other runs share (`evaluation/`, the tables `nola report` reads)
are mutable: `shared_folder` brings the local copy up to date from the store, `publish_files`
uploads each table it is given in one move.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import polars as pl
import torch
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    ConfigurableIOManager,
    DagsterEventType,
    DagsterInstance,
    InputContext,
    OutputContext,
)
from pydantic import Field
from safetensors.torch import load_file, save_file

from nola_core import artifact_refs
from nola_core.artifact_refs import DEFAULT_ARTIFACT_ROOT, REFS_FOLDER, ArtifactRef, ref_path
from nola_core.data import check_dataset_name
from nola_core.storage import DEFAULT_CACHE_DIR, Storage, is_remote, local_root, open_storage

from nola_assets.resources import EnvSettings


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest_of(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def artifact_digest(asset: str, dataset: str, key: Mapping[str, Any]) -> str:
    return digest_of({"asset": asset, "dataset": dataset, "key": key})[:24]


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary)` next to `path`, then rename the temporary file onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


class ArtifactStore(EnvSettings):
    """A local directory (a mounted volume or network file system works the same way), or object
    storage at a URL with its local copy in the cache directory."""

    artifact_root: Optional[str] = Field(
        default=None, description="env NOLA_ARTIFACT_ROOT; a folder or a URL (s3://bucket/prefix, gs://…); "
        "default artifacts/ (relative to the working directory)"
    )
    cache_dir: Optional[str] = Field(
        default=None, description=f"env NOLA_CACHE_DIR; default {DEFAULT_CACHE_DIR}: the local copy of a URL "
        "root's artifacts (written there before upload, downloaded there to be read)"
    )

    def location(self) -> str:
        """The root as configured: a folder or a URL."""
        return str(self.setting("artifact_root", DEFAULT_ARTIFACT_ROOT))

    def cache(self) -> str:
        return str(self.setting("cache_dir", DEFAULT_CACHE_DIR))

    def root(self) -> Path:
        """The local folder artifacts are written in and read from (a URL root's copy in the cache)."""
        return local_root(self.location(), self.cache())

    def remote(self) -> Storage | None:
        """The object storage at the root URL; None for a local root."""
        return open_storage(self.location()) if is_remote(self.location()) else None

    def allocate(self, asset: str, dataset: str, key: Mapping[str, Any]) -> ArtifactRef:
        """The content-addressed folder for `key`, created, with its key.json written."""
        check_dataset_name(dataset)  # the dataset is a folder of the store: nothing may lead outside it
        key = json.loads(canonical_json(dict(key)))  # plain JSON types only, so the ref round-trips
        digest = artifact_digest(asset, dataset, key)
        ref = ArtifactRef(asset=asset, dataset=dataset, digest=digest,
                          path=str(self.root() / dataset / asset / digest), key=key)
        self.write_json(ref, "key.json", {"asset": asset, "dataset": dataset, "digest": digest, "key": key})
        return ref

    def complete_ref(self, asset: str, dataset: str, key: Mapping[str, Any]) -> ArtifactRef | None:
        """The finished artifact for `key` (its folder holds ref.json), if one exists; creates nothing."""
        key = json.loads(canonical_json(dict(key)))
        return self.ref_at(asset, check_dataset_name(dataset), artifact_digest(asset, dataset, key))

    def ref_at(self, asset: str, dataset: str, digest: str) -> ArtifactRef | None:
        """The ref.json of the artifact folder `digest`, re-rooted under the current root; None while unfinished."""
        return artifact_refs.ref_at(self.location(), asset, dataset, digest, self.cache())

    def write_json(self, ref: ArtifactRef, name: str, value: Any) -> Path:
        text = json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        return atomic_write(ref.file(name), lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def read_json(self, ref: ArtifactRef, name: str) -> Any:
        return json.loads(ref.file(name).read_text(encoding="utf-8"))

    def write_table(self, ref: ArtifactRef, name: str, frame: pl.DataFrame) -> Path:
        return atomic_write(ref.file(name), frame.write_parquet)

    def read_table(self, ref: ArtifactRef, name: str) -> pl.DataFrame:
        return pl.read_parquet(ref.file(name))

    def write_tensors(self, ref: ArtifactRef, name: str, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        return atomic_write(ref.file(name), lambda tmp: save_file(contiguous, str(tmp), metadata=dict(metadata or {})))

    def read_tensors(self, ref: ArtifactRef, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(ref.file(name)))

    def write_bytes(self, ref: ArtifactRef, name: str, data: bytes) -> Path:
        return atomic_write(ref.file(name), lambda tmp: tmp.write_bytes(data))

    def ref_path(self, asset: str, dataset: str) -> Path:
        return ref_path(self.root(), asset, dataset)

    def save_ref(self, ref: ArtifactRef) -> Path:
        remote = self.remote()
        if remote is not None:
            self._upload(remote, ref)
        self.write_json(ref, "ref.json", ref.to_json())
        text = json.dumps(ref.to_json(), indent=2, ensure_ascii=False) + "\n"
        if remote is not None:
            remote.put(f"{REFS_FOLDER}/{ref.dataset}/{ref.asset}.json", text.encode("utf-8"))
        return atomic_write(self.ref_path(ref.asset, ref.dataset), lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def load_ref(self, asset: str, dataset: str) -> ArtifactRef | None:
        """The artifact of the last materialization of `asset` for `dataset`, if any (re-rooted here)."""
        return artifact_refs.load_ref(self.location(), asset, dataset, self.cache())

    def has_ref(self, asset: str, dataset: str) -> bool:
        """Whether `asset` was ever materialized for `dataset` (its `refs/` pointer exists); reads and
        downloads nothing, for the sensor."""
        remote = self.remote()
        if remote is None:
            return self.ref_path(asset, dataset).is_file()
        return remote.exists(f"{REFS_FOLDER}/{check_dataset_name(dataset)}/{asset}.json")

    def _upload(self, remote: Storage, ref: ArtifactRef) -> None:
        """A new artifact's files (temporaries and hidden names left out), then its ref.json; nothing
        when the store already holds the finished artifact."""
        prefix = f"{ref.dataset}/{ref.asset}/{ref.digest}"
        if remote.exists(f"{prefix}/ref.json"):
            return
        folder = Path(ref.path)
        for path in sorted(folder.rglob("*")):
            name = path.relative_to(folder).as_posix()
            if path.is_file() and name != "ref.json" and not any(p.startswith(".") for p in name.split("/")):
                remote.put(f"{prefix}/{name}", path)
        remote.publish(f"{prefix}/ref.json", (json.dumps(ref.to_json(), indent=2, ensure_ascii=False) + "\n").encode())

    def shared_folder(self, name: str) -> Path:
        """The local folder `name` under the root, outside the content-addressed layout (the
        evaluation tables `nola report` reads): for a URL root first brought up to date from the
        store (`Storage.mirror`), so what other runs published there is read too."""
        folder = self.root() / name
        remote = self.remote()
        if remote is not None:
            remote.mirror(name, folder)
        return folder

    def publish_files(self, paths: list[Path]) -> None:
        """For a URL root, each file (under `root()`) put at its key, replacing the object there in one
        move (`Storage.put`: a reader sees the old or the new table, never half of one); nothing for
        a local root, where the file is already in place."""
        remote = self.remote()
        for path in paths if remote is not None else []:
            remote.put(Path(path).relative_to(self.root()).as_posix(), Path(path))

    def require_ref(self, asset: str, dataset: str) -> ArtifactRef:
        ref = self.load_ref(asset, dataset)
        if ref is None:
            raise FileNotFoundError(
                f"no artifact of {asset!r} for dataset {dataset!r} under {self.root()}: "
                f"materialize {asset} for partition {dataset!r} first"
            )
        return ref


def materialized_ref(instance: DagsterInstance, run_id: str, store: ArtifactStore, asset: str,
                     partition: str) -> ArtifactRef:
    """The artifact of the materialization of `asset` for `partition` that run `run_id` depends on:
    the one this run made, else the latest recorded before this run started, found by the
    `artifact_digest` in its metadata. (Event storage ids would avoid clocks, but SQLite keeps
    each run's events in its own file, numbered apart from the asset index.) An instance with no
    record of it at all (a new Dagster home over an existing artifact root) reads the store's
    `refs/` pointer, as a reader outside a run does."""
    key = AssetKey(asset)
    ours = [r for r in instance.get_records_for_run(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records
            if r.asset_key == key and r.partition_key == partition]
    if ours:
        record = ours[-1]
    else:
        started = instance.get_run_record_by_id(run_id).start_time
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=key, asset_partitions=[partition], before_timestamp=started), limit=1).records
        if not records:
            if instance.fetch_materializations(AssetRecordsFilter(asset_key=key, asset_partitions=[partition]),
                                               limit=1).records:
                raise FileNotFoundError(f"{asset} for partition {partition!r} was first materialized after this "
                                        "run started: rerun to use it")
            return store.require_ref(asset, partition)
        record = records[0]
    digest = record.asset_materialization.metadata["artifact_digest"].value
    ref = store.ref_at(asset, partition, digest)
    if ref is None:
        raise FileNotFoundError(f"the artifact {digest} of {asset} for {partition!r} is gone from {store.root()}")
    return ref


class ArtifactRefIOManager(ConfigurableIOManager):
    """Stores each asset's `ArtifactRef` as JSON and hands downstream assets the artifact of the
    upstream materialization their run depends on (`materialized_ref`)."""

    store: ArtifactStore

    def handle_output(self, context: OutputContext, obj: ArtifactRef) -> None:
        if not isinstance(obj, ArtifactRef):
            raise TypeError(f"{context.asset_key.to_user_string()} returned {type(obj).__name__}, not an ArtifactRef")
        path = self.store.save_ref(obj)
        context.log.debug(f"artifact ref written to {path}")

    def load_input(self, context: InputContext) -> ArtifactRef:
        step = context.step_context
        return materialized_ref(step.instance, step.run_id, self.store, context.asset_key.path[-1],
                                context.asset_partition_key)
