"""dino_features after images land or leave: only new images are computed, removed ones drop out."""

from dagster import AssetKey, DagsterInstance, materialize

from assets_helpers import copy_demo, new_image, resources_for_test
from nola_core.features import load_feature_table
from nola_assets.assets import NOLA_ASSETS, dataset_manifest, dino_features
from nola_assets.partitions import DATASETS


def _dino_metadata(result) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey("dino_features")]
    return {key: value.value for key, value in event.materialization.metadata.items()}


def test_only_new_images_get_features_and_removed_ones_drop_out(tmp_path):
    unlabeled = copy_demo(tmp_path / "data", "inc", labeled=False) / "unlabeled"
    resources = resources_for_test(tmp_path / "data", tmp_path / "artifacts")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASETS, ["inc"])

    def run():
        result = materialize(NOLA_ASSETS, selection=[dataset_manifest, dino_features], instance=instance,
                             partition_key="inc", resources=resources)
        ref = resources["artifacts"].require_ref("dino_features", "inc")
        return _dino_metadata(result), load_feature_table(ref.file("features.safetensors")), ref

    first, first_table, first_ref = run()
    assert (first["computed"], first["rows_reused"], first["images"]) == (120, 0, 120)

    new_image(unlabeled / "zz_new.png", seed=7)
    removed = sorted(unlabeled.iterdir())[:2]
    for path in removed:
        path.unlink()
    second, second_table, second_ref = run()
    assert (second["computed"], second["rows_reused"], second["images"]) == (1, 118, 119)
    assert second_ref.digest != first_ref.digest  # the image set is part of the key
    kept = [i for i in first_table.ids if i in set(second_table.ids)]
    assert len(kept) == 118
    assert (second_table.rows_for(kept) == first_table.rows_for(kept)).all()  # reused rows, bit for bit

    third, _, third_ref = run()  # nothing changed: nothing computed, same artifact
    assert third["computed"] == 0 and third_ref.digest == second_ref.digest
