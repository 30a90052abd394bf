"""unlabeled_images_sensor on a real (ephemeral) instance, tick by tick."""

import json
import os
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus, build_sensor_context, materialize

from assets_helpers import copy_demo, new_image, resources_for_test
from nola_assets.artifacts import ArtifactStore
from nola_assets.assets import NOLA_ASSETS, class_descriptions, cde_classifier, dataset_manifest
from nola_assets.partitions import DATASETS
from nola_assets.resources import DatasetsResource
from nola_assets.sensors import READY_MARKER, build_unlabeled_images_sensor, nola_job, unlabeled_images_sensor


class Daemon:
    """Ticks a sensor the way the daemon does: cursor carried over, partition requests applied.
    `quiet_seconds` 0 (the default here): a folder is requested on the tick that sees it change."""

    def __init__(self, sensor, instance, data_root, artifact_root, quiet_seconds=0.0, tick_budget_seconds=None):
        self.sensor, self.instance, self.cursor = sensor, instance, None
        self.resources = {"data": DatasetsResource(data_root=str(data_root), sensor_quiet_seconds=quiet_seconds,
                                                   sensor_tick_budget_seconds=tick_budget_seconds),
                          "artifacts": ArtifactStore(artifact_root=str(artifact_root))}

    def tick(self):
        context = build_sensor_context(instance=self.instance, cursor=self.cursor, resources=self.resources)
        result = self.sensor(context)
        for request in result.dynamic_partitions_requests:
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        self.cursor = result.cursor
        return result


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def test_new_dataset_then_nothing_then_new_image(tmp_path):
    data_root, artifact_root = tmp_path / "data", tmp_path / "artifacts"
    copy_demo(data_root, "shoes", labeled=False)
    daemon = Daemon(unlabeled_images_sensor, DagsterInstance.ephemeral(), data_root, artifact_root)
    first = daemon.tick()
    [added] = first.dynamic_partitions_requests
    assert added.partitions_def_name == DATASETS and list(added.partition_keys) == ["shoes"]
    [request] = first.run_requests
    assert request.partition_key == "shoes" and request.run_key.startswith("shoes:1:")
    assert request.asset_selection is None  # no manifest yet: the whole graph
    assert request.tags["nola/images"] == "120"
    assert daemon.instance.get_dynamic_partitions(DATASETS) == ["shoes"]

    assert daemon.tick().run_requests == []  # same files: nothing

    # The cursor survives a restart: a fresh context with the stored cursor requests nothing.
    restarted = build_sensor_context(instance=daemon.instance, cursor=daemon.cursor, resources=daemon.resources)
    assert unlabeled_images_sensor(restarted).run_requests == []

    materialize(NOLA_ASSETS, selection=[dataset_manifest], instance=daemon.instance, partition_key="shoes",
                resources=resources_for_test(data_root, artifact_root))
    new_image(data_root / "shoes" / "unlabeled" / "new_0001.png", seed=1)
    [grown] = daemon.tick().run_requests
    assert grown.run_key.startswith("shoes:2:") and grown.tags["nola/images"] == "121"
    rerun = set(grown.asset_selection)  # a manifest exists: everything downstream of the images, nothing else
    assert class_descriptions.key not in rerun and cde_classifier.key not in rerun
    assert {"dataset_manifest", "dino_features", "prompt_tuned_encoder", "lafter_encoder", "method_comparison",
            "exported_classifier"} <= {key.path[-1] for key in rerun}
    assert daemon.tick().run_requests == []


def test_a_folder_going_a_b_a_gets_three_runs(tmp_path):
    """Run keys count changes: going back to an earlier image set is not "already done"."""
    data_root = tmp_path / "data"
    copy_demo(data_root, "shoes", labeled=False)
    daemon = Daemon(unlabeled_images_sensor, DagsterInstance.ephemeral(), data_root, tmp_path / "artifacts")
    extra = data_root / "shoes" / "unlabeled" / "extra.png"
    keys = [daemon.tick().run_requests[0].run_key]  # A
    new_image(extra, seed=3)
    keys.append(daemon.tick().run_requests[0].run_key)  # B
    extra.unlink()
    keys.append(daemon.tick().run_requests[0].run_key)  # A again
    assert [key.split(":")[1] for key in keys] == ["1", "2", "3"]
    assert len(set(keys)) == 3


def test_a_folder_being_copied_is_requested_once_after_its_quiet_period(tmp_path):
    data_root = tmp_path / "data"
    folder = copy_demo(data_root, "shoes", labeled=False)
    clock = Clock()
    daemon = Daemon(build_unlabeled_images_sensor("clocked", clock=clock), DagsterInstance.ephemeral(), data_root,
                    tmp_path / "artifacts", quiet_seconds=60)
    growing = folder / "unlabeled" / "half_copied.jpg"
    requests = []
    for second in range(0, 300, 30):  # a tick every 30 s; the copy goes on for the first 120 s
        clock.now += 30
        if second <= 120:
            with open(growing, "ab") as out:
                out.write(b"\xff" * 1000)
            os.utime(growing, ns=(int(clock.now * 1e9),) * 2)
        tick = daemon.tick()
        requests += [(second, r.run_key) for r in tick.run_requests]
    assert daemon.instance.get_dynamic_partitions(DATASETS) == ["shoes"]  # registered at once
    [(second, key)] = requests
    assert second == 180 and key.startswith("shoes:1:")  # last change at 120 s, quiet from 180 s

    growing.write_bytes(b"more")  # a new change, and the writer says it is done: no waiting
    (folder / READY_MARKER).touch()
    assert len(daemon.tick().run_requests) == 1


def test_an_existing_partition_already_materialized_requests_nothing(tmp_path):
    data_root, artifact_root = tmp_path / "data", tmp_path / "artifacts"
    copy_demo(data_root, "shoes", labeled=False)
    daemon = Daemon(unlabeled_images_sensor, DagsterInstance.ephemeral(), data_root, artifact_root)
    daemon.instance.add_dynamic_partitions(DATASETS, ["shoes"])
    materialize(NOLA_ASSETS, selection=[dataset_manifest], instance=daemon.instance, partition_key="shoes",
                resources=resources_for_test(data_root, artifact_root))
    assert daemon.tick().run_requests == []  # no cursor yet, but the last manifest has these files
    new_image(data_root / "shoes" / "unlabeled" / "new.png", seed=2)
    assert len(daemon.tick().run_requests) == 1


def test_the_time_budget_rotates_and_bad_specs_do_not_stop_the_others(tmp_path):
    data_root = tmp_path / "data"
    for name in ("a_more", "c_shoes"):
        copy_demo(data_root, name, labeled=False)
    (data_root / "b_broken").mkdir()
    (data_root / "b_broken" / "dataset.yaml").write_text("name: broken\nclasses: [just-one]\n")
    daemon = Daemon(build_unlabeled_images_sensor("budgeted"), DagsterInstance.ephemeral(), data_root,
                    tmp_path / "artifacts", tick_budget_seconds=0)
    ticks = [daemon.tick() for _ in range(3)]
    # Every usable folder is a partition after the first tick; a spent budget walks one folder per tick,
    # and the next tick goes on after it. "b_broken" is refused (logged once) and never walked.
    assert [list(r.partition_keys) for r in ticks[0].dynamic_partitions_requests] == [["a_more", "c_shoes"]]
    assert [[r.partition_key for r in tick.run_requests] for tick in ticks] == [["a_more"], ["c_shoes"], []]
    assert json.loads(ticks[0].cursor)["resume_at"] == "c_shoes"
    assert "refused" in json.loads(ticks[2].cursor)["datasets"]["b_broken"]


def test_the_sensor_targets_the_partitioned_job():
    assert unlabeled_images_sensor.job_name == nola_job.name


# ── one run per partition, in every instance file ──────────────────────────────────────────────

REPO = Path(__file__).resolve().parents[1]
PER_PARTITION_LIMIT = {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}


def _instance_files():
    """(name, the `concurrency` block) of every Dagster instance file the project ships."""
    import yaml

    from nola_assets.local import INSTANCE_YAML
    files = {path.name: yaml.safe_load(path.read_text()) for path in sorted((REPO / "deploy" / "dagster").glob("dagster*.yaml"))}
    files["nola_assets/local.py"] = yaml.safe_load(INSTANCE_YAML)
    return {name: settings["concurrency"] for name, settings in files.items()}


def test_every_instance_file_limits_runs_to_one_per_partition():
    from dagster._core.test_utils import create_run_for_test, instance_for_test
    from dagster._utils.tags import TagConcurrencyLimitsCounter

    files = _instance_files()
    assert {"dagster.yaml", "dagster.cpu.yaml", "dagster.local.yaml", "dagster.postgres-local.yaml",
            "nola_assets/local.py"} <= set(files)
    for name, concurrency in files.items():
        assert PER_PARTITION_LIMIT in concurrency["runs"]["tag_concurrency_limits"], name
        # Dagster itself reads the block; the queue daemon's own counter then holds a second run of
        # partition "a" back while one is in progress, and lets "b" go.
        with instance_for_test(overrides={"concurrency": concurrency}) as instance:
            limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
            running = create_run_for_test(instance, tags={"dagster/partition": "a"})
            counter = TagConcurrencyLimitsCounter(limits, [running])
            assert counter.is_blocked(create_run_for_test(instance, tags={"dagster/partition": "a"})), name
            assert not counter.is_blocked(create_run_for_test(instance, tags={"dagster/partition": "b"})), name


def test_the_helm_values_limit_runs_to_one_per_partition():
    import yaml

    values = yaml.safe_load((REPO / "deploy" / "k8s" / "values.yaml").read_text())
    assert PER_PARTITION_LIMIT in values["concurrency"]["runs"]["tagConcurrencyLimits"]


def test_the_queue_daemon_starts_one_run_per_partition_under_the_local_instance_file():
    """Three queued runs (partitions a, a, b) under dagster.local.yaml's limits: the daemon's queue
    starts one of each partition, and the second run of "a" only once the first has finished."""
    from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
    from dagster._core.test_utils import create_run_for_test, create_test_daemon_workspace_context, instance_for_test
    from dagster._core.workspace.load_target import EmptyWorkspaceTarget
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

    overrides = {"run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"},
                 "run_launcher": {"module": "dagster._core.test_utils", "class": "MockedRunLauncher"},
                 "concurrency": _instance_files()["dagster.local.yaml"]}
    with instance_for_test(overrides=overrides) as instance:
        origin = RemoteJobOrigin(RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("nola"), "__repository__"),
                                 "nola_job")
        first_a, second_a, b = (create_run_for_test(instance, status=DagsterRunStatus.QUEUED, remote_job_origin=origin,
                                                    tags={"dagster/partition": p}) for p in "aab")
        with create_test_daemon_workspace_context(EmptyWorkspaceTarget(), instance) as workspace:
            daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)
            list(daemon.run_iteration(workspace))
            launched = {run.run_id for run in instance.run_launcher.queue()}
            assert launched == {first_a.run_id, b.run_id}
            instance.report_run_failed(instance.get_run_by_id(first_a.run_id))  # the first run of "a" ends
            list(daemon.run_iteration(workspace))
            assert instance.run_launcher.did_run_launch(second_a.run_id)
