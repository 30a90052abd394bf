"""What a run's Kubernetes pod asks for: the `dagster-k8s/config` tag of the runs that need GPUs.

The number of GPUs of a run is one setting, `NOLA_RUN_GPUS` (default 1), read on the code
location where runs are defined and requested: `nola_job`'s tags when the code location loads,
each sensor or schedule request when it is made (as the `dagster/max_runtime` tag is:
nola_assets/run_limits.py). A run that materializes an asset of the `gpu` pool gets a tag whose
container asks for that many `nvidia.com/gpu` and sets `NOLA_NPROC_PER_NODE` to it (one DDP
process per GPU: ComputeResource.nproc_per_node), with the GPU node pool's selector and
toleration. A run of CPU-only assets (manifest, class descriptions, ...) gets a tag without any of
that, so it replaces the job's GPU tag and its pod lands on a CPU node. `K8sRunLauncher` merges
the tag into the Helm values' `runK8sConfig` (deploy/k8s/values.yaml), which asks for no GPU.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Collection, Mapping, Sequence

from dagster import AssetKey, AssetsDefinition

from nola_assets.common import GPU_POD_TAGS, GPU_POOL

K8S_CONFIG_TAG = "dagster-k8s/config"
RUN_GPUS_ENV = "NOLA_RUN_GPUS"
DEFAULT_RUN_GPUS = 1
GPU_RESOURCE = "nvidia.com/gpu"


def run_gpus(env: Mapping[str, str] = os.environ) -> int:
    """`NOLA_RUN_GPUS`, checked: a whole number >= 1."""
    raw = env.get(RUN_GPUS_ENV, "").strip() or str(DEFAULT_RUN_GPUS)
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{RUN_GPUS_ENV}={raw!r}: expected a whole number of GPUs, at least 1")
    return int(raw)


def gpu_pod_config(gpus: int) -> dict:
    """A `dagster-k8s/config` value: the GPU steps' pod settings (common.GPU_POD_TAGS: CPU, memory,
    GPU node selector and toleration) with `gpus` GPUs and as many processes."""
    config = copy.deepcopy(GPU_POD_TAGS[K8S_CONFIG_TAG])
    container = config["container_config"]
    for part in ("requests", "limits"):
        container["resources"][part][GPU_RESOURCE] = str(gpus)
    container["env"] = [{"name": "NOLA_NPROC_PER_NODE", "value": str(gpus)}]
    return config


CPU_POD_CONFIG = {"container_config": {"env": [{"name": "NOLA_NPROC_PER_NODE", "value": "1"}]}}
"""The tag of a run without GPU work: one process, no GPU, no GPU node."""


def run_pod_tags(assets: Sequence[AssetsDefinition], selection: Collection[AssetKey] | None = None,
                 env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`{"dagster-k8s/config": <JSON>}` for a run of `selection` (None: all of `assets`): `NOLA_RUN_GPUS`
    GPUs when it materializes an asset of the `gpu` pool, else a CPU pod. Run tags are strings:
    dagster-k8s reads this one as JSON."""
    needs_gpu = any(getattr(definition.op, "pool", None) == GPU_POOL
                    and (selection is None or any(key in selection for key in definition.keys))
                    for definition in assets if definition.is_executable)
    return {K8S_CONFIG_TAG: json.dumps(gpu_pod_config(run_gpus(env)) if needs_gpu else CPU_POD_CONFIG)}
