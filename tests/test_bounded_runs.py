"""Bounded runs: a run past its `dagster/max_runtime` is failed by Dagster's own run monitoring and
its `gpu` slot freed; every instance file enables monitoring; every Kubernetes run pod has a
deadline; the tag is the sum of the run's asset groups' limits, each overridable by environment;
a SIGKILLed `nola run` wedges nothing and its rerun resumes prompt tuning."""

import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from dagster import DagsterEventType, DagsterRunStatus
from dagster._core.events import DagsterEvent
from dagster._core.storage.tags import MAX_RUNTIME_SECONDS_TAG
from dagster._core.test_utils import create_run_for_test, freeze_time, instance_for_test
from dagster._daemon.monitoring.concurrency import execute_concurrency_slots_iteration
from dagster._daemon.monitoring.run_monitoring import execute_run_monitoring_iteration

from nola_assets.assets import NOLA_ASSETS
from nola_assets.common import GPU_POOL
from nola_assets.local import INSTANCE_YAML
from nola_assets.run_limits import MAX_RUNTIME_SECONDS, max_runtime_tags
from nola_assets.sensors import RERUN_ON_NEW_IMAGES, nola_job

REPO = Path(__file__).resolve().parents[1]
STARTED_AT = 1_700_000_000.0
FREE_SLOTS_AFTER_SECONDS = 60


def _instance_files() -> dict[str, dict]:
    files = {path.name: yaml.safe_load(path.read_text()) for path in sorted((REPO / "deploy" / "dagster").glob("dagster*.yaml"))}
    files["nola_assets/local.py"] = yaml.safe_load(INSTANCE_YAML)
    return files


def test_a_run_past_its_max_runtime_is_failed_by_monitoring_and_frees_its_gpu_slot():
    monitoring = {"enabled": True, "free_slots_after_run_end_seconds": FREE_SLOTS_AFTER_SECONDS}
    with instance_for_test(overrides={"run_monitoring": monitoring}) as instance:
        workspace = SimpleNamespace(instance=instance, create_request_context=lambda: None)
        storage = instance.event_log_storage
        storage.set_concurrency_slots(GPU_POOL, 1)
        with freeze_time(STARTED_AT):
            run = create_run_for_test(instance, job_name="nola_job", tags={MAX_RUNTIME_SECONDS_TAG: "100"})
            instance.report_dagster_event(DagsterEvent(DagsterEventType.RUN_START.value, job_name=run.job_name),
                                          run.run_id, timestamp=STARTED_AT)
        assert instance.get_run_record_by_id(run.run_id).start_time == STARTED_AT
        assert storage.claim_concurrency_slot(GPU_POOL, run.run_id, "prompt_tuned_encoder").is_claimed

        with freeze_time(STARTED_AT + 50):  # within its limit: left alone
            list(execute_run_monitoring_iteration(workspace, logging.getLogger("test")))
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED

        with freeze_time(STARTED_AT + 101):
            list(execute_run_monitoring_iteration(workspace, logging.getLogger("test")))
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
        ended = instance.get_run_record_by_id(run.run_id).end_time
        assert storage.get_concurrency_info(GPU_POOL).active_slot_count == 1  # until the grace period ends

        with freeze_time(ended + FREE_SLOTS_AFTER_SECONDS + 1):
            list(execute_concurrency_slots_iteration(workspace, logging.getLogger("test")))
        assert storage.get_concurrency_info(GPU_POOL).active_slot_count == 0


def test_every_instance_file_enables_run_monitoring_and_frees_slots():
    for name, settings in _instance_files().items():
        monitoring = settings.get("run_monitoring", {})
        assert monitoring.get("enabled") is True, name
        assert monitoring.get("free_slots_after_run_end_seconds", 0) > 0, name
        if name != "nola_assets/local.py":  # runs the CLI starts in process are bounded by no daemon
            assert monitoring.get("max_runtime_seconds", 0) >= int(nola_job.tags[MAX_RUNTIME_SECONDS_TAG]), name


def test_every_kubernetes_run_pod_has_a_deadline_above_the_longest_run():
    values = yaml.safe_load((REPO / "deploy" / "k8s" / "values.yaml").read_text())
    assert values["dagsterDaemon"]["runMonitoring"]["enabled"] is True
    job_spec = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["jobSpecConfig"]
    assert job_spec["activeDeadlineSeconds"] >= int(nola_job.tags[MAX_RUNTIME_SECONDS_TAG])


def test_max_runtime_is_the_sum_of_the_run_groups_limits_each_overridable():
    everything = int(max_runtime_tags(NOLA_ASSETS)[MAX_RUNTIME_SECONDS_TAG])
    assert everything == sum(MAX_RUNTIME_SECONDS[group] for group in {g for a in NOLA_ASSETS for g in a.group_names_by_key.values()})
    images_only = int(max_runtime_tags(NOLA_ASSETS, RERUN_ON_NEW_IMAGES)[MAX_RUNTIME_SECONDS_TAG])
    assert images_only == everything - MAX_RUNTIME_SECONDS["text_classifier"]  # descriptions and CDE are not rerun
    tuned = max_runtime_tags(NOLA_ASSETS, RERUN_ON_NEW_IMAGES, env={"NOLA_MAX_RUNTIME_SECONDS_PROMPT_TUNING": "60"})
    assert int(tuned[MAX_RUNTIME_SECONDS_TAG]) == images_only - MAX_RUNTIME_SECONDS["prompt_tuning"] + 60


def test_sensor_runs_carry_the_max_runtime_of_what_they_materialize(tmp_path, monkeypatch):
    from dagster import DagsterInstance

    from assets_helpers import copy_demo
    from test_sensor import Daemon
    from nola_assets.sensors import unlabeled_images_sensor

    monkeypatch.setenv("NOLA_MAX_RUNTIME_SECONDS_PROMPT_TUNING", "60")
    copy_demo(tmp_path / "data", "shoes", labeled=False)
    [request] = Daemon(unlabeled_images_sensor, DagsterInstance.ephemeral(), tmp_path / "data",
                       tmp_path / "artifacts").tick().run_requests
    assert request.asset_selection is None  # the whole graph: every group's limit, prompt tuning's from the environment
    expected = int(nola_job.tags[MAX_RUNTIME_SECONDS_TAG]) - MAX_RUNTIME_SECONDS["prompt_tuning"] + 60
    assert int(request.tags[MAX_RUNTIME_SECONDS_TAG]) == expected


@pytest.mark.slow
def test_a_sigkilled_nola_run_leaves_no_claimed_slot_and_the_rerun_resumes_prompt_tuning(tmp_path, monkeypatch, caplog):
    """`nola run` SIGKILLed once prompt tuning saved an epoch: its run stays STARTED holding the
    `gpu` slot, until the next `nola run` fails it (its process is gone) and frees the slot; that
    run completes, resuming prompt tuning after the saved epoch, and leaves no slot claimed."""
    from dagster import DagsterInstance, RunsFilter

    from assets_helpers import copy_demo
    from nola_assets.common import RESUME_DIR
    from nola_core.cli import main
    from nola_core.tuning import RESUME_FILE

    for name, value in {"DAGSTER_HOME": tmp_path / ".dagster_home", "NOLA_DATA_ROOT": tmp_path / "data",
                        "NOLA_ARTIFACT_ROOT": tmp_path / "artifacts", "NOLA_NUM_WORKERS": 0,
                        "OMP_NUM_THREADS": 1, "HF_HUB_OFFLINE": 1}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.chdir(tmp_path)
    dataset = copy_demo(tmp_path / "data", "fashion_mini", labeled=False)
    command = ["run", str(dataset), "--profile", "tiny", "--tuning-epochs", str(KILLED_RUN_EPOCHS),
               "--alignment-epochs", "2"]
    child = subprocess.Popen([sys.executable, "-c", "import sys; from nola_core.cli import main; sys.exit(main(sys.argv[1:]))",
                              *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = None
    deadline = time.monotonic() + 240
    while saved is None and child.poll() is None and time.monotonic() < deadline:
        saved = _saved_epoch(tmp_path / "artifacts" / "fashion_mini" / "prompt_tuned_encoder", RESUME_DIR, RESUME_FILE)
        time.sleep(0.05)
    child.kill()
    child.wait()
    assert saved is not None and 1 <= saved < KILLED_RUN_EPOCHS, "prompt tuning saved no epoch before the kill"

    instance = DagsterInstance.from_config(str(tmp_path / ".dagster_home"))
    [killed] = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_slot_count == 1  # wedged

    with caplog.at_level(logging.INFO, logger="nola_core.tuning"):
        assert main(command) == 0
    resumed = [int(line.split("resuming after epoch ")[1].split("/")[0]) for line in caplog.messages
               if "resuming after epoch" in line]
    assert resumed and resumed[0] >= saved  # from its last saved epoch (a later save may have landed before the kill)
    assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.FAILURE
    assert not instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_slot_count == 0


KILLED_RUN_EPOCHS = 4


def _saved_epoch(asset_folder: Path, resume_dir: str, resume_file: str) -> int | None:
    """The epoch prompt tuning's resume file holds, if it has saved one."""
    import torch

    for path in asset_folder.glob(f"*/{resume_dir}/{resume_file}"):
        try:
            return int(torch.load(path, weights_only=True)["epoch"])
        except (OSError, RuntimeError, EOFError):  # removed or replaced while read
            return None
    return None
