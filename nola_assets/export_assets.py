"""The adapted classifier as a self-contained export: the `exported_classifier` asset.

    prompt_tuned_encoder ─┐
    cde_classifier ───────┼─> exported_classifier      (nola export DATASET --to DIR copies it out)
    evaluation ───────────┘

It calls `nola_core.export.export_classifier` on the tuned model the `prompt_tuned_encoder`
asset stored, writing `classifier.json` + `trainable.safetensors` into the artifact store with
provenance: the description content hash, the tuning/model configuration, the image-set
fingerprint and the forgetting guard (tuned encoder + templates vs untuned zero-shot) from the
evaluation. `nola_core.export.load_classifier` loads it back; `nola predict` uses that.

The export is gated by the judgement of the `tuned_not_worse_than_zero_shot` check, made on the
same evaluation artifact: a run started by a sensor or a schedule fails this step rather than
export a tuned model worse than zero-shot (`checks.export_blocked`), unless
`NOLA_EXPORT_WORSE_THAN_ZERO_SHOT=allow`; a run a person started exports it with a warning.
"""

import time
from pathlib import Path

import polars as pl
import torch
from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue

from nola_core.eval import comparison_split, split_column, stage_value
from nola_core.export import EXPORT_ASSET, TENSORS_NAME, export_classifier
from nola_core.stage_names import NOLA_TEMPLATES_STAGE, ZERO_SHOT_STAGE

from nola_assets.artifacts import ArtifactRef, ArtifactStore
from nola_assets.common import (
    CLASSIFIERS_FILE,
    METHOD_EVALUATION_FILE,
    allocate_or_reuse,
    asset_result,
    nola_asset,
    tuned_classifier_of,
)
from nola_assets.checks import export_blocked, tuned_vs_zero_shot_result
from nola_assets.resources import EXPORT_POLICIES, MethodResource, ModelsResource


def forgetting_guard(evaluation: pl.DataFrame) -> dict:
    """Top-1 of the tuned encoder on the zero-shot path (templates) against the untuned zero-shot,
    on the `evaluation` asset's table (held-out split where there is one, else transductive: `split`).

    `delta` < 0 means tuning lost some of CLIP's zero-shot ability on these images. Values are
    None without a labelled split.
    """
    split = comparison_split(evaluation)
    tuned = untuned = None
    if split is not None:
        tuned = stage_value(evaluation, NOLA_TEMPLATES_STAGE, split_column(split, "top1"))
        untuned = stage_value(evaluation, ZERO_SHOT_STAGE, split_column(split, "top1"))
    return {
        "split": split,
        "tuned_encoder_templates_top1": tuned,
        "untuned_zero_shot_top1": untuned,
        "delta": None if tuned is None or untuned is None else tuned - untuned,
        "random_models": bool(evaluation["random_models"].any()),
    }


@nola_asset(group="export", version="1", kinds={"pytorch", "safetensors"})
def exported_classifier(
    context: AssetExecutionContext,
    dataset_manifest: ArtifactRef,
    cde_classifier: ArtifactRef,
    prompt_tuned_encoder: ArtifactRef,
    evaluation: ArtifactRef,
    models: ModelsResource,
    method: MethodResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """The tuned classifier as one folder (`nola export DATASET --to DIR` copies it out): trainable
    tensors, base-model identity, preprocessing, class names and provenance, loadable with
    `nola_core.export.load_classifier`. The metadata also shows the forgetting guard. A tuned model
    worse than zero-shot is not exported by a sensor- or schedule-started run (the step fails)."""
    started = time.perf_counter()
    name = context.partition_key
    classes = dataset_manifest.facts["classes"]
    config = models.config()
    evaluated = artifacts.read_table(evaluation, METHOD_EVALUATION_FILE)
    verdict = tuned_vs_zero_shot_result(evaluated)
    if not verdict.passed:
        if export_blocked(context.run.tags, method.setting("export_worse_than_zero_shot", EXPORT_POLICIES[0])):
            raise Failure(description=f"{name}: not exported: {verdict.description} (a run started by a sensor "
                          "or a schedule; NOLA_EXPORT_WORSE_THAN_ZERO_SHOT=allow exports it anyway)",
                          metadata=verdict.metadata, allow_retries=False)
        context.log.warning(f"{name}: exporting a tuned model worse than zero-shot: {verdict.description}")
    guard = forgetting_guard(evaluated)
    provenance = {
        "dataset": name,
        "descriptions_content_hash": cde_classifier.key.get("descriptions"),
        "templates": cde_classifier.key.get("templates"),
        "image_set_version": dataset_manifest.facts.get("image_set_version"),
        "dataset_manifest_digest": dataset_manifest.digest,
        "prompt_tuned_encoder_digest": prompt_tuned_encoder.digest,
        "tuning": prompt_tuned_encoder.facts.get("tuning"),
        "wiseft_alpha": prompt_tuned_encoder.key.get("wiseft_alpha"),
        "pseudo_labels_digest": prompt_tuned_encoder.key.get("pseudo_labels"),
        "checkpoint": "last epoch (never chosen on labels)",
        "forgetting_guard": guard,
    }
    ref, reused = allocate_or_reuse(
        context, artifacts, upstream={"tuned": prompt_tuned_encoder, "cde": cde_classifier, "evaluation": evaluation},
        clip=config, classes=classes)
    if reused:
        return asset_result(ref, started, {"tuned_not_worse_than_zero_shot": verdict.passed}, reused=True)
    clip = models.load_clip("cpu")
    cde = artifacts.read_tensors(cde_classifier, CLASSIFIERS_FILE)["cde"]
    classifier = tuned_classifier_of(prompt_tuned_encoder, clip, cde, torch.device("cpu")).eval()
    manifest = export_classifier(classifier, config, clip.preprocess, classes, ref.path, provenance)
    ref = ref.with_facts(classes=list(classes), random_clip=config.clip_is_random)
    if guard["delta"] is not None and guard["delta"] < 0:
        context.log.warning(
            f"{name}: forgetting guard: tuned encoder + templates top-1 {guard['tuned_encoder_templates_top1']:.3f} "
            f"< untuned zero-shot {guard['untuned_zero_shot_top1']:.3f}"
            + (" (random models: expected to be noise)" if guard["random_models"] else ""))
    metadata = {
        "tuned_not_worse_than_zero_shot": verdict.passed,
        "classes": len(classes),
        "manifest": MetadataValue.path(str(manifest)),
        "trainable_tensors_bytes": Path(ref.path, TENSORS_NAME).stat().st_size,
        "provenance": MetadataValue.json(provenance),
        "forgetting_guard": MetadataValue.json(guard),
        "usage": MetadataValue.md(f"`nola export {name} --to DIR`, then `nola predict DIR IMAGE...`"),
    }
    if guard["delta"] is not None:
        metadata["forgetting_guard/delta_top1"] = guard["delta"]
    return asset_result(ref, started, metadata)


EXPORT_ASSETS = [exported_classifier]
