"""unlabeled_images_sensor on a real (ephemeral) instance, tick by tick."""

import json

import pytest
from dagster import DagsterInstance, build_sensor_context, materialize

from assets_helpers import copy_demo, new_image, resources_for_test
from nola_assets.artifacts import ArtifactStore
from nola_assets.assets import NOLA_ASSETS, class_descriptions, cde_classifier, dataset_manifest
from nola_assets.partitions import DATASETS
from nola_assets.resources import DatasetsResource
from nola_assets.sensors import build_unlabeled_images_sensor, nola_job, unlabeled_images_sensor


class Daemon:
    """Ticks a sensor the way the daemon does: cursor carried over, partition requests applied."""

    def __init__(self, sensor, instance, data_root, artifact_root):
        self.sensor, self.instance, self.cursor = sensor, instance, None
        self.resources = {"data": DatasetsResource(data_root=str(data_root)),
                          "artifacts": ArtifactStore(artifact_root=str(artifact_root))}

    def tick(self):
        context = build_sensor_context(instance=self.instance, cursor=self.cursor, resources=self.resources)
        result = self.sensor(context)
        for request in result.dynamic_partitions_requests:
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        self.cursor = result.cursor
        return result


@pytest.fixture
def setup(tmp_path):
    data_root = tmp_path / "data"
    copy_demo(data_root, "shoes", labeled=False)
    instance = DagsterInstance.ephemeral()
    return Daemon(unlabeled_images_sensor, instance, data_root, tmp_path / "artifacts"), data_root


def test_new_dataset_then_nothing_then_new_image_then_corrupt_image(setup):
    daemon, data_root = setup
    first = daemon.tick()
    [added] = first.dynamic_partitions_requests
    assert added.partitions_def_name == DATASETS and list(added.partition_keys) == ["shoes"]
    [request] = first.run_requests
    assert request.partition_key == "shoes" and request.run_key.startswith("shoes:")
    assert request.asset_selection is None  # a new dataset: the whole graph
    assert daemon.instance.get_dynamic_partitions(DATASETS) == ["shoes"]

    assert daemon.tick().run_requests == []  # same images: nothing

    # The cursor survives a restart: a fresh context with the stored cursor requests nothing.
    restarted = build_sensor_context(instance=daemon.instance, cursor=daemon.cursor, resources=daemon.resources)
    assert unlabeled_images_sensor(restarted).run_requests == []

    new_image(data_root / "shoes" / "unlabeled" / "new_0001.png", seed=1)
    [grown] = daemon.tick().run_requests
    assert grown.run_key != request.run_key and grown.tags["nola/images"] == "121"
    rerun = set(grown.asset_selection)  # everything downstream of the images, nothing else
    assert class_descriptions.key not in rerun and cde_classifier.key not in rerun
    assert {"dino_features", "prompt_tuned_encoder", "lafter_encoder", "method_comparison",
            "exported_classifier"} <= {key.path[-1] for key in rerun}
    assert daemon.tick().run_requests == []

    (data_root / "shoes" / "unlabeled" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    [corrupt] = daemon.tick().run_requests
    assert corrupt.run_key not in (request.run_key, grown.run_key)
    assert corrupt.tags["nola/skipped_files"] == "1"
    assert "unlabeled/broken.png" in corrupt.tags["nola/skipped_sample"]
    assert corrupt.tags["nola/images"] == "121"


def test_rename_and_touch_request_nothing(setup):
    daemon, data_root = setup
    daemon.tick()
    unlabeled = data_root / "shoes" / "unlabeled"
    (unlabeled / "img_0001.png").rename(unlabeled / "renamed.png")
    (unlabeled / "img_0002.png").touch()
    assert daemon.tick().run_requests == []
    assert json.loads(daemon.cursor)["shoes"]["state"]  # the new folder state is remembered


def test_an_existing_partition_already_materialized_requests_nothing(setup, tmp_path):
    daemon, data_root = setup
    daemon.instance.add_dynamic_partitions(DATASETS, ["shoes"])
    materialize(NOLA_ASSETS, selection=[dataset_manifest], instance=daemon.instance, partition_key="shoes",
                resources=resources_for_test(data_root, tmp_path / "artifacts"))
    assert daemon.tick().run_requests == []  # no cursor yet, but the last manifest has this image set
    new_image(data_root / "shoes" / "unlabeled" / "new.png", seed=2)
    assert len(daemon.tick().run_requests) == 1


def test_work_per_tick_is_capped_and_bad_specs_do_not_stop_the_others(setup, tmp_path):
    _, data_root = setup
    copy_demo(data_root, "more", labeled=False)
    (data_root / "broken").mkdir()
    (data_root / "broken" / "dataset.yaml").write_text("name: broken\nclasses: [just-one]\n")
    daemon = Daemon(build_unlabeled_images_sensor(max_datasets_per_tick=1, name="capped"), DagsterInstance.ephemeral(),
                    data_root, tmp_path / "artifacts")
    ticks = [daemon.tick() for _ in range(4)]
    keys = [[r.partition_key for r in tick.run_requests] for tick in ticks]
    assert keys == [[], ["more"], ["shoes"], []]  # "broken" (first in order) is hashed, refused, and remembered
    assert sorted(daemon.instance.get_dynamic_partitions(DATASETS)) == ["more", "shoes"]


def test_the_sensor_targets_the_partitioned_job():
    assert unlabeled_images_sensor.job_name == nola_job.name
