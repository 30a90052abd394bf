"""The job, the sensor that watches the data root, and the full-refresh schedule.

`unlabeled_images_sensor` keeps, in its cursor, per dataset: a cheap folder state (stats of
dataset.yaml and unlabeled/) and the image-set version last acted on. A tick:

- a dataset folder that is not a partition yet → add the partition, request the whole graph;
- unchanged folder state → nothing, no file is read (a partition deleted in the UI stays deleted
  until its folder changes; a folder whose dataset.yaml was refused waits for a change, too);
- changed state → rebuild the manifest (re-hashing only files whose size or mtime changed) and,
  if the image-set version changed, request the image-dependent assets with run key
  `<dataset>:<version>`; unreadable files change the version too, so they are reported in a run
  (tags, and the manifest's metadata) rather than ignored;
- at most `max_datasets_per_tick` datasets are hashed per tick; the rest wait for the next one.

With no cursor entry (first tick, or after a cursor reset) an existing partition is compared with
the version its last manifest materialization recorded, so `dagster dev` after `nola demo`
requests nothing until images change.
"""


import json

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    schedule,
    sensor,
)

from nola_core.data import DatasetSpecError, build_manifest, load_dataset_spec

from nola_assets.artifacts import ArtifactStore
from nola_assets.assets import IMAGE_DEPENDENT_ASSETS
from nola_assets.datasets import folder_state, image_set_version, load_manifests
from nola_assets.export_assets import EXPORT_ASSETS
from nola_assets.method_assets import METHOD_ASSETS
from nola_assets.partitions import DATASETS, datasets_partitions
from nola_assets.resources import DatasetsResource

MAX_DATASETS_PER_TICK = 4
SKIPPED_SAMPLE = 5

nola_job = define_asset_job(
    "nola_job",
    selection=AssetSelection.all(),
    description="Every NoLA asset (and its checks) for one dataset partition.",
)

# Everything downstream of the images: the NoLA stages, the other methods and the export.
RERUN_ON_NEW_IMAGES = IMAGE_DEPENDENT_ASSETS + [a.key for a in METHOD_ASSETS + EXPORT_ASSETS]


def build_unlabeled_images_sensor(max_datasets_per_tick: int = MAX_DATASETS_PER_TICK, name: str = "unlabeled_images_sensor"):
    @sensor(
        name=name,
        job=nola_job,
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description="New dataset folder → new partition and a run; new, removed or unreadable images "
        f"under unlabeled/ → a run of the image-dependent assets (at most {max_datasets_per_tick} "
        "datasets hashed per tick).",
    )
    def _sensor(context: SensorEvaluationContext, data: DatasetsResource, artifacts: ArtifactStore) -> SensorResult:
        cursor = json.loads(context.cursor) if context.cursor else {}
        partitions = set(context.instance.get_dynamic_partitions(DATASETS))
        new_partitions: list[str] = []
        requests: list[RunRequest] = []
        hashed = 0
        for name in data.names():
            state = folder_state(data.dataset_dir(name))
            seen = cursor.get(name, {})
            if seen.get("state") == state:
                continue
            if hashed == max_datasets_per_tick:
                context.log.info(f"{name}: changed, left for the next tick (per-tick cap reached)")
                continue
            hashed += 1
            previous_ref = artifacts.load_ref("dataset_manifest", name)
            previous = load_manifests(artifacts, previous_ref)[0] if previous_ref is not None else None
            try:
                manifest = build_manifest(load_dataset_spec(data.dataset_dir(name)), "unlabeled", previous=previous)
            except DatasetSpecError as error:
                context.log.warning(f"{name}: not a usable dataset yet: {error}")
                cursor[name] = {"state": state, "version": None}
                continue
            version = image_set_version(manifest)
            cursor[name] = {"state": state, "version": version}
            tags = {"nola/dataset": name, "nola/images": str(len(manifest))}
            if manifest.skipped:
                sample = ", ".join(s.path for s in manifest.skipped[:SKIPPED_SAMPLE])
                context.log.warning(f"{name}: {len(manifest.skipped)} file(s) left out: "
                                    + "; ".join(f"{s.path} ({s.reason})" for s in manifest.skipped[:SKIPPED_SAMPLE]))
                tags.update({"nola/skipped_files": str(len(manifest.skipped)), "nola/skipped_sample": sample})
            run_key = f"{name}:{version[:16]}"
            if name not in partitions:
                new_partitions.append(name)
                requests.append(RunRequest(run_key=run_key, partition_key=name, tags=tags))
                continue
            acted_on = seen.get("version") if seen else (previous_ref.facts["image_set_version"] if previous_ref else None)
            if version != acted_on:
                requests.append(RunRequest(run_key=run_key, partition_key=name, tags=tags,
                                           asset_selection=RERUN_ON_NEW_IMAGES))
        return SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[datasets_partitions.build_add_request(new_partitions)] if new_partitions else [],
            cursor=json.dumps(cursor, sort_keys=True),
        )

    return _sensor


unlabeled_images_sensor = build_unlabeled_images_sensor()


@schedule(
    job=nola_job,
    cron_schedule="0 3 * * 0",
    default_status=DefaultScheduleStatus.STOPPED,
    description="Weekly full refresh of every dataset partition (features of unchanged images are reused).",
)
def full_refresh_schedule(context: ScheduleEvaluationContext):
    names = context.instance.get_dynamic_partitions(DATASETS)
    if not names:
        return SkipReason("no dataset partition yet")
    stamp = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    return [RunRequest(run_key=f"{name}:refresh:{stamp}", partition_key=name, tags={"nola/dataset": name})
            for name in names]
