"""The preflight: a run that cannot finish fails in seconds, in a few lines that name the fix,
before any Dagster run exists."""

import dataclasses
import shutil
import socket
import time
from pathlib import Path

import huggingface_hub.constants
import open_clip  # noqa: F401  (imported here so the timed call measures the check, not the import)
import pytest
import timm  # noqa: F401

from nola_core.cli import main
from nola_core.demo import demo_dataset_path
from nola_core.models import ModelConfig
from nola_core.preflight import (
    Environment,
    any_host_reachable,
    check_descriptions,
    check_disk,
    check_models,
    feature_dims,
    feature_table_bytes,
    image_count,
    preflight,
)
from nola_core.data import load_dataset_spec

PAPER = ModelConfig.from_profile("paper")


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Empty weight caches (Hugging Face hub, torch hub, ~/.cache/clip)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def _env(online=False, offline=False, free=10**12, **environ) -> Environment:
    if offline:
        environ["HF_HUB_OFFLINE"] = "1"
    return Environment(environ=environ, reachable=lambda hosts: online, free_bytes=lambda path: free)


def test_offline_paper_run_without_weights_stops_at_once_naming_the_fix(no_weights, monkeypatch, capsys):
    project = no_weights / "project"
    shutil.copytree(demo_dataset_path(), project / "photos")
    monkeypatch.chdir(project)
    monkeypatch.setenv("DAGSTER_HOME", str(project / ".dagster_home"))
    monkeypatch.setenv("NOLA_DATA_ROOT", str(project / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    started = time.perf_counter()
    status = main(["run", "photos", "--profile", "paper"])
    elapsed = time.perf_counter() - started

    err = capsys.readouterr().err
    assert status == 1 and elapsed < 10, elapsed
    assert "NOLA_CLIP_CHECKPOINT" in err and "NOLA_DINO_CHECKPOINT" in err and "HF_HUB_OFFLINE" in err
    assert "nola weights download --clip ViT-B-16:openai" in err and "--dino vit_base_patch16_224.dino" in err
    assert "NOLA_WEIGHTS_DIR" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 6, err
    assert not (project / ".dagster_home").exists() and not (project / "data").exists()  # no run, no partition


def test_the_dagster_graph_fails_at_the_preflight_step_and_runs_nothing_after_it(no_weights, monkeypatch):
    from dagster import DagsterInstance, materialize

    from nola_assets.assets import NOLA_ASSETS
    from nola_assets.partitions import DATASETS
    from nola_assets.preflight_asset import preflight as preflight_asset
    from nola_assets.resources import ModelsResource
    from assets_helpers import copy_demo, resources_for_test

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    copy_demo(no_weights / "data", "photos")
    resources = {**resources_for_test(no_weights / "data", no_weights / "artifacts"),
                 "models": ModelsResource(model_profile="paper")}
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASETS, ["photos"])
    result = materialize([preflight_asset, *NOLA_ASSETS], instance=instance, partition_key="photos",
                         resources=resources, raise_on_error=False)

    assert not result.success
    assert preflight_asset.op.pool is None  # never waits behind (or holds) the GPU slot
    [failure] = result.get_step_failure_events()
    assert failure.step_key == "preflight"
    message = failure.step_failure_data.error.message
    assert "nola weights download --clip ViT-B-16:openai" in message and "NOLA_WEIGHTS_DIR" in message
    assert result.get_asset_materialization_events() == []  # nothing downstream ran
    assert {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"} == {"preflight"}


def test_weights_in_the_hub_cache_or_reachable_pass(no_weights):
    assert [p.what for p in check_models(PAPER, _env(offline=True))] == [
        "CLIP ViT-B-16 / openai", "DINO vit_base_patch16_224.dino"]
    assert check_models(PAPER, _env(online=True)) == []  # downloadable
    unreachable = check_models(PAPER, _env(online=False))
    assert len(unreachable) == 2 and "huggingface.co" in unreachable[0].why

    # open_clip's and timm's files in the Hugging Face cache layout: found offline.
    for repo, name in [("timm/vit_base_patch16_clip_224.openai", "open_clip_model.safetensors"),
                       ("timm/vit_base_patch16_224.dino", "model.safetensors")]:
        folder = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
        (folder / "snapshots" / ("0" * 40) / name).write_bytes(b"weights")
    assert check_models(PAPER, _env(offline=True)) == []


def test_the_network_probe_answers_within_its_bound():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        open_port = server.getsockname()[1]
        assert any_host_reachable(["no-such-host.invalid", "127.0.0.1"], timeout_s=2, port=open_port)
    started = time.perf_counter()
    assert not any_host_reachable(["no-such-host.invalid", "127.0.0.1"], timeout_s=2, port=open_port)  # closed
    assert time.perf_counter() - started < 2.5


def test_checkpoint_paths_random_models_and_unknown_tags(tmp_path):
    missing = dataclasses.replace(PAPER, clip_checkpoint=str(tmp_path / "nope.pt"), dino_checkpoint=None)
    [problem] = [p for p in check_models(missing, _env(online=True))]
    assert "nope.pt" in problem.why and "NOLA_CLIP_CHECKPOINT" in problem.fix
    (tmp_path / "clip.pt").write_bytes(b"x")
    (tmp_path / "dino.pt").write_bytes(b"x")
    given = dataclasses.replace(PAPER, clip_checkpoint=str(tmp_path / "clip.pt"), dino_checkpoint=str(tmp_path / "dino.pt"))
    assert check_models(given, _env(offline=True)) == []
    assert check_models(ModelConfig.from_profile("tiny"), _env(offline=True)) == []
    [tag] = check_models(dataclasses.replace(PAPER, clip_pretrained="no-such-tag"), _env(online=True))
    assert "openai" in tag.fix and "NOLA_CLIP_PRETRAINED" in tag.fix


def test_llm_key_only_for_a_named_provider():
    spec = load_dataset_spec(demo_dataset_path())
    [problem] = check_descriptions("anthropic", spec, _env())
    assert "ANTHROPIC_API_KEY" in problem.fix
    assert check_descriptions("anthropic", spec, _env(ANTHROPIC_API_KEY="k")) == []
    assert "OPENAI_API_KEY" in check_descriptions("openai", spec, _env())[0].fix
    assert check_descriptions("auto", spec, _env()) == check_descriptions("dataset", spec, _env()) == []


def test_disk_estimate_from_images_dims_and_tables(tmp_path):
    spec = load_dataset_spec(demo_dataset_path())
    images = image_count(spec)
    assert images == sum(1 for p in (spec.root).rglob("*.png") if "labeled" in p.parts or "unlabeled" in p.parts)
    tiny = ModelConfig.from_profile("tiny")
    clip_dim, dino_dim = feature_dims(tiny)
    needed = feature_table_bytes(images, [clip_dim, clip_dim, dino_dim])
    assert needed == images * (2 * clip_dim + dino_dim) * 2 * 2  # float16, written beside the old table
    assert check_disk(tmp_path, needed, _env(free=needed)) == []
    [problem] = check_disk(tmp_path, needed, _env(free=needed - 1))
    assert "NOLA_ARTIFACT_ROOT" in problem.fix
    assert [p.what for p in preflight([spec.root], tiny, tmp_path, clip_tables=2, env=_env(free=needed - 1))] == [
        f"disk under {tmp_path}"]
    assert preflight([spec.root], tiny, tmp_path, clip_tables=2, env=_env(free=needed)) == []


def test_a_folder_that_is_not_a_dataset_points_to_nola_init(tmp_path):
    [problem] = preflight([tmp_path], ModelConfig.from_profile("tiny"), tmp_path, env=_env())
    assert "dataset.yaml" in problem.why and "nola init" in problem.fix
