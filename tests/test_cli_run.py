"""`nola run` over two datasets (a backfill over partitions from the CLI) and `nola demo`, on a
project-local Dagster home that `dagster dev` would open."""

import os

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter

from assets_helpers import copy_demo
from nola_core.cli import main
from nola_assets.assets import NOLA_ASSETS
from nola_assets.partitions import DATASETS

FAST = ["--tuning-epochs", "1", "--alignment-epochs", "2"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / ".dagster_home"))
    monkeypatch.setenv("NOLA_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("NOLA_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("NOLA_NUM_WORKERS", "0")
    return tmp_path


def test_run_two_dataset_folders_registers_and_materializes_both(project, capsys):
    elsewhere = project / "elsewhere"
    first = copy_demo(elsewhere, "first", labeled=False)
    second = copy_demo(elsewhere, "second", labeled=False)
    (second / "dataset.yaml").write_text((second / "dataset.yaml").read_text().replace("fashion_mini", "second"))
    (first / "dataset.yaml").write_text((first / "dataset.yaml").read_text().replace("fashion_mini", "first"))

    assert main(["run", str(first), str(second), "--profile", "tiny", *FAST]) == 0
    out = capsys.readouterr().out
    assert "first: every asset materialized" in out and "second: every asset materialized" in out
    assert "no labeled/ folder" in out
    assert (project / "data" / "first").resolve() == first  # linked, not copied
    assert (project / ".dagster_home" / "dagster.yaml").is_file()

    instance = DagsterInstance.from_config(str(project / ".dagster_home"))
    assert sorted(instance.get_dynamic_partitions(DATASETS)) == ["first", "second"]
    runs = instance.get_runs(RunsFilter(job_name="nola_job"))
    assert len(runs) == 2 and all(run.status == DagsterRunStatus.SUCCESS for run in runs)
    assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    for asset in NOLA_ASSETS:
        partitions = instance.get_materialized_partitions(asset.key)
        assert partitions == {"first", "second"}, asset.key


def test_demo_prints_the_stage_table_the_warning_and_the_artifacts(project, capsys):
    assert main(["demo", *FAST]) == 0
    out = capsys.readouterr().out
    assert "NoLA prompt-tuned" in out and "top-k pseudo-labels" in out
    assert "transductive top-1" in out and "held-out top-1" in out  # both splits, named
    assert "mini world" in out and "not the papers' numbers" in out and "randomly initialised" not in out
    assert f"artifacts:    {project / 'artifacts' / 'fashion_blurred_small'}" in out
    assert (project / "data" / "fashion_blurred_small" / "dataset.yaml").is_file()  # a writable copy
    instance = DagsterInstance.from_config(str(project / ".dagster_home"))
    assert instance.get_latest_materialization_event(AssetKey("evaluation")) is not None
    [run] = instance.get_runs()
    assert run.tags["dagster/partition"] == "fashion_blurred_small" and run.tags["nola/launched_by"] == "nola demo"
    resources = run.run_config["resources"]
    assert resources["models"]["config"]["model_profile"] == "mini"
    assert resources["method"]["config"] == {"tuning_epochs": 1, "alignment_epochs": 2}


def test_run_refuses_a_folder_that_is_not_a_dataset(project, capsys):
    (project / "nothing").mkdir()
    assert main(["run", str(project / "nothing"), "--profile", "tiny"]) == 1
    assert "dataset.yaml" in capsys.readouterr().err


def test_dev_starts_dagster_dev_on_the_same_home(project, monkeypatch):
    # `nola dev` sets NOLA_MODEL_PROFILE in this process: set-then-delete records it, so teardown removes it
    # (a bare delenv of an absent variable records nothing, and "tiny" leaked into later tests' resources)
    monkeypatch.setenv("NOLA_MODEL_PROFILE", "")
    monkeypatch.delenv("NOLA_MODEL_PROFILE")
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(argv))
    main(["dev", "-p", "3001", "--profile", "tiny", "--", "--log-level", "debug"])
    [argv] = calls
    assert argv[1:] == ["-m", "dagster", "dev", "-m", "nola_assets.definitions", "-p", "3001", "--log-level", "debug"]
    assert os.environ["DAGSTER_HOME"] == str(project / ".dagster_home")
    assert os.environ["NOLA_MODEL_PROFILE"] == "tiny"
    assert "default_limit: 1" in (project / ".dagster_home" / "dagster.yaml").read_text()
