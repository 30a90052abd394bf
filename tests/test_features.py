"""Feature extraction: deterministic order, float16, keyed by image id, unreadable files reported."""

import shutil

import torch

from nola_core.data import build_manifest, eval_transform, load_dataset_spec
from nola_core.demo import demo_dataset_path
from nola_core.features import FeatureConfig, extract_features, load_feature_table, save_feature_table
from nola_core.models import ModelConfig, load_dino
from nola_core.runtime import ComputeSettings


def test_features_are_float16_in_manifest_order_and_skip_vanished_files(tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(demo_dataset_path(), root)
    spec = load_dataset_spec(root)
    manifest = build_manifest(spec, "unlabeled")
    records = manifest.records[:20]
    (root / records[3].path).unlink()  # deleted after the manifest was built
    (root / records[7].path).write_bytes(b"not an image any more")
    dino = load_dino(ModelConfig.from_profile("tiny"))
    transform = eval_transform(dino.preprocess)

    table = extract_features(dino.encode_image, root, records, transform,
                             FeatureConfig(batch_size=6,
                                           compute=ComputeSettings(num_workers=2, precision="fp32")), device="cpu")
    assert table.features.dtype == torch.float16
    assert table.features.shape == (18, dino.feature_dim)
    assert set(table.failed) == {records[3].image_id, records[7].image_id}
    assert list(table.ids) == [r.image_id for i, r in enumerate(records) if i not in (3, 7)]

    single = extract_features(dino.encode_image, root, records, transform,
                              FeatureConfig(batch_size=20,
                                            compute=ComputeSettings(num_workers=0, precision="fp32")), device="cpu")
    assert single.ids == table.ids
    assert torch.allclose(single.features.float(), table.features.float(), atol=1e-3)
    with torch.no_grad():
        from nola_core.data import load_rgb

        direct = dino.encode_image(transform(load_rgb(root / records[0].path))[None])
    assert torch.allclose(table.rows_for([records[0].image_id]).float(), direct, atol=1e-2)

    path = tmp_path / "features.safetensors"
    save_feature_table(table, path)
    loaded = load_feature_table(path)
    assert loaded.ids == table.ids and loaded.failed == table.failed
    assert torch.equal(loaded.features, table.features)
    assert not list(tmp_path.glob(".*.tmp"))
