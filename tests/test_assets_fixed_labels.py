"""`fixed_pseudo_labels` (MethodResource, env NOLA_FIXED_PSEUDO_LABELS; NoLA's default) reaches
prompt tuning in the graph.

The labels then come from the stored DINO features, so the DINO feature artifact enters the
tuned encoder's key; with per-view labels (`fixed_pseudo_labels=False`) it does not (DINO runs
live on each weak view).
"""

from dagster import AssetKey, AssetSelection

from assets_helpers import copy_demo, materialize_partition, resources_for_test
from nola_assets.common import TRAINABLE_FILE
from nola_assets.tuning_assets import prompt_tuned_encoder
from nola_assets.resources import MethodResource

DATASET = "fixed"


def _tune(resources, selection):
    result = materialize_partition(resources, selection, DATASET)
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey("prompt_tuned_encoder")]
    store = resources["artifacts"]
    ref = store.require_ref("prompt_tuned_encoder", DATASET)
    return ref, store.read_tensors(ref, TRAINABLE_FILE), event.materialization.metadata


def test_fixed_pseudo_labels_flag_trains_from_the_stored_dino_features(tmp_path):
    copy_demo(tmp_path / "data", DATASET, labeled=False)
    settings = dict(tuning_epochs=1, tuning_batch_size=16, micro_batch_size=8)
    resources = resources_for_test(tmp_path / "data", tmp_path / "artifacts", fixed_pseudo_labels=False, **settings)
    per_view, per_view_tensors, per_view_meta = _tune(resources, AssetSelection.assets(prompt_tuned_encoder).upstream())
    assert "dino_features" not in per_view.key and per_view_meta["pseudo_labels_per"].value == "weak view"

    resources["method"] = MethodResource(fixed_pseudo_labels=True, **settings)
    fixed, fixed_tensors, fixed_meta = _tune(resources, [prompt_tuned_encoder])
    store = resources["artifacts"]
    dino = store.require_ref("dino_features", DATASET)
    assert fixed.key["dino_features"] == dino.digest and fixed.key["tuning"]["fixed_pseudo_labels"] is True
    assert fixed.digest != per_view.digest
    assert fixed_meta["pseudo_labels_per"].value.startswith("image")
    assert max((fixed_tensors[n] - per_view_tensors[n]).abs().max().item() for n in fixed_tensors) > 1e-6

