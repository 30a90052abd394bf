"""The weekly refresh requests the preflight with the stale assets of a dataset, so a run it
starts checks weights, LLM key and disk first, as the sensor's runs do. (That an unchanged dataset
gets no run, the preflight included, and a new code version gets exactly its dependents:
tests/test_reuse_and_versions.py.)"""

from dagster import DagsterInstance
from dagster._core.storage.tags import MAX_RUNTIME_SECONDS_TAG

from nola_assets.partitions import DATASETS
from nola_assets.preflight_asset import preflight
from nola_assets.run_limits import max_runtime_tags
from nola_assets.schedules import REFRESHED_ASSETS, refresh_requests
from nola_assets.sensors import JOB_ASSETS


def test_a_refresh_run_selects_the_preflight_with_the_stale_assets():
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASETS, ["never_run"])  # nothing materialized: every asset is stale
    [request] = refresh_requests(instance, REFRESHED_ASSETS, "week")
    assert request.partition_key == "never_run"
    assert set(request.asset_selection) == {preflight.key} | {a.key for a in REFRESHED_ASSETS}
    assert preflight.key not in {a.key for a in REFRESHED_ASSETS}  # never judged stale itself: it alone makes no run
    assert request.tags[MAX_RUNTIME_SECONDS_TAG] == max_runtime_tags(JOB_ASSETS)[MAX_RUNTIME_SECONDS_TAG]
