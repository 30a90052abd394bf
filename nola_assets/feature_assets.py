"""The image_features group: CLIP and DINO features of every image, computed incrementally.

    dataset_manifest ─┬─> clip_features ─> cde_pseudo_labels, predictions, the methods
                      └─> dino_features ─> cde_pseudo_labels, alignment_checkpoint
"""

import time
from pathlib import Path

import torch
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue

from nola_core.data.loading import evaluation_records
from nola_core.features import FeatureTable, load_feature_table, update_feature_table
from nola_core.jobs import ImageFeaturesJob, image_features_stage

from nola_assets import reporting
from nola_assets.artifacts import ArtifactRef, ArtifactStore, digest_of
from nola_assets.common import (
    FEATURES_FILE,
    GPU_POOL,
    allocate_or_reuse,
    asset_result,
    compute_facts,
    image_progress,
    nola_asset,
    on_processes,
)
from nola_assets.datasets import load_manifests
from nola_assets.resources import ComputeResource, DatasetsResource, ModelsResource


def _feature_asset(
    context: AssetExecutionContext,
    asset_name: str,
    which: str,
    dataset_manifest: ArtifactRef,
    data: DatasetsResource,
    models: ModelsResource,
    compute: ComputeResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """Shared by clip_features and dino_features: compute only images the last table lacks."""
    started = time.perf_counter()
    name = context.partition_key
    spec = data.spec(name)
    unlabeled, labeled = load_manifests(artifacts, dataset_manifest)
    records = evaluation_records(unlabeled, labeled)
    config, device, feature_config = models.config(), compute.torch_device(), compute.feature_config()
    # Not in the key: batch size, workers and the number of processes (`nproc_per_node`) change
    # only float rounding, so switching 1 -> N processes reuses the table and computes new images only.
    model_key = {  # nested: the previous table's rows are reused only under the same model_key
        "model": config.clip_identity() if which == "clip" else config.dino_identity(),
        **compute_facts(device, feature_config.resolved_precision(device), reads_images=True),
    }
    ref, reused = allocate_or_reuse(context, artifacts, model_key=model_key,
                                    images=digest_of([r.image_id for r in records]))
    if reused:
        return asset_result(ref, started, {"computed": 0}, reused=True)
    previous_ref = artifacts.load_ref(asset_name, name)  # its rows are reused only under the same code version
    same_code = previous_ref is not None and previous_ref.key.get("code_version") == ref.key["code_version"]
    previous = (load_feature_table(previous_ref.file(FEATURES_FILE), mmap=True)
                if same_code and previous_ref.key["model_key"] == model_key else None)
    # New rows go to a scratch file, then old and new rows are merged chunk by chunk into the
    # table: neither is ever whole in RAM (1.3 M x 768 float16 is 2 GB).
    fresh = ref.file(f".new-{FEATURES_FILE}")

    def extract(todo) -> FeatureTable:
        context.log.info(f"{which.upper()} features for {len(todo)} image(s) on {device}")
        on_processes(context, compute, len(todo), image_features_stage,
                      ImageFeaturesJob(config, which, spec.root, tuple(todo), feature_config, fresh),
                      progress=image_progress(context, f"{which} features"), workdir=Path(ref.path),
                      artifacts=artifacts, data=data)
        return load_feature_table(fresh, mmap=True)

    try:
        table, computed = update_feature_table(previous, records, extract, output=ref.file(FEATURES_FILE))
    finally:
        fresh.unlink(missing_ok=True)
    random_weights = config.clip_is_random if which == "clip" else config.dino_is_random
    ref = ref.with_facts(random_weights=random_weights, computed=computed)

    # Ids are content hashes, so this also colours unlabeled images that have a labelled copy.
    labels = {r.image_id: r.label for r in labeled.records} if labeled is not None else {}
    metadata = {
        "images": len(table),
        "computed": computed,
        "rows_reused": len(records) - computed,
        "unreadable": len(table.failed),
        "feature_dim": int(table.features.shape[1]),
        "model": MetadataValue.json(model_key["model"]),
    }
    if table.failed:
        metadata["unreadable_ids"] = MetadataValue.json(list(table.failed[:100]))
    # A plot needs no more points than this: evenly spaced rows keep the picture and the memory small.
    rows = torch.linspace(0, len(table) - 1, min(len(table), PCA_POINTS)).round().long().unique()
    sample = table.features[rows]
    finite = torch.isfinite(sample).all(dim=1)  # NaN rows are the no_nan_or_inf check's
    if int(finite.sum()) >= 3:
        ids = [table.ids[row] for row in rows[finite].tolist()]
        metadata["pca"] = reporting.png_markdown(reporting.scatter_2d(
            reporting.pca_2d(sample[finite]), [labels.get(i, -1) for i in ids] if labels else None,
            f"{which.upper()} features, PCA of {len(ids)} images (colour: known label)"), "PCA of features")
    return asset_result(ref, started, metadata)


PCA_POINTS = 5000


@nola_asset(group="image_features", version="1", pool=GPU_POOL)
def clip_features(
    context: AssetExecutionContext,
    dataset_manifest: ArtifactRef,
    data: DatasetsResource,
    models: ModelsResource,
    compute: ComputeResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """CLIP image embeddings of every image (unlabeled and held-out labelled), the features the
    CDE classifier scores. Only images not in the previous table are computed."""
    return _feature_asset(context, "clip_features", "clip", dataset_manifest, data, models, compute, artifacts)


@nola_asset(group="image_features", version="1", pool=GPU_POOL)
def dino_features(
    context: AssetExecutionContext,
    dataset_manifest: ArtifactRef,
    data: DatasetsResource,
    models: ModelsResource,
    compute: ComputeResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """Frozen DINO CLS features (ImageNet normalisation) of every image: the DL network's input.
    Computed once per image; new images are appended, removed ones drop out."""
    return _feature_asset(context, "dino_features", "dino", dataset_manifest, data, models, compute, artifacts)
