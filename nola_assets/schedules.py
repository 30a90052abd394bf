"""The weekly refresh: for each dataset partition, only the assets that are stale, and none when none is.

An asset of a partition is stale when it was never materialized, when its latest materialization
was made by another code version than the one the definitions declare now (`nola_asset(version=)`),
or when an input's data version (its artifact digest) differs from the one that materialization
read. A stale asset is requested with everything downstream of it; a partition with nothing stale
gets no run. This is Dagster's own rule (the tags `dagster/code_version`, `dagster/data_version`
and `dagster/input_data_version/<asset>` that every materialization carries), evaluated per
partition: `RunRequest(stale_assets_only=True)` in Dagster 1.13 asks the stale-status resolver
without a partition key, which answers FRESH for every partitioned asset, so it would never
request anything here (dagster/_scheduler/stale.py). Inside a run, every asset whose key has a
finished artifact reuses it (`assets.allocate_or_reuse`), so a run requested for a stale asset
still recomputes only what changed.

Every requested run also selects the `preflight` asset, as the sensor's runs do: weights, LLM key
and disk are checked again (they may have changed since the last run; the weekly refresh is when
nobody watches). It never makes a run by itself: its data version is constant and it is not
judged for staleness. It fails the run in seconds, and no step downstream of it (the manifest,
the descriptions and all that depends on them) starts; a stale asset that does not depend on it
(say a new code version of `prompt_tuned_encoder` alone) still starts beside it.
"""

from typing import Sequence

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    AssetsDefinition,
    DataProvenance,
    DefaultScheduleStatus,
    DagsterInstance,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from nola_assets.assets import NOLA_ASSETS
from nola_assets.export_assets import EXPORT_ASSETS
from nola_assets.method_assets import METHOD_ASSETS
from nola_assets.partitions import DATASETS
from nola_assets.preflight_asset import preflight
from nola_assets.run_limits import max_runtime_tags
from nola_assets.run_pods import run_pod_tags
from nola_assets.sensors import nola_job

DATA_VERSION_TAG = "dagster/data_version"


def _latest(instance: DagsterInstance, key: AssetKey, partition: str, before: int | None = None):
    """The latest materialization record of `key` for `partition` (before storage id `before`), or None."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition], before_storage_id=before), limit=1).records
    return records[0] if records else None


def _data_version(record) -> str | None:
    return (record.asset_materialization.tags or {}).get(DATA_VERSION_TAG)


def stale_assets(instance: DagsterInstance, assets: Sequence[AssetsDefinition], partition: str) -> list[AssetKey]:
    """The assets of `partition` to rematerialize: the stale ones (never materialized, another code
    version, an input with another data version than it read) and everything downstream of them."""
    by_key = {a.key: a for a in assets}
    latest = {key: _latest(instance, key, partition) for key in by_key}

    def input_changed(provenance: DataProvenance, parent: AssetKey) -> bool:
        # As Dagster's resolver does for partitioned inputs: the input's materialization it read
        # (its event pointer) against the input's latest one, by data version.
        read_id = provenance.input_storage_ids.get(parent)
        if latest[parent] is None or read_id is None:
            return True
        if latest[parent].storage_id == read_id:
            return False
        read = _latest(instance, parent, partition, before=read_id + 1)
        return read is None or _data_version(read) != _data_version(latest[parent])

    def stale(key: AssetKey) -> bool:
        if latest[key] is None:
            return True
        provenance = DataProvenance.from_tags(latest[key].asset_materialization.tags or {})
        if provenance is None or provenance.code_version != by_key[key].code_versions_by_key[key]:
            return True
        return any(input_changed(provenance, parent) for parent in by_key[key].dependency_keys if parent in by_key)

    requested: set[AssetKey] = set()
    for key in _topological(by_key):
        if stale(key) or any(parent in requested for parent in by_key[key].dependency_keys):
            requested.add(key)
    return [key for key in _topological(by_key) if key in requested]


def _topological(by_key: dict[AssetKey, AssetsDefinition]) -> list[AssetKey]:
    order: list[AssetKey] = []

    def visit(key: AssetKey) -> None:
        if key in order:
            return
        for parent in sorted(by_key[key].dependency_keys & by_key.keys(), key=str):
            visit(parent)
        order.append(key)

    for key in sorted(by_key, key=str):
        visit(key)
    return order


REFRESHED_ASSETS = [*NOLA_ASSETS, *METHOD_ASSETS, *EXPORT_ASSETS]  # nola_job's, judged for staleness


def refresh_requests(instance: DagsterInstance, assets: Sequence[AssetsDefinition], stamp: str) -> list[RunRequest]:
    """One run per dataset partition that has stale assets, selecting the preflight, those and their dependents."""
    requests = []
    for name in instance.get_dynamic_partitions(DATASETS):
        stale = stale_assets(instance, assets, name)
        if stale:
            selection = [preflight.key, *stale]
            requests.append(RunRequest(run_key=f"{name}:refresh:{stamp}", partition_key=name, asset_selection=selection,
                                       tags={"nola/dataset": name, "nola/stale": str(len(stale)),
                                             **max_runtime_tags([preflight, *assets], selection),
                                             **run_pod_tags([preflight, *assets], selection)}))
    return requests


@schedule(
    job=nola_job,
    cron_schedule="0 3 * * 0",
    default_status=DefaultScheduleStatus.STOPPED,
    description="Weekly, per dataset partition: the preflight, then the stale assets (new code version, changed "
    "input data version, never materialized) and what depends on them; nothing for an unchanged dataset.",
)
def full_refresh_schedule(context: ScheduleEvaluationContext):
    stamp = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    return refresh_requests(context.instance, REFRESHED_ASSETS, stamp) or SkipReason("nothing stale in any dataset partition")
