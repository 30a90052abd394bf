"""The prompt_tuning group: CLIP's vision encoder tuned FixMatch-style on the DL network's labels.

    dataset_manifest, cde_classifier, cde_pseudo_labels, alignment_checkpoint (dino_features)
        ─> prompt_tuned_encoder ─> predictions, evaluation, exported_classifier
"""

import dataclasses
import shutil
import time
from pathlib import Path

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue

from nola_core.features import load_feature_table
from nola_core.jobs import PromptTuningJob, prompt_tuning_stage
from nola_core.methods import nola as nola_method
from nola_core.progress import progress_callback
from nola_core.tuning import EpochStats

from nola_assets import reporting
from nola_assets.artifacts import ArtifactRef, ArtifactStore
from nola_assets.common import (
    CLASSIFIERS_FILE,
    FEATURES_FILE,
    GPU_POOL,
    PSEUDO_LABELS_FILE,
    RESUME_DIR,
    TRAINABLE_FILE,
    allocate_or_reuse,
    asset_result,
    compute_facts,
    dl_network_of,
    nola_asset,
    on_processes,
)
from nola_assets.datasets import load_manifests
from nola_assets.resources import ComputeResource, DatasetsResource, MethodResource, ModelsResource


@nola_asset(group="prompt_tuning", version="1", pool=GPU_POOL)
def prompt_tuned_encoder(
    context: AssetExecutionContext,
    dataset_manifest: ArtifactRef,
    cde_classifier: ArtifactRef,
    cde_pseudo_labels: ArtifactRef,
    alignment_checkpoint: ArtifactRef,
    dino_features: ArtifactRef,
    data: DatasetsResource,
    models: ModelsResource,
    method: MethodResource,
    compute: ComputeResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """CLIP's vision encoder with learnable visual prompts, LayerNorm affines and a CDE-initialised
    head, trained FixMatch-style: the DL network labels a weak view, CLIP learns from a strong view.
    Only the trainable tensors are stored. The last epoch is kept: nothing is chosen on labels.
    With `fixed_pseudo_labels` the DL network labels each image once, from its stored DINO features."""
    started = time.perf_counter()
    name = context.partition_key
    spec = data.spec(name)
    unlabeled, _ = load_manifests(artifacts, dataset_manifest)
    by_id = {r.image_id: r for r in unlabeled.records}
    records = [by_id[i] for i in artifacts.read_table(cde_pseudo_labels, PSEUDO_LABELS_FILE)["image_id"]]
    cde = artifacts.read_tensors(cde_classifier, CLASSIFIERS_FILE)["cde"]
    config, device = models.config(), compute.torch_device()
    tuning = method.tuning_config(compute)
    alpha = tuning.wiseft_alpha
    upstream = {"manifest": dataset_manifest, "cde": cde_classifier, "pseudo_labels": cde_pseudo_labels,
                "alignment": alignment_checkpoint}
    if tuning.fixed_pseudo_labels:  # only then do the stored DINO features shape the result
        upstream["dino_features"] = dino_features
    # No process count: every optimizer step sees the same images whatever the split (nola_core.tuning).
    ref, reused = allocate_or_reuse(context, artifacts, upstream=upstream, clip=config, dino=config,
                                    compute=compute_facts(device, reads_images=True), tuning=tuning, wiseft_alpha=alpha)
    if reused:
        return asset_result(ref, started, {}, reused=True)
    dl_network = dl_network_of(alignment_checkpoint)
    fixed_labels = None
    if tuning.fixed_pseudo_labels:
        fixed_labels = nola_method.fixed_pseudo_labels(  # streamed over the mapped table; only labels travel
            dl_network, load_feature_table(dino_features.file(FEATURES_FILE), mmap=True), [r.image_id for r in records])

    logged: set[int] = set()
    epochs_done = progress_callback("prompt tuning", "epochs", context.log.info)

    def progress(stats: EpochStats) -> None:
        logged.add(stats.epoch)
        epochs_done(stats.epoch, tuning.epochs, loss=stats.loss, agreement=stats.agreement,
                    entropy=stats.mean_entropy)

    context.log.info(f"prompt tuning on {len(records)} images, {tuning.epochs} epochs, device {device}")
    # Per-epoch resumable state, under this artifact's content-keyed folder: a killed run (SIGKILL,
    # pre-empted node) resumes after its last saved epoch when the same key is materialized again.
    resume_dir = ref.file(RESUME_DIR)
    job = PromptTuningJob(config, dl_network, cde, spec.root, tuple(records), tuning, resume_dir, fixed_labels)
    trainable, history = on_processes(context, compute, len(records), prompt_tuning_stage, job, progress=progress,
                                      workdir=Path(ref.path), artifacts=artifacts, data=data)
    for stats in history:  # epochs logged elsewhere (a spawned rank 0's compute log, an earlier resumed run)
        if stats.epoch not in logged:
            progress(stats)
    artifacts.write_tensors(ref, TRAINABLE_FILE, trainable, {"tuning": str(dataclasses.asdict(tuning))})
    shutil.rmtree(resume_dir, ignore_errors=True)  # the artifact is complete: nothing left to resume
    ref = ref.with_facts(tuning=dataclasses.asdict(tuning))
    return asset_result(ref, started, {
        "epochs": tuning.epochs,
        "training_images": len(records),
        "final_loss": history[-1].loss,
        "final_agreement": history[-1].agreement,
        "trainable_parameters": sum(t.numel() for t in trainable.values()),
        "wiseft_alpha": "off" if alpha is None else alpha,
        "pseudo_labels_per": "image (fixed, from stored DINO features)" if tuning.fixed_pseudo_labels else "weak view",
        "history": MetadataValue.md(reporting.markdown_table(
            ["epoch", "loss", "entropy", "agreement", "images", "unreadable"],
            [(s.epoch, s.loss, s.mean_entropy, s.agreement, s.images, s.failed_images) for s in history])),
        "curves": reporting.png_markdown(reporting.line_chart(
            {"loss": [s.loss for s in history], "agreement": [s.agreement for s in history],
             "entropy": [s.mean_entropy for s in history]}, "prompt tuning (label-free signals)", "epoch"),
            "tuning curves"),
    })
