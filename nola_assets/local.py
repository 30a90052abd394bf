"""Running the asset graph on the local embedded instance: what `nola demo`, `nola run` and
`nola dev` share.

The instance lives in a project-local Dagster home (`$DAGSTER_HOME`, default `.dagster_home/`):
SQLite storage, so `dagster dev` on the same home shows every run and materialization. Its
`dagster.yaml`, written once if missing, limits every concurrency pool, and so the `gpu` pool of
the GPU-bound assets, to one step at a time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import polars as pl
from dagster import AssetKey, DagsterInstance, ExecuteInProcessResult

from nola_core.data import load_dataset_spec

from nola_assets.artifacts import ArtifactRef, ArtifactStore
from nola_assets.assets import METHOD_EVALUATION_FILE
from nola_assets.partitions import DATASETS

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


def local_instance() -> DagsterInstance:
    return DagsterInstance.from_config(str(dagster_home()))


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
    """Run `nola_job` for one partition in this process, recorded in `instance`.

    `resources_config` holds only the resource fields to set for this run; the run config is
    stored with the run, so re-executing it from the UI repeats it.
    """
    from nola_assets.definitions import defs

    run_config = {
        "resources": {key: {"config": dict(values)} for key, values in resources_config.items() if values},
        "loggers": {"console": {"config": {"log_level": "INFO"}}},
    }
    return defs.resolve_job_def("nola_job").execute_in_process(
        instance=instance, partition_key=name, run_config=run_config, tags=dict(tags)
    )


def evaluation_of(result: ExecuteInProcessResult, store: ArtifactStore) -> pl.DataFrame:
    """The `evaluation` asset's table: NoLA's stages, `EVALUATION_SCHEMA` rows."""
    ref: ArtifactRef = result.asset_value(AssetKey("evaluation"))
    return store.read_table(ref, METHOD_EVALUATION_FILE)
