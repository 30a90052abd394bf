"""The job and the sensor that watches the data root (the weekly refresh: nola_assets/schedules.py).

`unlabeled_images_sensor` does only cheap work: it reads dataset.yaml files and stats files, and
never opens an image (hashing and decoding happen in the run's `dataset_manifest` step). A tick:

- registers every new dataset folder whose dataset.yaml is valid as a partition, all in this tick
  (a refused dataset.yaml is logged once and retried when that file changes);
- stat walks dataset folders (`stat_walk`: path, size, mtime of dataset.yaml and unlabeled/) until
  its time budget (`sensor_tick_budget_seconds`) is spent, each folder whole; the next tick goes on
  with the folder after the last one walked, so a huge folder never starves the others;
- a folder whose stats changed starts its quiet period; once they have stayed the same for
  `sensor_quiet_seconds` (or a `.ready` file is in the folder), the dataset gets one run: the
  whole graph if it has no manifest yet, else the preflight and the image-dependent assets. Its run key is
  `<dataset>:<change number>:<state>`, the change number counted per dataset in the cursor, so a
  folder going A → B → A gets three runs, and a version whose run failed gets a new one on its
  next change.

With no cursor entry (first tick, or after a cursor reset) an existing partition whose files
match the sizes and mtimes its last manifest recorded is taken as done, so `dagster dev` after
`nola demo` requests nothing until files change. At most one run per partition runs at a time:
the instance files limit the `dagster/partition` tag per unique value (deploy/README.md). Every
run carries a `dagster/max_runtime` tag for what it materializes (nola_assets/run_limits.py) and
a `dagster-k8s/config` tag for its pod: GPUs only if it materializes GPU assets (nola_assets/run_pods.py).

A data root in object storage (`NOLA_DATA_ROOT=s3://bucket/prefix`, `nola_core.storage`) is seen
through listings alone, never an object read: the dataset folders are one delimited listing (and
a HEAD of each folder's dataset.yaml), a folder's state is one listing of it, with each object's
size and ETag in place of size and mtime. Its dataset.yaml is not read there: a folder holding
one becomes a partition, and a spec the run refuses fails that run's first step. After a cursor
reset its datasets get one run each (their artifacts are reused), since no manifest records ETags.
"""


import json
import time
from typing import Callable

from dagster import (
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    sensor,
)

from nola_core.data import DatasetSpecError, check_dataset_name, is_image_path, load_dataset_spec
from nola_core.storage import Storage, is_remote, open_storage

from nola_assets.artifacts import ArtifactStore
from nola_assets.assets import IMAGE_DEPENDENT_ASSETS, NOLA_ASSETS
from nola_assets.datasets import UNLABELED_TABLE, FileState, folder_state, stat_walk
from nola_assets.export_assets import EXPORT_ASSETS
from nola_assets.method_assets import METHOD_ASSETS
from nola_assets.partitions import DATASETS, datasets_partitions
from nola_assets.preflight_asset import preflight
from nola_assets.resources import DatasetsResource
from nola_assets.run_limits import max_runtime_tags
from nola_assets.run_pods import run_pod_tags

QUIET_SECONDS = 60.0  # DatasetsResource.sensor_quiet_seconds
TICK_BUDGET_SECONDS = 20.0  # DatasetsResource.sensor_tick_budget_seconds; Dagster cuts a tick at 60 s
READY_MARKER = ".ready"

JOB_ASSETS = [preflight, *NOLA_ASSETS, *METHOD_ASSETS, *EXPORT_ASSETS]  # what nola_job's runs may materialize

nola_job = define_asset_job(
    "nola_job",
    selection=AssetSelection.all(),
    description="Every NoLA asset (and its checks) for one dataset partition.",
    # NOLA_MAX_RUNTIME_SECONDS_* and NOLA_RUN_GPUS read when the code location loads
    tags={**max_runtime_tags(JOB_ASSETS), **run_pod_tags(JOB_ASSETS)},
)

# The preflight, then everything downstream of the images: the NoLA stages, the other methods and the export.
RERUN_ON_NEW_IMAGES = [preflight.key] + IMAGE_DEPENDENT_ASSETS + [a.key for a in METHOD_ASSETS + EXPORT_ASSETS]


def build_unlabeled_images_sensor(name: str = "unlabeled_images_sensor", clock: Callable[[], float] = time.time):
    """The data-root sensor; `clock` (seconds) is what the quiet period is measured with."""

    @sensor(
        name=name,
        job=nola_job,
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description="New dataset folder → new partition; a folder whose files changed and then stayed "
        "unchanged for the quiet period (or holds a .ready file) → one run. Stats files only, under a time budget.",
    )
    def _sensor(context: SensorEvaluationContext, data: DatasetsResource, artifacts: ArtifactStore) -> SensorResult:
        started = time.monotonic()
        budget = float(data.setting("sensor_tick_budget_seconds", TICK_BUDGET_SECONDS))
        quiet = float(data.setting("sensor_quiet_seconds", QUIET_SECONDS))
        now = clock()
        cursor = json.loads(context.cursor) if context.cursor else {}
        seen: dict[str, dict] = cursor.get("datasets", {})
        objects = _object_root(data)
        names = _object_dataset_names(objects) if objects else data.names()
        seen = {name: entry for name, entry in seen.items() if name in names}  # folders gone: forgotten
        partitions = set(context.instance.get_dynamic_partitions(DATASETS))

        new_partitions = [name for name in names if name not in partitions
                          and (objects is not None or _valid_spec(context, data, name, seen))]
        usable = partitions | set(new_partitions)
        order = _rotated([n for n in names if n in usable], cursor.get("resume_at"))
        requests: list[RunRequest] = []
        walked = files_statted = waiting = 0
        resume_at = None
        for name in order:
            if walked and time.monotonic() - started > budget:
                resume_at = name
                break
            walked += 1
            files, ready = _object_walk(objects, name) if objects else _folder_walk(data, name)
            files_statted += len(files)
            entry = seen.setdefault(name, {"changes": 0})
            state = folder_state(files)
            if entry.get("state") != state:
                if ("state" not in entry and name in partitions and objects is None
                        and _matches_last_manifest(artifacts, name, files)):
                    entry.update(state=state, since=now, requested=state)
                    continue
                entry.update(state=state, since=now)  # changed: the quiet period starts now
            if entry.get("requested") == state:
                continue
            if now - entry["since"] < quiet and not ready:
                waiting += 1
                continue
            entry["changes"] += 1
            entry["requested"] = state
            has_manifest = artifacts.has_ref("dataset_manifest", name)
            requests.append(RunRequest(
                run_key=f"{name}:{entry['changes']}:{state[:12]}",
                partition_key=name,
                asset_selection=RERUN_ON_NEW_IMAGES if has_manifest else None,
                tags={"nola/dataset": name, "nola/change": str(entry["changes"]),
                      "nola/images": str(sum(is_image_path(path) for path, _, _ in files)),
                      **max_runtime_tags(JOB_ASSETS, RERUN_ON_NEW_IMAGES if has_manifest else None),
                      **run_pod_tags(JOB_ASSETS, RERUN_ON_NEW_IMAGES if has_manifest else None)},
            ))
        context.log.info(
            f"walked {walked} of {len(order)} dataset folder(s) ({files_statted} files) in "
            f"{time.monotonic() - started:.2f} s; {len(new_partitions)} new partition(s), {len(requests)} run(s) "
            f"requested, {waiting} waiting for their quiet period ({quiet:g} s)"
            + (f"; the next tick goes on at {resume_at}" if resume_at else ""))
        return SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[datasets_partitions.build_add_request(new_partitions)] if new_partitions else [],
            cursor=json.dumps({"datasets": seen, "resume_at": resume_at}, sort_keys=True),
        )

    return _sensor


def _object_root(data: DatasetsResource) -> Storage | None:
    """The data root as object storage, or None for a folder of the local file system."""
    location = str(data.setting("data_root", "data"))
    return open_storage(location) if is_remote(location) else None


def _object_dataset_names(objects: Storage) -> list[str]:
    """Folders of an object-store data root holding a dataset.yaml: one listing, a HEAD each."""
    names = []
    for name in objects.folders():
        try:
            check_dataset_name(name)
        except DatasetSpecError:  # hidden or unusable as a partition key
            continue
        if objects.exists(f"{name}/dataset.yaml"):
            names.append(name)
    return names


def _folder_walk(data: DatasetsResource, name: str) -> tuple[list[FileState], bool]:
    """(`stat_walk` of the dataset folder, whether it holds the ready marker)."""
    folder = data.dataset_dir(name)
    return stat_walk(folder), (folder / READY_MARKER).exists()


def _object_walk(objects: Storage, name: str) -> tuple[list[FileState], bool]:
    """`stat_walk` on object storage: dataset.yaml and the objects under unlabeled/ (hidden names
    left out), each with its size and ETag, from one listing of the folder; and whether the folder
    holds the ready marker."""
    listing = objects.listing(check_dataset_name(name))
    files = [(o.key, o.size, o.version) for o in listing
             if o.key == "dataset.yaml" or (o.key.startswith("unlabeled/")
                                            and not any(p.startswith(".") for p in o.key.split("/")))]
    return files, any(o.key == READY_MARKER for o in listing)


def _valid_spec(context: SensorEvaluationContext, data: DatasetsResource, name: str, seen: dict[str, dict]) -> bool:
    """Whether a new folder's dataset.yaml is usable; a refused one is logged once per version of that file."""
    try:
        info = (data.dataset_dir(name) / "dataset.yaml").stat()
    except OSError:  # removed since the folder was listed
        return False
    spec_state = [info.st_size, info.st_mtime_ns]
    if seen.get(name, {}).get("refused") == spec_state:
        return False
    try:
        load_dataset_spec(data.dataset_dir(name))
    except DatasetSpecError as error:
        context.log.warning(f"{name}: not a usable dataset yet: {error}")
        seen[name] = {"refused": spec_state}
        return False
    seen.pop(name, None)
    return True


def _rotated(names: list[str], resume_at: str | None) -> list[str]:
    """`names` starting at `resume_at` (or the first name after it, if it is gone), wrapping around."""
    if resume_at is None:
        return names
    start = next((i for i, name in enumerate(names) if name >= resume_at), 0)
    return names[start:] + names[:start]


def _matches_last_manifest(artifacts: ArtifactStore, name: str, files: list[FileState]) -> bool:
    """Whether the image files under unlabeled/ are exactly those the last manifest hashed, with the
    same sizes and mtimes (reads the manifest table, no image)."""
    ref = artifacts.load_ref("dataset_manifest", name)
    if ref is None:
        return False
    table = artifacts.read_table(ref, UNLABELED_TABLE).select("path", "size", "mtime_ns")
    recorded = {path: (size, mtime) for path, size, mtime in table.iter_rows()}
    walked = {path: (size, mtime) for path, size, mtime in files if path.startswith("unlabeled/") and is_image_path(path)}
    return walked.keys() == recorded.keys() and all(
        recorded[path] == walked[path] for path in walked if recorded[path][0] is not None)


unlabeled_images_sensor = build_unlabeled_images_sensor()
