"""The local instance of `nola run` / `nola demo` / `nola dev`: runs whose process is gone are
failed and release their pool slot; waiting for a slot says for whom, and stops on SIGTERM/SIGINT."""

import signal
import subprocess
import sys
import textwrap

import pytest

from dagster import DagsterRunStatus
from dagster._core.events import EngineEventData
from dagster._core.test_utils import create_run_for_test, instance_for_test

from nola_assets.local import fail_runs_of_dead_processes, pool_holders, process_alive


def _started_run(instance, pid: int, step: str):
    """A STARTED run whose engine event names `pid`, holding one `gpu` slot for `step`."""
    run = create_run_for_test(instance, status=DagsterRunStatus.STARTED)
    instance.report_engine_event(f"Executing steps in process (pid: {pid})", run, EngineEventData.in_process(pid))
    instance.event_log_storage.claim_concurrency_slot("gpu", run.run_id, step)
    return run


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: the pid names no process now
    return process.pid


def test_a_run_whose_process_is_gone_is_failed_and_frees_its_slot_a_live_one_is_kept():
    import os

    with instance_for_test() as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 2)
        dead = _started_run(instance, _dead_pid(), "prompt_tuned_encoder")
        alive = _started_run(instance, os.getpid(), "clip_features")
        assert process_alive(os.getpid(), since=__import__("time").time())

        [(run_id, pids)] = fail_runs_of_dead_processes(instance)
        assert run_id == dead.run_id
        assert instance.get_run_by_id(dead.run_id).status == DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(alive.run_id).status == DagsterRunStatus.STARTED
        claimed = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert [(slot.run_id, slot.step_key) for slot in claimed] == [(alive.run_id, "clip_features")]
        assert fail_runs_of_dead_processes(instance) == []  # nothing left to do


def test_a_pid_reused_by_a_newer_process_is_not_the_run_process():
    import os

    assert not process_alive(os.getpid(), since=0.0)  # this process started long after "since"


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_waiting_for_a_slot_says_who_holds_it_and_stops_on_a_signal(capsys, number):
    """The `gpu` slot is held by a run of this (live) process; a SIGTERM (Ctrl-C: SIGINT) to this
    process while it waits ends the wait with exit status 143 (130) and nothing started."""
    import os
    import threading

    from nola_assets.local import wait_for_pool

    with instance_for_test() as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        holder = _started_run(instance, os.getpid(), "prompt_tuned_encoder")
        assert holder.run_id in pool_holders(instance, "gpu")
        before = signal.getsignal(number)
        threading.Timer(1.0, os.kill, (os.getpid(), number)).start()
        with pytest.raises(SystemExit) as stopped:
            wait_for_pool(instance, poll_seconds=0.1)
        assert stopped.value.code == 128 + number
        assert signal.getsignal(number) is before  # the handlers are put back
        message = capsys.readouterr().err
        assert "waiting for a slot of the `gpu` pool" in message
        assert holder.run_id in message and "prompt_tuned_encoder" in message


def test_runs_of_another_launcher_are_left_alone():
    """Runs launched into containers or pods name pids of another machine: never judged from here."""
    launcher = {"run_launcher": {"module": "dagster._core.test_utils", "class": "MockedRunLauncher"}}
    with instance_for_test(overrides=launcher) as instance:
        run = _started_run(instance, _dead_pid(), "prompt_tuned_encoder")
        assert fail_runs_of_dead_processes(instance) == []
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED


@pytest.mark.slow  # about 25 s on 2 shared cores, most of it the child importing nola_assets
def test_ctrl_c_while_a_step_waits_for_a_slot_inside_the_run_fails_the_run_and_exits(tmp_path):
    """A child process runs a one-step job whose step waits for the `gpu` slot this process holds;
    Dagster defers its SIGINT (and SIGTERM, mapped to the same handler during a run) while the
    step waits, the watcher ends it: exit 130, run failed, no slot or pending step of it left.
    Without the watcher the child ignores the SIGINT (checked: the test then times out)."""
    import os
    import time

    from dagster import DagsterInstance

    with instance_for_test(temp_dir=str(tmp_path)) as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        holder = _started_run(instance, os.getpid(), "prompt_tuned_encoder")
        script = textwrap.dedent(f"""
            from dagster import DagsterInstance, Definitions, asset, define_asset_job
            from nola_assets.local import execute_interruptibly

            @asset(pool="gpu")
            def pooled():
                return 1

            job = Definitions(assets=[pooled], jobs=[define_asset_job("pooled_job")]).resolve_job_def("pooled_job")
            instance = DagsterInstance.from_config({str(tmp_path)!r})
            execute_interruptibly(instance, lambda run_id: job.execute_in_process(instance=instance, run_id=run_id),
                                  grace_seconds=1.0)
            print("finished")
        """)
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        def waiting():
            return [s for s in instance.event_log_storage.get_concurrency_info("gpu").pending_steps
                    if s.run_id != holder.run_id]

        while not waiting():
            assert time.monotonic() < deadline and child.poll() is None, child.communicate()
            time.sleep(0.2)
        [pending] = waiting()
        time.sleep(1.0)  # well inside Dagster's wait loop
        child.send_signal(signal.SIGINT)
        try:
            out, err = child.communicate(timeout=30)
        finally:
            child.kill()  # still running only if the interrupt was ignored
        assert child.returncode == 130 and "finished" not in out, err[-3000:]
        fresh = DagsterInstance.from_config(str(tmp_path))
        assert fresh.get_run_by_id(pending.run_id).status == DagsterRunStatus.FAILURE
        info = fresh.event_log_storage.get_concurrency_info("gpu")
        assert pending.run_id not in {s.run_id for s in info.claimed_slots} | {s.run_id for s in info.pending_steps}


def test_an_in_process_run_carries_the_max_runtime_of_its_groups_as_set_for_this_command(tmp_path, monkeypatch):
    """`nola run`'s run is tagged like a sensor's run of the whole graph, with the limits of the
    environment at run time: the definitions (and nola_job's own tag) were imported before the
    setting changed. The run fails at once in its preflight (no such dataset folder)."""
    import nola_assets.definitions  # noqa: F401  (nola_job's tag is computed here, before the setting)
    from dagster import DagsterInstance, Failure
    from dagster._core.storage.tags import MAX_RUNTIME_SECONDS_TAG

    from nola_assets.local import materialize_dataset
    from nola_assets.partitions import DATASETS
    from nola_assets.run_limits import MAX_RUNTIME_SECONDS
    from nola_assets.sensors import nola_job

    for name, value in {"NOLA_DATA_ROOT": tmp_path / "data", "NOLA_ARTIFACT_ROOT": tmp_path / "artifacts",
                        "NOLA_MAX_RUNTIME_SECONDS_PROMPT_TUNING": 60}.items():
        monkeypatch.setenv(name, str(value))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASETS, ["absent"])
    with pytest.raises(Failure, match="absent"):
        materialize_dataset(instance, "absent", {}, {"nola/launched_by": "nola run"})
    [run] = instance.get_runs()
    whole_graph = sum(MAX_RUNTIME_SECONDS.values())
    assert int(nola_job.tags[MAX_RUNTIME_SECONDS_TAG]) == whole_graph  # imported before: the defaults
    assert int(run.tags[MAX_RUNTIME_SECONDS_TAG]) == whole_graph - MAX_RUNTIME_SECONDS["prompt_tuning"] + 60
    assert run.tags["nola/launched_by"] == "nola run"


def test_an_in_process_run_past_its_max_runtime_is_failed_frees_its_slot_and_exits_124(monkeypatch, capsys):
    """No daemon watches `nola run`: its own watcher fails a hung run at its limit, as run
    monitoring would, frees its `gpu` slot and ends the process with status 124."""
    import threading
    import time

    from nola_assets import local

    exits, ended = [], threading.Event()

    def exit_process(status):  # os._exit, recorded instead: the run below returns once it is called
        exits.append(status)
        ended.set()

    monkeypatch.setattr(local.os, "_exit", exit_process)
    with instance_for_test() as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)

        def hung_step(run_id):
            create_run_for_test(instance, run_id=run_id, status=DagsterRunStatus.STARTED)
            assert instance.event_log_storage.claim_concurrency_slot("gpu", run_id, "prompt_tuned_encoder").is_claimed
            assert ended.wait(30), "the run was never stopped"

        started = time.monotonic()
        local.execute_interruptibly(instance, hung_step, max_runtime_seconds=1.0)
        assert 1.0 <= time.monotonic() - started < 10
        assert exits[0] == local.TIMED_OUT_EXIT_STATUS == 124
        [run] = instance.get_runs()
        assert run.status == DagsterRunStatus.FAILURE
        assert instance.event_log_storage.get_concurrency_info("gpu").active_slot_count == 0
        assert "maximum runtime of 1 seconds" in capsys.readouterr().err
