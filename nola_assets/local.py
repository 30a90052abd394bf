"""Running the asset graph on the local embedded instance: what `nola demo`, `nola run` and
`nola dev` share.

The instance lives in a project-local Dagster home (`$DAGSTER_HOME`, default `.dagster_home/`):
SQLite storage, so `dagster dev` on the same home shows every run and materialization. Its
`dagster.yaml`, written once if missing, limits every concurrency pool, and so the `gpu` pool of
the GPU-bound assets, to one step at a time.

Runs here are processes on this machine whose health nothing monitors (the default run launcher
cannot check a run worker's; the daemon of `nola dev` enforces only run time limits): a killed
`nola run` would leave its run STARTED and its pool slot claimed forever. So `local_instance()` first fails every in-progress run none of whose processes
is alive and frees its slots, and `materialize_dataset` waits for a free `gpu` slot before it
starts, saying which run holds it, and stops cleanly on Ctrl-C or SIGTERM while it waits, before
the run or inside it (`execute_interruptibly`).

A run here carries the `dagster/max_runtime` tag a sensor-started run of the same assets carries
(`nola_assets/run_limits.py`, from `NOLA_MAX_RUNTIME_SECONDS_<GROUP>` as set for this command), and
no daemon is needed to enforce it: past it, the run is failed, its slots freed, and the process
exits with status 124 (as `timeout` does).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping

import polars as pl
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus, ExecuteInProcessResult, RunsFilter
from dagster._core.storage.tags import MAX_RUNTIME_SECONDS_TAG

from nola_core.data import load_dataset_spec

from nola_assets.artifacts import ArtifactRef, ArtifactStore
from nola_assets.common import GPU_POOL, METHOD_EVALUATION_FILE
from nola_assets.partitions import DATASETS
from nola_assets.run_limits import max_runtime_tags

DEFAULT_HOME = ".dagster_home"
INSTANCE_YAML = """\
# Written by the nola command line; edit freely, it is not overwritten.
telemetry:
  enabled: false
concurrency:
  runs:
    # Runs queued for the daemon (`nola dev`): at most one run per dataset partition at a time.
    tag_concurrency_limits:
      - key: dagster/partition
        value:
          applyLimitPerUniqueValue: true
        limit: 1
  pools:
    # Every pool, including `gpu` (the pool of the GPU-bound NoLA assets), runs one step at a time,
    # so two trainings never share a device by accident. Raise it for a machine with more GPUs, or
    # set one pool alone: `dagster instance concurrency set gpu 2`.
    default_limit: 1
    granularity: op
run_monitoring:
  # Under `nola dev` (the daemon): a queued run past its `dagster/max_runtime` tag is failed and its
  # pool slots freed free_slots_after_run_end_seconds later. A killed `nola run` is not seen here
  # (no worker health check with the default launcher): the next nola command fails it.
  enabled: true
  poll_interval_seconds: 30
  free_slots_after_run_end_seconds: 60
"""


def dagster_home() -> Path:
    """`$DAGSTER_HOME` if set, else `.dagster_home/` in the working directory (created, with
    its dagster.yaml), and exported so that child processes use the same instance."""
    home = Path(os.environ.get("DAGSTER_HOME") or DEFAULT_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    settings = home / "dagster.yaml"
    if not settings.exists():
        settings.write_text(INSTANCE_YAML, encoding="utf-8")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


IN_PROGRESS = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
POOL_POLL_SECONDS = 2.0
INTERRUPT_GRACE_SECONDS = 3.0  # a captured Ctrl-C / SIGTERM Dagster has not acted on by then: its run waits on a slot
TIMED_OUT_EXIT_STATUS = 124  # a run past its max runtime, as timeout(1) exits


def local_instance() -> DagsterInstance:
    """The local instance, after failing the runs whose processes are gone (`fail_runs_of_dead_processes`)."""
    instance = DagsterInstance.from_config(str(dagster_home()))
    for run_id, pids in fail_runs_of_dead_processes(instance):
        print(f"nola: run {run_id} was still marked in progress, but its process(es) {pids} are gone: "
              "marked failed, its pool slots freed", file=sys.stderr)
    return instance


def fail_runs_of_dead_processes(instance: DagsterInstance) -> list[tuple[str, list[int]]]:
    """Mark failed every in-progress run whose processes (the pids its engine events name) are all
    gone, and free the pool slots it claimed; returns (run id, pids) of each. A run that logged no
    pid yet is left alone. Only on an instance whose runs are processes of this machine (the default
    run launcher): the pids of runs in containers or pods mean nothing here."""
    from dagster._core.launcher import DefaultRunLauncher

    if not isinstance(instance.run_launcher, DefaultRunLauncher):
        return []
    failed = []
    for record in instance.get_run_records(RunsFilter(statuses=IN_PROGRESS)):
        run = record.dagster_run
        pids = {int(entry.dagster_event.engine_event_data.metadata["pid"].value): entry.timestamp
                for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT)
                if "pid" in entry.dagster_event.engine_event_data.metadata}
        if not pids or any(process_alive(pid, since) for pid, since in pids.items()):
            continue
        instance.report_run_failed(run, message=f"Marked failed by nola: the run's process(es) {sorted(pids)} "
                                   "are gone (killed or crashed); its pool slots are freed.")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        failed.append((run.run_id, sorted(pids)))
    return failed


def process_alive(pid: int, since: float) -> bool:
    """Whether process `pid` exists, is not a zombie, and is the one that logged at `since` (a
    process started later under a reused pid is not; needs /proc to tell, else trusted)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, StopIteration, IndexError):
        return True
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return fields[0] != "Z" and started <= since + 2.0  # btime and clock ticks round to a second or so


def wait_for_pool(instance: DagsterInstance, pool: str = GPU_POOL, poll_seconds: float = POOL_POLL_SECONDS) -> None:
    """Return once `pool` has a free slot, saying which runs hold it while it waits; Ctrl-C or
    SIGTERM while waiting exits (130 / 143) with nothing started."""
    stop = {}

    def on_signal(number, _frame):
        stop["signal"] = number

    previous = {number: signal.signal(number, on_signal) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        said = None
        while not stop:
            holders = pool_holders(instance, pool)
            if holders is None:
                return
            if holders != said:
                print(f"nola: waiting for a slot of the `{pool}` pool, held by {holders} "
                      "(Ctrl-C to stop; nothing is started until a slot is free)", file=sys.stderr, flush=True)
                said = holders
            time.sleep(poll_seconds)
        raise SystemExit(128 + stop["signal"])
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def pool_holders(instance: DagsterInstance, pool: str) -> str | None:
    """None when `pool` has a free slot (or no limit); else which runs and steps hold it, since when."""
    storage = instance.event_log_storage
    if pool not in storage.get_concurrency_keys():
        return None
    info = storage.get_concurrency_info(pool)
    if not info.claimed_slots or len(info.claimed_slots) < info.slot_count:
        return None
    held = []
    for slot in info.claimed_slots:
        record = instance.get_run_record_by_id(slot.run_id)
        since = record.start_time if record and record.start_time else None
        held.append(f"run {slot.run_id} (step {slot.step_key}"
                    + (f", started {datetime.fromtimestamp(since):%Y-%m-%d %H:%M:%S}" if since else "") + ")")
    return "; ".join(held)


def register_dataset(instance: DagsterInstance, source: Path, data_root: Path, copy: bool = False) -> str:
    """Make `source` a dataset of the data root and a partition; returns the partition key.

    A folder already directly under the data root keeps its folder name. Any other folder is
    linked (or, with `copy`, copied) to `<data root>/<name from dataset.yaml>`; a different
    dataset already holding that name is an error, the same one is reused.
    """
    spec = load_dataset_spec(source)
    source = spec.root
    data_root = data_root.resolve()
    target = data_root / spec.name
    if source.parent == data_root:
        name = source.name
    elif target.exists() or target.is_symlink():
        if target.resolve() != source:
            raise FileExistsError(f"{target} already holds another dataset (or an earlier copy of this one): "
                                  f"remove it, or change `name` in {source / 'dataset.yaml'}")
        name = spec.name
    else:
        data_root.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copytree(source, target)
        else:
            target.symlink_to(source, target_is_directory=True)
        name = spec.name
    if not instance.has_dynamic_partition(DATASETS, name):
        instance.add_dynamic_partitions(DATASETS, [name])
    return name


def materialize_dataset(
    instance: DagsterInstance, name: str, resources_config: Mapping[str, Mapping[str, Any]], tags: Mapping[str, str]
) -> ExecuteInProcessResult:
    """Run `nola_job` for one partition in this process, recorded in `instance`, bounded by the
    max runtime of its asset groups (the limits read now, not when the definitions were imported).

    `resources_config` holds only the resource fields to set for this run; the run config is
    stored with the run, so re-executing it from the UI repeats it.
    """
    from nola_assets.definitions import defs
    from nola_assets.sensors import JOB_ASSETS

    run_config = {
        "resources": {key: {"config": dict(values)} for key, values in resources_config.items() if values},
        "loggers": {"console": {"config": {"log_level": "INFO"}}},
    }
    run_tags = {**max_runtime_tags(JOB_ASSETS), **tags}
    limit = run_tags.get(MAX_RUNTIME_SECONDS_TAG)
    wait_for_pool(instance)
    return execute_interruptibly(
        instance, lambda run_id: defs.resolve_job_def("nola_job").execute_in_process(
            instance=instance, partition_key=name, run_config=run_config, tags=run_tags, run_id=run_id),
        max_runtime_seconds=float(limit) if limit else None)


def execute_interruptibly(instance: DagsterInstance, execute: Callable[[str], ExecuteInProcessResult],
                          grace_seconds: float = INTERRUPT_GRACE_SECONDS,
                          max_runtime_seconds: float | None = None) -> ExecuteInProcessResult:
    """`execute(run_id)`, ending the process cleanly on Ctrl-C or SIGTERM even while a step waits
    for a pool slot, and once the run has taken longer than `max_runtime_seconds`.

    During a run Dagster captures both signals and raises them at its next checkpoint, inside a
    step; a run whose step waits for a slot never reaches one. So a watcher thread notices a
    captured signal still pending after `grace_seconds`, marks the run failed, frees its slots and
    pending steps, and exits the process (status 130). A run past its max runtime (a hung step)
    ends the same way, with status 124: what run monitoring does to a daemon-launched run.
    """
    from dagster._core.utils import make_new_run_id
    from dagster._utils.interrupts import check_captured_interrupt

    run_id, done, started = make_new_run_id(), threading.Event(), time.monotonic()

    def end_run(message: str, status: int) -> None:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status in IN_PROGRESS:
            instance.report_run_failed(run, message=f"{message}; marked failed by nola, its pool slots freed.")
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        print(f"nola: {message}; run {run_id} marked failed, nothing holds its pool slots",
              file=sys.stderr, flush=True)
        os._exit(status)

    def watch() -> None:
        pending_since = None
        while not done.wait(0.2):
            if max_runtime_seconds and time.monotonic() - started > max_runtime_seconds:
                end_run(f"Exceeded the run's maximum runtime of {max_runtime_seconds:g} seconds "
                        "(dagster/max_runtime)", TIMED_OUT_EXIT_STATUS)
            if not check_captured_interrupt():
                pending_since = None
                continue
            pending_since = pending_since or time.monotonic()
            if time.monotonic() - pending_since >= grace_seconds:
                end_run("Interrupted (Ctrl-C or SIGTERM) while waiting", 130)

    watcher = threading.Thread(target=watch, name="nola-run-watcher", daemon=True)
    watcher.start()
    try:
        return execute(run_id)
    finally:
        done.set()


def evaluation_of(result: ExecuteInProcessResult, store: ArtifactStore) -> pl.DataFrame:
    """The `evaluation` asset's table: NoLA's stages, `EVALUATION_SCHEMA` rows."""
    ref: ArtifactRef = result.asset_value(AssetKey("evaluation"))
    return store.read_table(ref, METHOD_EVALUATION_FILE)
