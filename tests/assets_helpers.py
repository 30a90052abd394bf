"""Shared set-up for the Dagster tests: demo-dataset copies, test resources, fake descriptions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from nola_core.demo import demo_dataset_path

from nola_assets.artifacts import ArtifactRefIOManager, ArtifactStore
from nola_assets.common import REFS_IO_MANAGER
from nola_assets.resources import (
    ComputeResource,
    DatasetsResource,
    DescriptionsResource,
    MethodResource,
    ModelsResource,
)

# The fake description source: a plain file, as a user (or `nola describe`) would write it.
FAKE_DESCRIPTIONS = {
    "t-shirt": ["a short-sleeved cotton top laid flat.", "a plain t-shirt with a round neck."],
    "trouser": ["a pair of long trousers with two legs.", "straight-cut pants seen from the front."],
    "sneaker": ["a low sports shoe with laces, seen from the side.", "a canvas sneaker with a rubber sole."],
    "bag": ["a handbag with a strap or handles.", "a rectangular leather bag."],
}
TUNING_EPOCHS = 2
ALIGNMENT_EPOCHS = 5


def copy_demo(data_root: Path, name: str, labeled: bool = True) -> Path:
    """A writable copy of the bundled demo dataset (package data) as `<data_root>/<name>`."""
    target = data_root / name
    shutil.copytree(demo_dataset_path(), target)
    if not labeled:
        shutil.rmtree(target / "labeled")
    (target / "fake_descriptions.json").write_text(json.dumps(FAKE_DESCRIPTIONS), encoding="utf-8")
    return target


def new_image(path: Path, seed: int) -> Path:
    """A 28×28 grayscale PNG whose content no other file has."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(28, 28), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path)
    return path


def resources_for_test(data_root: Path, artifact_root: Path, **method) -> dict:
    """Every resource of the code location, on temp dirs, tiny models, few epochs."""
    store = ArtifactStore(artifact_root=str(artifact_root))
    return {
        "artifacts": store,
        REFS_IO_MANAGER: ArtifactRefIOManager(store=store),
        "compute": ComputeResource(device="cpu"),
        "models": ModelsResource(model_profile="tiny"),
        "method": MethodResource(**{"tuning_epochs": TUNING_EPOCHS, "alignment_epochs": ALIGNMENT_EPOCHS, **method}),
        "descriptions": DescriptionsResource(descriptions="file", descriptions_path="fake_descriptions.json"),
        "data": DatasetsResource(data_root=str(data_root)),
    }


def table_rows(table) -> list[tuple]:
    """The rows of a `MetadataValue.table` (how per-class metadata is stored) as tuples, in column order."""
    return [tuple(record.data.values()) for record in table.records]


def materialize_partition(resources: dict, selection, partition: str):
    """Materialize `selection` of the NoLA graph for one dataset on a fresh ephemeral instance; must succeed."""
    from dagster import DagsterInstance, materialize

    from nola_assets.assets import NOLA_ASSETS
    from nola_assets.partitions import DATASETS

    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASETS, [partition])
    result = materialize(NOLA_ASSETS, selection=selection, instance=instance, partition_key=partition,
                         resources=resources)
    assert result.success
    return result
