"""A run reads the artifacts of its own upstream materializations, not the latest `refs/` pointer.

Three toy assets on the real `ArtifactRefIOManager`: `upstream` stores a value, `mover` (between
`upstream` and `downstream` in the run) materializes `upstream` again in another run with another
value, moving the `refs/` pointer and recording a newer materialization mid-run, and `downstream`
reads `upstream`. Whether `upstream` ran in the same run or before it, `downstream` must read the
value this run depended on.
"""

from dagster import AssetExecutionContext, MaterializeResult, StaticPartitionsDefinition, asset, instance_for_test, materialize

from nola_assets.artifacts import ArtifactRef, ArtifactRefIOManager, ArtifactStore
from nola_assets.common import REFS_IO_MANAGER

PARTITION = "toy"
partitions = StaticPartitionsDefinition([PARTITION])
upstream_value = {"value": "ours"}  # what the next `upstream` materialization stores


def _stored(store: ArtifactStore, asset_name: str, value: str) -> MaterializeResult:
    ref = store.allocate(asset_name, PARTITION, {"value": value})
    store.write_json(ref, "value.json", value)
    return MaterializeResult(value=ref, metadata={"artifact_digest": ref.digest})


@asset(partitions_def=partitions, io_manager_key=REFS_IO_MANAGER)
def upstream(artifacts: ArtifactStore) -> MaterializeResult:
    return _stored(artifacts, "upstream", upstream_value["value"])


@asset(partitions_def=partitions, io_manager_key=REFS_IO_MANAGER, deps=[upstream])
def mover(context: AssetExecutionContext, artifacts: ArtifactStore) -> MaterializeResult:
    """Another run of the same partition materializes `upstream` while this run is between steps."""
    upstream_value["value"] = "theirs"
    other = materialize([upstream], instance=context.instance, partition_key=PARTITION, resources=_resources(artifacts))
    assert other.success
    return _stored(artifacts, "mover", "moved")


@asset(partitions_def=partitions, io_manager_key=REFS_IO_MANAGER, deps=[mover])
def downstream(artifacts: ArtifactStore, upstream: ArtifactRef) -> MaterializeResult:
    return _stored(artifacts, "downstream", artifacts.read_json(upstream, "value.json"))


def _resources(store: ArtifactStore) -> dict:
    return {"artifacts": store, REFS_IO_MANAGER: ArtifactRefIOManager(store=store)}


def _read(store: ArtifactStore, asset_name: str) -> str:
    return store.read_json(store.require_ref(asset_name, PARTITION), "value.json")


def test_upstream_materialized_in_the_same_run(tmp_path):
    store = ArtifactStore(artifact_root=str(tmp_path))
    upstream_value["value"] = "ours"
    with instance_for_test() as instance:
        result = materialize([upstream, mover, downstream], instance=instance, partition_key=PARTITION,
                             resources=_resources(store))
    assert result.success
    assert _read(store, "upstream") == "theirs"  # the pointer was moved mid-run
    assert _read(store, "downstream") == "ours"


def test_upstream_materialized_before_the_run(tmp_path):
    store = ArtifactStore(artifact_root=str(tmp_path))
    upstream_value["value"] = "ours"
    with instance_for_test() as instance:
        assert materialize([upstream], instance=instance, partition_key=PARTITION, resources=_resources(store)).success
        result = materialize([upstream, mover, downstream], selection=[mover, downstream], instance=instance,
                             partition_key=PARTITION, resources=_resources(store))
    assert result.success
    assert _read(store, "upstream") == "theirs"  # a newer materialization, recorded after this run started
    assert _read(store, "downstream") == "ours"
