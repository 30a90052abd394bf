"""The export gate: a run started by a sensor or a schedule does not export a tuned model that is
worse than zero-shot; the override (`NOLA_EXPORT_WORSE_THAN_ZERO_SHOT=allow`) and a run a person
started do. The check `tuned_not_worse_than_zero_shot` judges the evaluation materialization it
checks, not whatever the refs/ pointer says now.

The graph is built once on a small labelled copy of the demo; then the evaluation artifact's
figures are rewritten so that tuning lost on the comparison split (tiny random models give noise,
so the loss is set in the data rather than hoped for).
"""

from __future__ import annotations

import polars as pl
import pytest
from dagster import AssetCheckKey, AssetKey, AssetSelection, DagsterInstance, materialize

from assets_helpers import copy_demo, resources_for_test
from nola_assets.artifacts import ArtifactRefIOManager
from nola_assets.assets import NOLA_ASSETS, evaluation
from nola_assets.common import METHOD_EVALUATION_FILE, REFS_IO_MANAGER
from nola_assets.checks import export_blocked, tuned_not_worse_than_zero_shot
from nola_assets.export_assets import EXPORT_ASSET, EXPORT_ASSETS, exported_classifier
from nola_assets.partitions import DATASETS
from nola_assets.resources import MethodResource
from nola_core.eval import HELD_OUT, comparison_split, split_column
from nola_core.stage_names import NOLA_TUNED_STAGE, ZERO_SHOT_STAGE

DATASET = "gate_mini"
ASSETS = [*NOLA_ASSETS, *EXPORT_ASSETS, tuned_not_worse_than_zero_shot]
CHECK = AssetCheckKey(AssetKey("evaluation"), "tuned_not_worse_than_zero_shot")
SENSOR_RUN = {"dagster/sensor_name": "unlabeled_images_sensor"}


def _run(instance, resources, selection, tags=None):
    return materialize(ASSETS, instance=instance, partition_key=DATASET, resources=resources, selection=selection,
                       tags=tags, raise_on_error=False)


def _check_result(result):
    [evaluated] = [e.event_specific_data for e in result.all_events
                   if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert evaluated.asset_check_key == CHECK
    return evaluated


def _with_figures(frame: pl.DataFrame, tuned: float, zero_shot: float) -> pl.DataFrame:
    column = split_column(comparison_split(frame), "top1")
    return frame.with_columns(
        pl.when(pl.col("stage") == NOLA_TUNED_STAGE).then(pl.lit(tuned))
        .when(pl.col("stage") == ZERO_SHOT_STAGE).then(pl.lit(zero_shot))
        .otherwise(pl.col(column)).alias(column))


@pytest.fixture(scope="module")
def tuning_lost(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    folder = copy_demo(root / "data", DATASET)
    for path in sorted((folder / "unlabeled").iterdir())[24:]:
        path.unlink()
    for class_dir in (folder / "labeled").iterdir():
        for path in sorted(class_dir.iterdir())[4:]:
            path.unlink()
    resources = resources_for_test(root / "data", root / "artifacts")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASETS, [DATASET])
    assert _run(instance, resources, AssetSelection.assets(*NOLA_ASSETS)).success
    store = resources["artifacts"]
    ref = store.require_ref("evaluation", DATASET)
    table = store.read_table(ref, METHOD_EVALUATION_FILE)
    assert comparison_split(table) == HELD_OUT
    store.write_table(ref, METHOD_EVALUATION_FILE, _with_figures(table, tuned=0.25, zero_shot=0.75))
    return instance, resources


def test_a_sensor_started_run_does_not_export_a_tuned_model_worse_than_zero_shot(tuning_lost):
    instance, resources = tuning_lost
    result = _run(instance, resources, AssetSelection.assets(evaluation, exported_classifier), tags=SENSOR_RUN)
    assert not result.success
    assert AssetKey(EXPORT_ASSET) not in {e.asset_key for e in result.get_asset_materialization_events()}
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert failure.step_key == EXPORT_ASSET and "not exported" in str(failure.event_specific_data.error)
    check = _check_result(result)
    assert not check.passed and check.severity.value == "ERROR" and check.metadata["blocks_export"].value is True


@pytest.mark.parametrize("how", ["resource", "environment", "manual run"])
def test_the_override_or_a_person_exports_it_with_the_verdict_in_metadata(tuning_lost, monkeypatch, how):
    instance, resources = tuning_lost
    tags = SENSOR_RUN
    if how == "resource":
        resources = {**resources, "method": MethodResource(export_worse_than_zero_shot="allow")}
    elif how == "environment":
        monkeypatch.setenv("NOLA_EXPORT_WORSE_THAN_ZERO_SHOT", "allow")
    else:
        tags = None
    result = _run(instance, resources, AssetSelection.assets(exported_classifier), tags=tags)
    assert result.success
    [event] = result.get_asset_materialization_events()
    assert event.asset_key == AssetKey(EXPORT_ASSET)
    assert event.materialization.metadata["tuned_not_worse_than_zero_shot"].value is False


def test_only_runs_nobody_started_by_hand_are_gated():
    assert export_blocked({"dagster/schedule_name": "full_refresh_schedule"}, "block")
    assert export_blocked(SENSOR_RUN, "block")
    assert not export_blocked({}, "block") and not export_blocked(SENSOR_RUN, "allow")
    with pytest.raises(ValueError, match="NOLA_EXPORT_WORSE_THAN_ZERO_SHOT"):
        export_blocked(SENSOR_RUN, "warn")


class AnotherRunMovesThePointer(ArtifactRefIOManager):
    """Stores refs as usual, then, right after `evaluation`'s, points refs/ at another evaluation
    artifact, as a second run of the partition finishing in between would."""

    other_digest: str

    def handle_output(self, context, obj) -> None:
        super().handle_output(context, obj)
        if obj.asset == "evaluation":
            self.store.save_ref(self.store.ref_at("evaluation", obj.dataset, self.other_digest))


def test_the_check_reads_the_materialization_it_checks_not_the_latest_ref(tuning_lost):
    instance, resources = tuning_lost
    store = resources["artifacts"]
    checked = store.require_ref("evaluation", DATASET)
    other = store.allocate("evaluation", DATASET, {"another": "run"})  # an evaluation in which tuning won
    store.write_table(other, METHOD_EVALUATION_FILE,
                      _with_figures(store.read_table(checked, METHOD_EVALUATION_FILE), tuned=0.75, zero_shot=0.25))
    store.save_ref(other)
    try:
        moving = {**resources, REFS_IO_MANAGER: AnotherRunMovesThePointer(store=store, other_digest=other.digest)}
        result = _run(instance, moving, AssetSelection.assets(evaluation))
        assert store.require_ref("evaluation", DATASET).digest == other.digest  # the pointer did move
        check = _check_result(result)
        assert not check.passed and check.metadata["tuned_top1"].value == 0.25
    finally:
        store.save_ref(checked)
