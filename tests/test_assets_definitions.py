"""The code location: it validates from workspace.yaml, and its shape tells the method's story."""

import os
import subprocess
import sys
from pathlib import Path

from dagster import AssetKey, DefaultScheduleStatus

from nola_assets.definitions import defs
from nola_assets.assets import NOLA_ASSETS
from nola_assets.common import GPU_POOL
from nola_assets.schedules import full_refresh_schedule

REPO = Path(__file__).resolve().parents[1]


def test_dagster_definitions_validate_passes(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Validation successful for code location nola" in result.stdout + result.stderr


def test_graph_groups_pools_and_partitions():
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {"dataset_manifest", "class_descriptions", "cde_classifier", "clip_features", "dino_features",
            "cde_pseudo_labels", "alignment_checkpoint", "prompt_tuned_encoder", "predictions", "evaluation"} <= keys
    assert {"zero_shot_classifier", "lafter_encoder", "latteclip_texts", "latteclip_encoder",
            "method_comparison"} <= keys
    assert graph.get(AssetKey("method_comparison")).parent_keys == {
        AssetKey(k) for k in ("zero_shot_classifier", "lafter_encoder", "latteclip_encoder", "evaluation")}
    assert graph.get(AssetKey("alignment_checkpoint")).parent_keys == {AssetKey("cde_pseudo_labels"),
                                                                        AssetKey("dino_features")}
    for asset in NOLA_ASSETS:
        assert asset.partitions_def.name == "datasets"
        assert asset.descriptions_by_key[asset.key]
    pools = {asset.key.path[-1] for asset in NOLA_ASSETS if asset.op.pool == GPU_POOL}
    assert pools == {"cde_classifier", "clip_features", "dino_features", "alignment_checkpoint",
                     "prompt_tuned_encoder", "predictions"}
    assert full_refresh_schedule.default_status == DefaultScheduleStatus.STOPPED
    assert {s.name for s in defs.sensors} == {"unlabeled_images_sensor"}


def test_resource_help_names_each_variable_and_the_core_default():
    """Field descriptions are built from the core configs (`resources.env_field`): a default typed
    into the text could drift from the value the code takes."""
    from nola_core.alignment import AlignmentConfig
    from nola_core.features import FeatureConfig
    from nola_core.methods.nola import nola_tuning_config
    from nola_core.runtime import ComputeSettings

    from nola_assets import resources

    for resource in (resources.ComputeResource, resources.ModelsResource, resources.MethodResource,
                     resources.DescriptionsResource, resources.DatasetsResource):
        for name, field in resource.model_fields.items():
            assert f"env {resources.env_name(name)}" in field.description, (resource.__name__, name)
    expected = [(resources.ComputeResource, "batch_size", FeatureConfig().batch_size)]
    expected += [(resources.ComputeResource, field, getattr(ComputeSettings(), field))
                 for field in ("num_workers", "precision")]
    expected += [(resources.MethodResource, field, getattr(AlignmentConfig(), core))
                 for field, core in resources._ALIGNMENT_FIELDS.items()]
    expected += [(resources.MethodResource, field, getattr(nola_tuning_config(), core))
                 for field, core in resources._TUNING_FIELDS.items()]
    for resource, field, default in expected:
        description = resource.model_fields[field].description
        if default is None:
            assert "default" not in description, (field, description)
        else:
            assert f"; default {default})" in description or f"; default {default};" in description, (field, description)
