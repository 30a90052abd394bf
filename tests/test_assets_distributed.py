"""clip_features, dino_features and prompt_tuned_encoder with `nproc_per_node=2` (two gloo CPU
processes spawned by the assets) give what one process gives.

Tolerances, as in tests/test_distributed.py: features are stored in float16, and each rank
encodes other batches than one process does, so a row may differ by float rounding:
max |difference| <= 2e-3 (measured: 0). Tuned tensors: every optimizer step sees the same images
with the same augmentations whatever the split; only the summation order of the gradient
differs: max |difference| <= 1e-5 (lr 1.0 scaled to the 6-image step: 1.2e-2; measured: 1.3e-7).
The effective batch (6) is not a multiple of micro-batch × processes (2 × 2): with a step size
that depended on the process count (4 images per step with two), the difference was 0.04. The upstream artifacts of the two-process run are copies of
the one-process run's, so both tunings have the same inputs.
"""

import shutil
import time

import pytest
import torch
from dagster import AssetKey, AssetSelection

from assets_helpers import copy_demo, materialize_partition, resources_for_test
from nola_core.features import load_feature_table
from nola_assets.common import FEATURES_FILE, TRAINABLE_FILE
from nola_assets.feature_assets import clip_features, dino_features
from nola_assets.tuning_assets import prompt_tuned_encoder
from nola_assets.resources import ComputeResource, env_name

NPROC_ENV = "NOLA_NPROC_PER_NODE"  # the documented environment variable of `nproc_per_node`

FEATURE_TOLERANCE = 2e-3
TRAINED_TOLERANCE = 1e-5
NUM_IMAGES = 23  # odd: the last step splits unevenly over two ranks
DATASET = "ddp"
FEATURES = ("clip_features", "dino_features")


def _metadata(result, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(asset)]
    return {key: value.value for key, value in event.materialization.metadata.items()}


def _resources(data, artifacts, processes: int) -> dict:
    resources = resources_for_test(data, artifacts, tuning_epochs=1, tuning_batch_size=6,
                                   micro_batch_size=2, tuning_lr=1.0)
    resources["compute"] = ComputeResource(device="cpu", num_workers=0, nproc_per_node=processes)
    return resources


def test_two_processes_give_the_features_and_tuned_tensors_of_one(tmp_path):
    unlabeled = copy_demo(tmp_path / "data", DATASET, labeled=False) / "unlabeled"
    for path in sorted(unlabeled.iterdir())[NUM_IMAGES:]:
        path.unlink()
    one = _resources(tmp_path / "data", tmp_path / "one", processes=1)
    materialize_partition(one, AssetSelection.assets(prompt_tuned_encoder).upstream(), DATASET)
    shutil.copytree(tmp_path / "one", tmp_path / "two")  # the store is relocatable
    two = _resources(tmp_path / "data", tmp_path / "two", processes=2)
    single, store = one["artifacts"], two["artifacts"]

    # Switching 1 -> 2 processes recomputes nothing: the process count is not in the feature key.
    reused = materialize_partition(two, [clip_features, dino_features], DATASET)
    for asset in FEATURES:
        assert _metadata(reused, asset)["computed"] == 0
        assert store.require_ref(asset, DATASET).digest == single.require_ref(asset, DATASET).digest

    # Without the previous tables and tuned tensors (finished artifacts are reused), every image is
    # encoded by the two processes, then tuned on them.
    for asset in (*FEATURES, "prompt_tuned_encoder"):
        shutil.rmtree(store.require_ref(asset, DATASET).path)
        store.ref_path(asset, DATASET).unlink()
    started = time.perf_counter()
    result = materialize_partition(two, [clip_features, dino_features, prompt_tuned_encoder], DATASET)
    print(f"two-process features + tuning: {time.perf_counter() - started:.1f} s")
    for asset in FEATURES:
        assert _metadata(result, asset)["computed"] == NUM_IMAGES
        ours = load_feature_table(store.require_ref(asset, DATASET).file(FEATURES_FILE))
        theirs = load_feature_table(single.require_ref(asset, DATASET).file(FEATURES_FILE))
        assert ours.ids == theirs.ids and len(ours) == NUM_IMAGES
        difference = (ours.features.float() - theirs.features.float()).abs().max().item()
        print(f"{asset}: max |difference| {difference:.3g}")
        assert difference <= FEATURE_TOLERANCE

    tuned, reference = (s.require_ref("prompt_tuned_encoder", DATASET) for s in (store, single))
    assert tuned.digest == reference.digest  # same inputs and config: same key, whatever the process count
    ours, theirs = store.read_tensors(tuned, TRAINABLE_FILE), single.read_tensors(reference, TRAINABLE_FILE)
    assert set(ours) == set(theirs)
    difference = max((ours[name] - theirs[name]).abs().max().item() for name in ours)
    print(f"tuned tensors: max |difference| {difference:.3g}")
    assert difference <= TRAINED_TOLERANCE
    assert _metadata(result, "prompt_tuned_encoder")["training_images"] == NUM_IMAGES


def test_nproc_per_node_is_read_from_its_variable_and_checked(monkeypatch):
    assert env_name("nproc_per_node") == NPROC_ENV
    assert ComputeResource(device="cpu").processes() == 1
    monkeypatch.setenv(NPROC_ENV, "3")
    assert ComputeResource(device="cpu").processes() == 3
    assert ComputeResource(device="cpu", nproc_per_node=2).processes() == 2  # run config wins
    monkeypatch.setenv(NPROC_ENV, "0")
    with pytest.raises(ValueError, match=f"nproc_per_node=0 \\(env {NPROC_ENV}\\): must be at least 1"):
        ComputeResource(device="cpu").processes()
    monkeypatch.setenv(NPROC_ENV, "two")
    with pytest.raises(ValueError, match=f"{NPROC_ENV}='two': expected int"):
        ComputeResource(device="cpu").processes()


def test_nproc_per_node_on_cuda_is_one_process_per_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ComputeResource(device="cuda", nproc_per_node=2).processes() == 2
    assert ComputeResource(device="cuda", nproc_per_node=2).rank_device() == "auto"
    with pytest.raises(ValueError, match="more processes than the 2 visible GPU"):
        ComputeResource(device="auto", nproc_per_node=3).processes()
    with pytest.raises(ValueError, match="each process takes its own GPU"):
        ComputeResource(device="cuda:1", nproc_per_node=2).processes()
