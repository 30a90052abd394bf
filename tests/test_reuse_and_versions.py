"""Nothing recomputed needlessly, everything recomputed when code changes.

One dataset is materialized once (every asset: the NoLA graph, the other methods, the export) on
one instance. Rerunning it must reuse every finished artifact and run no model; bumping one
asset's code version must recompute that asset and what depends on it, nothing upstream, and the
weekly schedule must request exactly those (nothing at all for the unchanged dataset).
"""

from __future__ import annotations

from collections import Counter

import pytest
from dagster import AssetKey, DagsterInstance, materialize

from assets_helpers import copy_demo, resources_for_test
from nola_assets import alignment_assets, export_assets, feature_assets, method_assets, text_assets, tuning_assets
from nola_assets.partitions import DATASETS
from nola_assets.schedules import REFRESHED_ASSETS, refresh_requests, stale_assets
from nola_core.data import loading
from nola_core.methods import nola as nola_method

DATASET = "reuse_mini"
ALL_ASSETS = REFRESHED_ASSETS  # every asset of nola_job
UNLABELED_IMAGES = 24
LABELED_PER_CLASS = 4
# What computes: model forwards, training, scoring. Wrapped with a counter during the reruns.
WORK = [
    (feature_assets, "on_processes"),  # CLIP / DINO features
    (tuning_assets, "on_processes"),  # prompt tuning
    (alignment_assets, "train_alignment"),
    (text_assets.text_dataset, "text_classifiers"),
    (nola_method, "cde_pseudo_labels"),
    (loading, "tuned_image_features"),
    (nola_method, "stage_predictions"),
    (method_assets, "run_zero_shot"),
    (method_assets, "run_lafter"),
    (method_assets, "run_latteclip"),
    (export_assets, "export_classifier"),
]


def _run(instance, resources, assets, selection=None):
    result = materialize(assets, instance=instance, partition_key=DATASET, resources=resources, selection=selection)
    assert result.success
    return {e.asset_key.path[-1]: {k: v.value for k, v in e.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()}


def _count_work(monkeypatch) -> Counter:
    calls: Counter = Counter()
    for module, name in WORK:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def _bump(assets, name: str) -> list:
    """`assets` with `name`'s code version changed, as a code change with a bumped `version=` would."""
    return [a.map_asset_specs(lambda spec: spec.replace_attributes(code_version="2")) if a.key == AssetKey(name) else a
            for a in assets]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    folder = copy_demo(root / "data", DATASET)
    for path in sorted((folder / "unlabeled").iterdir())[UNLABELED_IMAGES:]:
        path.unlink()
    for class_dir in (folder / "labeled").iterdir():
        for path in sorted(class_dir.iterdir())[LABELED_PER_CLASS:]:
            path.unlink()
    resources = resources_for_test(root / "data", root / "artifacts")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASETS, [DATASET])
    first = _run(instance, resources, ALL_ASSETS)
    assert not any(m["reused"] for m in first.values())
    return instance, resources


def test_rerunning_an_unchanged_dataset_recomputes_nothing(built, monkeypatch):
    instance, resources = built
    store = resources["artifacts"]
    before = {a.key.path[-1]: store.require_ref(a.key.path[-1], DATASET).digest for a in ALL_ASSETS}
    assert stale_assets(instance, ALL_ASSETS, DATASET) == []
    assert refresh_requests(instance, ALL_ASSETS, "week") == []  # the weekly refresh requests no run

    calls = _count_work(monkeypatch)
    again = _run(instance, resources, ALL_ASSETS)
    assert set(again) == set(before)
    assert {name: m["reused"] for name, m in again.items()} == {name: True for name in before}
    assert sum(calls.values()) == 0, calls  # no model ran, nothing was trained or scored
    assert {name: store.require_ref(name, DATASET).digest for name in before} == before
    assert stale_assets(instance, ALL_ASSETS, DATASET) == []


def test_a_new_code_version_recomputes_that_asset_and_what_depends_on_it(built, monkeypatch):
    instance, resources = built
    store = resources["artifacts"]
    bumped = _bump(ALL_ASSETS, "alignment_checkpoint")
    downstream = {"alignment_checkpoint", "prompt_tuned_encoder", "predictions", "evaluation",
                  "exported_classifier", "method_comparison"}
    assert {k.path[-1] for k in stale_assets(instance, bumped, DATASET)} == downstream
    [request] = refresh_requests(instance, bumped, "week")
    assert {k.path[-1] for k in request.asset_selection} == downstream | {"preflight"} and request.partition_key == DATASET
    old = store.require_ref("alignment_checkpoint", DATASET)

    calls = _count_work(monkeypatch)
    result = _run(instance, resources, bumped)
    assert {name for name, m in result.items() if not m["reused"]} == downstream
    assert calls["train_alignment"] == 1 and calls["run_lafter"] == calls["run_latteclip"] == 0
    new = store.require_ref("alignment_checkpoint", DATASET)
    assert new.digest != old.digest and new.key["code_version"] == "2"
    assert old.file("ref.json").is_file()  # the old version's folder is left as it was, not overwritten
    assert stale_assets(instance, bumped, DATASET) == []


def test_a_new_feature_code_version_starts_a_fresh_table(built):
    instance, resources = built
    store = resources["artifacts"]
    old = store.require_ref("clip_features", DATASET)
    bumped = _bump(ALL_ASSETS, "clip_features")
    result = _run(instance, resources, bumped, selection=[AssetKey("clip_features")])
    metadata = result["clip_features"]
    assert metadata["reused"] is False
    assert metadata["rows_reused"] == 0 and metadata["computed"] == metadata["images"] > 0  # no row of the old code
    assert store.require_ref("clip_features", DATASET).digest != old.digest
