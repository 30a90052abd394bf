"""The local instance of `nola run` / `nola demo` / `nola dev`: runs whose process is gone are
failed and release their pool slot; waiting for a slot says for whom, and stops on SIGTERM/SIGINT."""

import signal
import subprocess
import sys
import textwrap

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


def test_waiting_for_a_slot_says_who_holds_it_and_stops_on_sigterm(tmp_path):
    """In a child process: the `gpu` slot is held by a run of this (live) test process."""
    import os

    with instance_for_test(temp_dir=str(tmp_path)) as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        holder = _started_run(instance, os.getpid(), "prompt_tuned_encoder")
        assert holder.run_id in pool_holders(instance, "gpu")
        script = textwrap.dedent(f"""
            from dagster import DagsterInstance
            from nola_assets.local import wait_for_pool
            wait_for_pool(DagsterInstance.from_config({str(tmp_path)!r}), poll_seconds=0.2)
            print("returned")
        """)
        child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = child.stderr.readline()
        assert "waiting for a slot of the `gpu` pool" in line and holder.run_id in line and "prompt_tuned_encoder" in line
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=30)
        assert child.returncode == 128 + signal.SIGTERM and "returned" not in out
