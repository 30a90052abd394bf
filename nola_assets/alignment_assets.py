"""The alignment group: the top-k CDE pseudo-labels and the DL network trained on them.

    cde_classifier, clip_features, dino_features ─> cde_pseudo_labels ─> alignment_checkpoint
                                                                          (DINO features ─┘)
"""

import time

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue

from nola_core.alignment import selection_frame, selection_from_frame, selection_report, train_alignment
from nola_core.data import known_labels
from nola_core.data.loading import training_ids
from nola_core.features import load_feature_table
from nola_core.methods import nola as nola_method
from nola_core.progress import progress_callback

from nola_assets import reporting
from nola_assets.artifacts import ArtifactRef, ArtifactStore, digest_of
from nola_assets.common import (
    CLASS_SIMILARITY_FILE,
    CLASSIFIERS_FILE,
    FEATURES_FILE,
    GPU_POOL,
    NETWORK_FILE,
    PSEUDO_LABELS_FILE,
    REPORT_FILE,
    allocate_or_reuse,
    asset_result,
    compute_facts,
    nola_asset,
)
from nola_assets.datasets import load_manifests
from nola_assets.resources import ComputeResource, MethodResource


@nola_asset(group="alignment", version="1", kinds={"pytorch", "parquet"})
def cde_pseudo_labels(
    context: AssetExecutionContext,
    dataset_manifest: ArtifactRef,
    cde_classifier: ArtifactRef,
    clip_features: ArtifactRef,
    dino_features: ArtifactRef,
    method: MethodResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """The k most confident images per class under the CDE classifier,
    k = max(k_min, floor(k_fraction·N/C)); an image chosen by two classes keeps the higher score.
    Precision is reported where an image's label happens to be known; it never selects anything."""
    started = time.perf_counter()
    name = context.partition_key
    unlabeled, labeled = load_manifests(artifacts, dataset_manifest)
    clip_table = load_feature_table(clip_features.file(FEATURES_FILE), mmap=True)
    dino_table = load_feature_table(dino_features.file(FEATURES_FILE), mmap=True)
    train_ids = training_ids(unlabeled, clip_table, dino_table)
    if not train_ids:
        raise RuntimeError(f"{name}: no unlabeled image could be read by both CLIP and DINO")
    cde = artifacts.read_tensors(cde_classifier, CLASSIFIERS_FILE)["cde"]
    config = method.alignment_config()
    classes = dataset_manifest.facts["classes"]
    ref, reused = allocate_or_reuse(context, artifacts, upstream={"cde": cde_classifier, "clip_features": clip_features},
                                    train_ids=digest_of(train_ids), k_min=config.k_min, k_fraction=config.k_fraction,
                                    logit_scale=config.logit_scale)
    if reused:
        return asset_result(ref, started, {}, reused=True)
    selection = nola_method.cde_pseudo_labels(clip_table.rows_for(train_ids), cde, config)
    report = selection_report(selection, classes, train_ids,
                              known_labels(unlabeled, labeled) if labeled is not None else {})
    paths = {r.image_id: r.path for r in unlabeled.records}
    artifacts.write_table(ref, PSEUDO_LABELS_FILE, selection_frame(train_ids, paths, selection, classes))
    artifacts.write_json(ref, REPORT_FILE, report)
    ref = ref.with_facts(k=selection.k, num_classes=selection.num_classes, logit_scale=config.logit_scale)
    context.log.info(f"top-{selection.k} pseudo-labels: {report['per_class']}")
    empty = [c for c, count in report["per_class"].items() if count == 0]
    if empty:
        context.log.warning(f"{name}: no pseudo-label at all for classes {empty}: the DL network never sees them")

    counts, short = report["per_class"], set(report["short_classes"])
    similarity_png = artifacts.write_bytes(ref, CLASS_SIMILARITY_FILE, reporting.class_similarity_heatmap(
        (cde @ cde.T).numpy(), classes, "CDE class-class cosine"))
    metadata = {
        "k": selection.k,
        "selected": report["selected"],
        "candidate_images": len(train_ids),
        "class_similarity": MetadataValue.path(str(similarity_png)),
        "per_class": reporting.per_class_table({
            "class": list(counts), "pseudo-labels": list(counts.values()),
            "fewer than k": [c in short for c in counts]}, rank=[-n for n in counts.values()],
            ranked_by="the fewest pseudo-labels first"),
        "short_classes": len(short),
        "classes_without_pseudo_labels": MetadataValue.json(empty),
        "histogram": reporting.png_markdown(reporting.bar_chart(
            list(counts), list(counts.values()),
            f"pseudo-labels per class (k = {selection.k})", "images"), "pseudo-labels per class"),
    }
    if "precision" in report:
        metadata["precision"] = report["precision"]
        metadata["labelled_selected"] = report["labelled_selected"]
    return asset_result(ref, started, metadata)


@nola_asset(group="alignment", version="1", pool=GPU_POOL)
def alignment_checkpoint(
    context: AssetExecutionContext,
    cde_pseudo_labels: ArtifactRef,
    dino_features: ArtifactRef,
    method: MethodResource,
    compute: ComputeResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """The DL network: an MLP on frozen DINO features (768→256→C by default) trained with
    cross-entropy on the pseudo-labels. It labels the weak views during prompt tuning."""
    started = time.perf_counter()
    frame = artifacts.read_table(cde_pseudo_labels, PSEUDO_LABELS_FILE)
    selection = selection_from_frame(frame, cde_pseudo_labels.facts["k"], cde_pseudo_labels.facts["num_classes"])
    features = load_feature_table(dino_features.file(FEATURES_FILE), mmap=True).rows_for(frame["image_id"].to_list())
    config, device = method.alignment_config(), compute.torch_device()
    ref, reused = allocate_or_reuse(context, artifacts,
                                    upstream={"pseudo_labels": cde_pseudo_labels, "dino_features": dino_features},
                                    config=config, compute=compute_facts(device))
    if reused:
        return asset_result(ref, started, {}, reused=True)
    epochs_done = progress_callback("DL network", "epochs", context.log.info)

    def progress(epoch: int, epochs: int, loss: float) -> None:
        epochs_done(epoch, epochs, loss=loss)

    network, losses = train_alignment(features, selection, config, device, progress,
                                      cpu_threads=compute.compute_settings().cpu_threads)
    shape = {"in_dim": int(features.shape[1]), "hidden_dim": config.hidden_dim, "num_classes": selection.num_classes}
    artifacts.write_tensors(ref, NETWORK_FILE, network.state_dict(), {k: str(v) for k, v in shape.items()})
    ref = ref.with_facts(**shape)
    return asset_result(ref, started, {
        "epochs": config.epochs,
        "training_images": int(selection.indices.numel()),
        "final_loss": losses[-1],
        "parameters": sum(p.numel() for p in network.parameters()),
        "loss_curve": reporting.png_markdown(
            reporting.line_chart({"cross-entropy": losses}, "DL network training loss", "epoch"), "loss"),
    })
