"""What every asset module shares: the asset decorator, the `gpu` pool and its pod tags, the
artifact file names, the one builder of artifact keys, the result every asset returns, progress
and process dispatch, and the readers of the trained stages several groups load."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from nola_core.checkpoints import load_alignment_network, load_tuned_classifier
from nola_core.data import REDUCED_JPEG_DECODE
from nola_core.distributed import launch
from nola_core.models import ClipModel, ModelConfig, PromptTunedClassifier
from nola_core.progress import progress_callback
from nola_core.tuning import TuningConfig

from nola_assets.artifacts import ArtifactRef, ArtifactStore
from nola_assets.cluster import on_nodes
from nola_assets.partitions import datasets_partitions
from nola_assets.resources import ComputeResource, DatasetsResource

REFS_IO_MANAGER = "artifact_refs"
GPU_POOL = "gpu"

DESCRIPTIONS_FILE = "descriptions.json"
CLASSIFIERS_FILE = "classifiers.safetensors"
FEATURES_FILE = "features.safetensors"
PSEUDO_LABELS_FILE = "pseudo_labels.parquet"
REPORT_FILE = "report.json"
CLASS_SIMILARITY_FILE = "class_similarity.png"  # the most confused classes' heatmap, drawn off the GPU step
NETWORK_FILE = "dl_network.safetensors"
TRAINABLE_FILE = "trainable.safetensors"
RESUME_DIR = "resume"  # prompt tuning's per-epoch state while it runs
TUNED_FEATURES_FILE = "tuned_features.safetensors"
PREDICTIONS_FILE = "predictions.parquet"
METHOD_EVALUATION_FILE = "method_evaluation.parquet"  # EVALUATION_SCHEMA rows of a method asset (`evaluation`: NoLA's)


# Pod settings for GPU steps when the code location runs `k8s_job_executor` (one pod per step);
# with the default one-pod-per-run launcher the run pod's GPU request applies and this is unused.
GPU_POD_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {
            "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
            "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"}}},
        "pod_spec_config": {
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    }
}


def nola_asset(group: str, version: str, pool: str | None = None, kinds: set[str] | None = None, deps=None):
    """Every NoLA asset: partitioned by dataset, value stored as an `ArtifactRef`.

    `deps`: assets that must run first without passing a value (the `preflight`).
    `version` is the asset's code version: bump it with any change to what the asset computes. It
    enters the artifact key (`allocate_or_reuse`), so a new version never reuses or overwrites the
    old artifacts, and Dagster shows the asset and what depends on it as stale until rematerialized.
    """
    return asset(
        partitions_def=datasets_partitions,
        io_manager_key=REFS_IO_MANAGER,
        group_name=group,
        pool=pool,
        op_tags=GPU_POD_TAGS if pool == GPU_POOL else None,
        code_version=version,
        kinds=kinds or {"pytorch"},
        deps=deps,
    )


def asset_result(ref: ArtifactRef, started: float, metadata: dict, reused: bool = False) -> MaterializeResult:
    """What every asset returns: its ref as the value, its digest as the data version, timings."""
    metadata = {**metadata, "reused": reused, "seconds": round(time.perf_counter() - started, 2),
                "artifact": MetadataValue.path(ref.path), "artifact_digest": ref.digest}
    return MaterializeResult(value=ref, metadata=metadata, data_version=DataVersion(ref.digest))


def image_progress(context: AssetExecutionContext, what: str) -> Callable[[int, int], None]:
    """`what: done/total images`, rate and time left in the step log at a bounded rate (a bar too
    under `nola run` at a terminal: nola_core.progress)."""
    return progress_callback(what, "images", context.log.info)


def on_processes(context: AssetExecutionContext, compute: ComputeResource, items: int, stage: Callable, job: Any,
                 progress: Callable | None = None, workdir: Path | None = None,
                 artifacts: ArtifactStore | None = None, data: DatasetsResource | None = None) -> Any:
    """`stage(distributed context, job, progress)` on `compute`'s processes; rank 0's result.

    One process (the default, or fewer `items` than processes): here, with live `progress`.
    `nproc_per_node` N > 1: `nola_core.distributed.launch` spawns N processes (one GPU each, or
    gloo on the CPU) that load their models from the configs in `job` (`nola_core.jobs`); each
    logs its own lines to stderr (the step's compute log). `nodes` > 1: a Kubeflow PyTorchJob of
    that many pods, `nproc_per_node` processes each, launched through Dagster Pipes
    (`nola_assets.cluster`), its files in `workdir` (a folder of the artifact being made in
    `artifacts`; on a URL root they travel through the store, and so do images of a URL `data` root).
    """
    if compute.node_count() > 1:
        if workdir is None:
            raise ValueError(f"{stage.__name__}: nodes > 1 needs a workdir on the shared artifact store")
        return on_nodes(context, compute, stage, job, workdir, artifacts, data)
    processes = min(compute.processes(), items)
    if processes == 1:
        return launch(stage, 1, job, progress, device=compute.torch_device())
    context.log.info(f"{stage.__name__}: {items} item(s) over {processes} processes "
                     f"(about {-(-items // processes)} each), progress in the compute log")
    return launch(stage, processes, job, None, device=compute.rank_device())


def code_version(context: AssetExecutionContext) -> str:
    """The code version of the asset being materialized, as its definition declares it."""
    return context.assets_def.code_versions_by_key[context.asset_key]


def compute_facts(device: torch.device, precision: str | None = None, reads_images: bool = False) -> dict:
    """What of the compute settings changes an artifact's floats: the device type (CPU and CUDA
    kernels round differently), the resolved feature precision when features are extracted
    (`auto` resolves differently between CPUs), and the JPEG decoding when images are read
    (reduced decoding gives slightly different pixels). Batch sizes, workers and the number of
    processes are not here: they change no result beyond float rounding (nola_core.tuning)."""
    facts: dict[str, Any] = {"device_type": device.type}
    if precision is not None:
        facts["precision"] = precision
    if reads_images:
        facts["decode"] = REDUCED_JPEG_DECODE
    return facts


def artifact_key(
    version: str,
    *,
    upstream: Mapping[str, ArtifactRef] | None = None,
    clip: ModelConfig | None = None,
    dino: ModelConfig | None = None,
    compute: Mapping[str, Any] | None = None,
    **inputs: Any,
) -> dict:
    """The key of an artifact: everything that changes its content, as one flat mapping.

    `version`: the asset's code version; `upstream`: name → upstream artifact, keyed by its
    digest; `clip`/`dino`: the models' identities; `compute`: `compute_facts`; `inputs`: any
    other value (configs as dataclasses, stored as dicts). A name given by two parts is an error:
    a silent overwrite would drop a fact from the key.
    """
    parts = [
        {name: ref.digest for name, ref in (upstream or {}).items()},
        {"clip": clip.clip_identity()} if clip is not None else {},
        {"dino": dino.dino_identity()} if dino is not None else {},
        dict(compute or {}),
        {name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
         for name, value in inputs.items()},
        {"code_version": version},
    ]
    key: dict[str, Any] = {}
    for part in parts:
        repeated = key.keys() & part.keys()
        if repeated:
            raise ValueError(f"artifact key: {sorted(repeated)} given twice")
        key.update(part)
    return key


def allocate_or_reuse(context: AssetExecutionContext, artifacts: ArtifactStore,
                      **key_parts: Any) -> tuple[ArtifactRef, bool]:
    """The artifact of this asset and partition for `artifact_key(<its code version>, **key_parts)`,
    and whether it is already finished (its ref.json is written only after the asset returned), in
    which case the asset returns it as is (`asset_result(..., reused=True)`) and computes nothing."""
    asset_name, dataset = context.asset_key.path[-1], context.partition_key
    key = artifact_key(code_version(context), **key_parts)
    finished = artifacts.complete_ref(asset_name, dataset, key)
    if finished is not None:
        context.log.info(f"{asset_name}: reusing the finished artifact {finished.digest} (same key)")
        return finished, True
    return artifacts.allocate(asset_name, dataset, key), False


def dl_network_of(alignment_checkpoint: ArtifactRef) -> torch.nn.Module:
    """The DL network an `alignment_checkpoint` artifact holds."""
    facts = alignment_checkpoint.facts
    return load_alignment_network(alignment_checkpoint.file(NETWORK_FILE), facts["in_dim"], facts["num_classes"],
                                  facts["hidden_dim"])


def tuned_classifier_of(prompt_tuned_encoder: ArtifactRef, clip: ClipModel, cde: torch.Tensor,
                        device: torch.device) -> PromptTunedClassifier:
    """The classifier a `prompt_tuned_encoder` artifact holds, on `clip` (the CLIP it was tuned on)."""
    ref = prompt_tuned_encoder
    return load_tuned_classifier(clip, cde, TuningConfig.from_dict(ref.facts["tuning"]), ref.file(TRAINABLE_FILE),
                                 device, trained_on=ref.key["clip"])
