"""The local instance of `nola run` / `nola demo` / `nola dev`: runs whose process is gone are
failed and release their pool slot; waiting for a slot says for whom, and stops on SIGTERM/SIGINT."""

import signal
import subprocess
import sys

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


def test_waiting_for_a_slot_says_who_holds_it_and_stops_on_sigterm(capsys):
    """The `gpu` slot is held by a run of this (live) process; a SIGTERM to this process while it
    waits ends the wait with exit status 143 and nothing started."""
    import os
    import threading

    import pytest

    from nola_assets.local import wait_for_pool

    with instance_for_test() as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        holder = _started_run(instance, os.getpid(), "prompt_tuned_encoder")
        assert holder.run_id in pool_holders(instance, "gpu")
        before = signal.getsignal(signal.SIGTERM)
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(SystemExit) as stopped:
            wait_for_pool(instance, poll_seconds=0.1)
        assert stopped.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back
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
