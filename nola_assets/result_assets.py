"""The results group: NoLA's predictions and evaluation, and every method side by side.

    prompt_tuned_encoder, clip_features ─> predictions ─> evaluation ─┐
    zero_shot_classifier, lafter_encoder, latteclip_encoder ──────────┴─> method_comparison

`method_comparison` writes every method's rows to a stable folder, one parquet per dataset and
method, `<artifact root>/evaluation/<dataset>/<method>.parquet` (atomically replaced; on a URL root
in the object store, each table uploaded in one move after the local copy of the folder was
brought up to date, so the report below sees every dataset's tables), runs
`nola_core.report.write_report` over all of them (the DuckDB view: which method wins where) and
attaches the markdown and the PNG bar chart to its metadata.
"""

import time
from pathlib import Path

import polars as pl
import torch
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue

from nola_core.data import loading
from nola_core.alignment import selection_from_frame
from nola_core.eval import RANDOM_MODEL_NOTE, SPLITS, EvaluationLabels, evaluate_stages, format_stage_table, split_column, stage_value
from nola_core.features import load_feature_table
from nola_core.methods import evaluation_path, write_evaluation
from nola_core.methods import nola as nola_method
from nola_core.methods.evaluation import method_rows
from nola_core.predictions import prediction_table, tuned_head_top_classes
from nola_core.report import EVALUATION_FOLDER, write_report
from nola_core.stage_names import NOLA_SELECTION_STAGE

from nola_assets import reporting
from nola_assets.artifacts import ArtifactRef, ArtifactStore
from nola_assets.common import (
    CLASSIFIERS_FILE,
    FEATURES_FILE,
    GPU_POOL,
    METHOD_EVALUATION_FILE,
    PREDICTIONS_FILE,
    PSEUDO_LABELS_FILE,
    TUNED_FEATURES_FILE,
    allocate_or_reuse,
    asset_result,
    compute_facts,
    dl_network_of,
    nola_asset,
    tuned_classifier_of,
)
from nola_assets.datasets import load_manifests
from nola_assets.resources import ComputeResource, DatasetsResource, ModelsResource

COMPARISON_FILE = "comparison.parquet"


def evaluation_root(artifacts: ArtifactStore) -> Path:
    """The stable folder of the per-method evaluation tables (what `nola report` can read); for a URL
    artifact root, its local copy, brought up to date from the store."""
    return artifacts.shared_folder(EVALUATION_FOLDER)


@nola_asset(group="results", version="1", pool=GPU_POOL, kinds={"pytorch", "parquet"})
def predictions(
    context: AssetExecutionContext,
    dataset_manifest: ArtifactRef,
    cde_classifier: ArtifactRef,
    clip_features: ArtifactRef,
    prompt_tuned_encoder: ArtifactRef,
    data: DatasetsResource,
    models: ModelsResource,
    compute: ComputeResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """The tuned model's class for every unlabeled image (predictions.parquet: image_id, path,
    predicted_class, predicted_index, confidence), plus the tuned embeddings evaluation scores."""
    started = time.perf_counter()
    name = context.partition_key
    spec = data.spec(name)
    unlabeled, labeled = load_manifests(artifacts, dataset_manifest)
    records = loading.evaluation_records(unlabeled, labeled)
    device = compute.torch_device()
    ref, reused = allocate_or_reuse(
        context, artifacts,
        upstream={"tuned": prompt_tuned_encoder, "clip_features": clip_features, "manifest": dataset_manifest},
        compute=compute_facts(device, compute.feature_config().resolved_precision(device), reads_images=True))
    if reused:
        return asset_result(ref, started, {}, reused=True)
    clip = models.load_clip(device)
    classifier = tuned_classifier_of(prompt_tuned_encoder, clip,
                                     artifacts.read_tensors(cde_classifier, CLASSIFIERS_FILE)["cde"], device)
    tuned_table = loading.tuned_image_features(classifier, clip, spec.root, records, compute.feature_config(), device,
                                                output=ref.file(TUNED_FEATURES_FILE))  # written as computed
    ids = load_feature_table(clip_features.file(FEATURES_FILE), mmap=True).ids  # only the ids are read
    top = tuned_head_top_classes(classifier, tuned_table, ids)  # streamed, never [N, C]
    frame = prediction_table(unlabeled, ids, top, dataset_manifest.facts["classes"])
    artifacts.write_table(ref, PREDICTIONS_FILE, frame)

    counts = {c: 0 for c in dataset_manifest.facts["classes"]}
    counts.update(dict(frame.group_by("predicted_class").len().iter_rows()))
    return asset_result(ref, started, {
        "images": frame.height,
        "mean_confidence": float(frame["confidence"].mean()) if frame.height else float("nan"),
        "per_class": reporting.per_class_table({"class": list(counts), "images": list(counts.values())},
                                               rank=list(counts.values()), ranked_by="the most predicted first"),
        "preview": MetadataValue.md(reporting.markdown_table(
            ["path", "predicted_class", "confidence"], frame.select("path", "predicted_class", "confidence").head(10).rows())),
        "predicted_classes": reporting.png_markdown(reporting.bar_chart(
            list(counts), list(counts.values()), "predicted class of unlabeled images", "images"), "predictions"),
        "predictions_file": MetadataValue.path(str(ref.file(PREDICTIONS_FILE))),
    })


@nola_asset(group="results", version="1", kinds={"json"})
def evaluation(
    context: AssetExecutionContext,
    dataset_manifest: ArtifactRef,
    cde_classifier: ArtifactRef,
    clip_features: ArtifactRef,
    dino_features: ArtifactRef,
    cde_pseudo_labels: ArtifactRef,
    alignment_checkpoint: ArtifactRef,
    prompt_tuned_encoder: ArtifactRef,
    predictions: ArtifactRef,
    models: ModelsResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """Every stage's accuracy (zero-shot, CDE, DL network, NoLA, tuned encoder + templates) on the
    transductive and the held-out split, separately, and the pseudo-label precision, when
    `labeled/` exists (`nola_core.eval.evaluate_stages`). Report only: nothing upstream reads it.
    One table, method_evaluation.parquet (`EVALUATION_SCHEMA`, method `nola`): the checks, the
    export's forgetting guard, the CLI and `method_comparison` read it."""
    started = time.perf_counter()
    name = context.partition_key
    unlabeled, labeled = load_manifests(artifacts, dataset_manifest)
    classes = dataset_manifest.facts["classes"]
    ref, reused = allocate_or_reuse(context, artifacts, upstream={
        "predictions": predictions, "dino_features": dino_features, "alignment": alignment_checkpoint,
        "pseudo_labels": cde_pseudo_labels})
    if reused:
        return asset_result(ref, started, {}, reused=True)
    classifiers = artifacts.read_tensors(cde_classifier, CLASSIFIERS_FILE)
    classifier = tuned_classifier_of(prompt_tuned_encoder, models.load_clip("cpu"), classifiers["cde"],
                                     torch.device("cpu"))
    # Memory-mapped and streamed: each stage keeps only every image's top class (never [N, C]).
    clip_table = load_feature_table(clip_features.file(FEATURES_FILE), mmap=True)
    top = nola_method.stage_predictions(
        clip_table,
        load_feature_table(dino_features.file(FEATURES_FILE), mmap=True),
        classifiers["zero_shot"], classifiers["cde"],
        dl_network_of(alignment_checkpoint),
        classifier,
        load_feature_table(predictions.file(TUNED_FEATURES_FILE), mmap=True),
        cde_pseudo_labels.facts["logit_scale"],
    )
    selected = artifacts.read_table(cde_pseudo_labels, PSEUDO_LABELS_FILE)
    train_ids = selected["image_id"].to_list()
    selection = nola_method.selection_pseudo_labels(selection_from_frame(
        selected, cde_pseudo_labels.facts["k"], cde_pseudo_labels.facts["num_classes"]), train_ids)
    stages = evaluate_stages(nola_method.nola_stage_outputs(top, clip_table.ids, selection, train_ids), classes,
                             EvaluationLabels.from_manifests(unlabeled, labeled))
    random_models = cde_classifier.facts["random_clip"] or dino_features.facts["random_weights"]
    note = RANDOM_MODEL_NOTE if random_models else None
    artifacts.write_table(ref, METHOD_EVALUATION_FILE, method_rows(
        stages, dataset=name, method=nola_method.METHOD, seed=prompt_tuned_encoder.facts["tuning"]["seed"],
        n_unlabeled=len(train_ids), random_models=random_models))
    ref = ref.with_facts(random_models=random_models, labelled=labeled is not None)
    context.log.info("\n" + format_stage_table(stages, note))

    metadata = {
        "labelled_split": labeled is not None,
        "random_models": random_models,
        "stages": MetadataValue.md(reporting.stage_table_markdown(stages, note)),
        **{f"images/{split}": int(stages[split_column(split, "n")].max() or 0) for split in SPLITS},
    }
    accuracies = {f"{row['stage']} ({split})": row[split_column(split, "top1")]
                  for split in SPLITS for row in stages.iter_rows(named=True)
                  if row[split_column(split, "top1")] is not None}
    if accuracies:
        metadata["accuracy"] = reporting.png_markdown(reporting.bar_chart(
            list(accuracies), list(accuracies.values()), "top-1 accuracy per stage (split)", "accuracy"),
            "accuracy per stage")
        metadata.update({f"top1/{split}/{row['stage']}": row[split_column(split, "top1")]
                         for split in SPLITS for row in stages.iter_rows(named=True)
                         if row[split_column(split, "top1")] is not None})
    precision = stage_value(stages, NOLA_SELECTION_STAGE, "pseudo_label_precision")
    if precision is not None:
        metadata["pseudo_label_precision"] = precision  # of the top-k selection, on the adaptation images
    return asset_result(ref, started, metadata)


@nola_asset(group="results", version="1", kinds={"parquet", "duckdb"})
def method_comparison(
    context: AssetExecutionContext,
    zero_shot_classifier: ArtifactRef,
    lafter_encoder: ArtifactRef,
    latteclip_encoder: ArtifactRef,
    evaluation: ArtifactRef,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """Every method side by side: each method's evaluation rows written to
    `<artifact root>/evaluation/<dataset>/<method>.parquet` (atomically), then the DuckDB report over
    all datasets there (`nola_core.report.write_report`): markdown and PNG bar chart in
    `<artifact root>/evaluation/<dataset>/report/`, both attached to this asset's metadata."""
    started = time.perf_counter()
    name = context.partition_key
    upstream = [zero_shot_classifier, lafter_encoder, latteclip_encoder, evaluation]
    ref, reused = allocate_or_reuse(context, artifacts, upstream={r.asset: r for r in upstream})
    if not reused:
        artifacts.write_table(ref, COMPARISON_FILE,
                              pl.concat([artifacts.read_table(r, METHOD_EVALUATION_FILE) for r in upstream]))
    frame = artifacts.read_table(ref, COMPARISON_FILE)  # published again even when reused: after A -> B -> A, A's rows
    root = evaluation_root(artifacts)
    paths = {}
    for (method_name,), part in frame.group_by(["method"], maintain_order=True):
        [paths[method_name]] = write_evaluation(part, root, name=method_name)
    artifacts.publish_files(list(paths.values()))
    metadata: dict = {
        "methods": MetadataValue.json(list(paths)),
        "rows": frame.height,
        "evaluation_root": MetadataValue.path(artifacts.remote().url(EVALUATION_FOLDER) if artifacts.remote() else str(root)),
        "evaluation_files": MetadataValue.json({m: str(p) for m, p in paths.items()}),
        **reporting.evaluation_metadata(frame.filter(pl.col("final"))),
    }
    final = frame.filter(pl.col("final") & pl.any_horizontal(pl.col(split_column(s, "top1")).is_not_null()
                                                             for s in SPLITS))
    if final.is_empty():
        context.log.warning(f"{name}: no labelled images, so no accuracy to report")
        metadata["report"] = "no labelled images: no accuracy to rank the methods by"
    else:
        report = write_report(root, out=evaluation_path(root, name).parent / "report")
        artifacts.publish_files([report.markdown, report.chart])
        context.log.info("\n" + report.text)
        metadata.update({
            "report": MetadataValue.md(report.markdown.read_text(encoding="utf-8")),
            "report_chart": reporting.png_markdown(report.chart.read_bytes(), "top-1 accuracy per method"),
            "report_markdown": MetadataValue.path(str(report.markdown)),
            "report_png": MetadataValue.path(str(report.chart)),
        })
        ranked = report.summary.filter(pl.col("dataset") == name)
        for (split,), part in ranked.group_by(["split"], maintain_order=True):
            metadata[f"winner/{split}"] = str(part.sort("rank")["method"][0])
    ref = ref.with_facts(methods=list(paths))
    return asset_result(ref, started, metadata, reused=reused)
