"""The NoLA asset graph, one partition per dataset.

Each asset is one stage of `nola_core.pipeline.run_nola`: it calls the same `nola_core`
function, writes what it produced through the artifact store, and returns an `ArtifactRef`
inside a `MaterializeResult` with metadata and a data version. No training maths lives here.

    preflight (nola_assets.preflight_asset) ─> dataset_manifest, class_descriptions

    dataset_manifest ─┬─> clip_features ─┬─> cde_pseudo_labels ─> alignment_checkpoint
                      └─> dino_features ─┘          ^                     │
    class_descriptions ─> cde_classifier ───────────┘      prompt_tuned_encoder
                                                                          │
                                                           predictions ─> evaluation
"""


import dataclasses
import shutil
import time
from typing import Any, Callable

import polars as pl
import torch
from dagster import (
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    RetryRequested,
    asset,
)

from nola_core import pipeline
from nola_core.alignment import PseudoLabelSelection, alignment_network, selection_report, train_alignment
from nola_core.data import REDUCED_JPEG_DECODE, Manifest, build_manifest, known_labels
from nola_core.distributed import init_distributed, launch
from nola_core.jobs import ImageFeaturesJob, PromptTuningJob, image_features_stage, prompt_tuning_stage
from nola_core.eval import SPLITS, EvaluationLabels, evaluate_stages, format_stage_table, split_column, stage_value
from nola_core.features import FeatureTable, load_feature_table, update_feature_table
from nola_core.llm import DescriptionSet, LLMError, MissingAPIKeyError, names_class
from nola_core.methods import PseudoLabels
from nola_core.methods.evaluation import method_rows
from nola_core.methods import nola as nola_method
from nola_core.models import ClipModel
from nola_core.progress import progress_callback
from nola_core.text import get_templates
from nola_core.tuning import EpochStats, TuningConfig, load_trainable

from nola_assets import reporting
from nola_assets.artifacts import ArtifactRef, ArtifactStore, digest_of
from nola_assets.datasets import LABELED_TABLE, UNLABELED_TABLE, image_set_version, load_manifests
from nola_assets.partitions import datasets_partitions
from nola_assets.preflight_asset import preflight
from nola_assets.resources import (
    ComputeResource,
    DatasetsResource,
    DescriptionsResource,
    MethodResource,
    ModelsResource,
)

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


def _result(ref: ArtifactRef, started: float, metadata: dict, reused: bool = False) -> MaterializeResult:
    metadata = {**metadata, "reused": reused, "seconds": round(time.perf_counter() - started, 2),
                "artifact": MetadataValue.path(ref.path), "artifact_digest": ref.digest}
    return MaterializeResult(value=ref, metadata=metadata, data_version=DataVersion(ref.digest))


def code_version(context: AssetExecutionContext) -> str:
    """The code version of the asset being materialized, as its definition declares it."""
    return context.assets_def.code_versions_by_key[context.asset_key]


def allocate_or_reuse(context: AssetExecutionContext, artifacts: ArtifactStore, key: dict) -> tuple[ArtifactRef, bool]:
    """The artifact of this asset and partition for `key` plus the asset's code version, and whether
    it is already finished (its ref.json is written only after the asset returned), in which case
    the asset returns it as is (`_result(..., reused=True)`) and computes nothing."""
    asset_name, dataset = context.asset_key.path[-1], context.partition_key
    key = {**key, "code_version": code_version(context)}
    finished = artifacts.complete_ref(asset_name, dataset, key)
    if finished is not None:
        context.log.info(f"{asset_name}: reusing the finished artifact {finished.digest} (same key)")
        return finished, True
    return artifacts.allocate(asset_name, dataset, key), False


def _image_progress(context: AssetExecutionContext, what: str) -> Callable[[int, int], None]:
    """`what: done/total images`, rate and time left in the step log at a bounded rate (a bar too
    under `nola run` at a terminal: nola_core.progress)."""
    return progress_callback(what, "images", context.log.info)


def _on_processes(context: AssetExecutionContext, compute: ComputeResource, items: int, stage: Callable, job: Any,
                  progress: Callable | None = None) -> Any:
    """`stage(distributed context, job, progress)` on `compute`'s processes; rank 0's result.

    One process (the default, or fewer `items` than processes): here, with live `progress`.
    `nproc_per_node` N > 1: `nola_core.distributed.launch` spawns N processes (one GPU each, or
    gloo on the CPU) that load their models from the configs in `job` (`nola_core.jobs`); each
    logs its own lines to stderr (the step's compute log). A run worker started by torchrun is
    already one rank of a group: the stage joins that group here and nothing is spawned.
    """
    if compute.launched_by_torchrun():
        return stage(init_distributed(compute.rank_device()), job, progress)
    processes = min(compute.processes(), items)
    if processes == 1:
        return launch(stage, 1, job, progress, device=compute.torch_device())
    context.log.info(f"{stage.__name__}: {items} item(s) over {processes} processes "
                     f"(about {-(-items // processes)} each), progress in the compute log")
    return launch(stage, processes, job, None, device=compute.rank_device())


# ── 1. the dataset ────────────────────────────────────────────────────────────────────────────



def _removed_images(context: AssetExecutionContext, before: Manifest | None, now: Manifest) -> dict:
    """Name images gone since the last manifest, and say when fewer are here than the sensor saw."""
    metadata: dict = {}
    if before is not None:
        present = set(now.ids)
        removed = sorted(r.path for r in before.records if r.image_id not in present)
        if removed:
            context.log.warning(f"{len(removed)} image(s) gone since the last manifest: " + ", ".join(removed[:10]))
            metadata["removed_since_last_manifest"] = MetadataValue.json(removed[:100])
    seen_by_sensor = context.run.tags.get("nola/images") if context.run else None
    scanned = len(now) + len(now.skipped)  # the sensor counts image files, readable or not
    if seen_by_sensor is not None and int(seen_by_sensor) > scanned:
        missing = int(seen_by_sensor) - scanned
        context.log.warning(f"{missing} image(s) counted at the sensor tick are gone (deleted before this run)")
        metadata["gone_since_sensor_tick"] = missing
    return metadata

@nola_asset(group="dataset", version="1", kinds={"polars", "parquet"}, deps=[preflight])
def dataset_manifest(context: AssetExecutionContext, data: DatasetsResource, artifacts: ArtifactStore) -> MaterializeResult:
    """Every readable image of the dataset folder, identified by the SHA-256 of its bytes.

    `unlabeled/` holds the images to classify; `labeled/<class>/`, when present, is used only to
    report accuracy, never to train or choose. Unreadable files are listed, not fatal. A rescan
    re-hashes only files whose size or modification time changed.
    """
    started = time.perf_counter()
    name = context.partition_key
    spec = data.spec(name)
    previous = artifacts.load_ref("dataset_manifest", name)
    before_unlabeled, before_labeled = load_manifests(artifacts, previous) if previous else (None, None)
    unlabeled = build_manifest(spec, "unlabeled", previous=before_unlabeled,
                               progress=_image_progress(context, "hashing unlabeled/"))
    labeled = build_manifest(spec, "labeled", previous=before_labeled) if spec.labeled_dir.is_dir() else None
    tables = {UNLABELED_TABLE: unlabeled.to_polars()}
    if labeled is not None:
        tables[LABELED_TABLE] = labeled.to_polars()
    spec_facts = {"name": spec.name, "classes": list(spec.classes), "templates": spec.templates, "domain": spec.domain}
    ref, reused = allocate_or_reuse(context, artifacts, {
        "spec": spec_facts,
        # Paths, ids, labels and skip reasons: what downstream reads (sizes and mtimes are not).
        **{table: digest_of(frame.select("path", "image_id", "label", "skipped").rows())
           for table, frame in tables.items()},
    })
    if not reused:  # a reused manifest keeps the sizes and mtimes it first saw: only the key's columns matter
        for table, frame in tables.items():
            artifacts.write_table(ref, table, frame)
    version = image_set_version(unlabeled)
    ref = ref.with_facts(classes=list(spec.classes), has_labels=labeled is not None, image_set_version=version)

    held_out = len(pipeline.evaluation_records(unlabeled, labeled)) - len(unlabeled)
    metadata = {
        "images": len(unlabeled),
        "skipped_files": len(unlabeled.skipped),
        "classes": MetadataValue.json(list(spec.classes)),
        "labelled_images": len(labeled) if labeled is not None else 0,
        "labelled_copies_of_unlabeled": len(known_labels(unlabeled, labeled)) if labeled is not None else 0,
        "held_out_labelled_images": held_out,
        "image_set_fingerprint": unlabeled.fingerprint,
        "image_set_version": version,
        "dataset_dir": MetadataValue.path(str(spec.root)),
    }
    metadata.update(_removed_images(context, before_unlabeled, unlabeled))
    if unlabeled.skipped:
        context.log.warning(f"{len(unlabeled.skipped)} file(s) under unlabeled/ left out: "
                            + "; ".join(f"{s.path} ({s.reason})" for s in unlabeled.skipped[:10]))
        metadata["skipped"] = MetadataValue.md(reporting.markdown_table(
            ["file", "reason"], [(s.path, s.reason) for s in unlabeled.skipped[:200]]))
    return _result(ref, started, metadata, reused=reused)


# ── 2. text: descriptions and the CDE classifier ──────────────────────────────────────────────


@nola_asset(group="text_classifier", version="1", kinds={"json"}, deps=[preflight])
def class_descriptions(
    context: AssetExecutionContext,
    data: DatasetsResource,
    descriptions: DescriptionsResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """Visual descriptions of every class, from the dataset's descriptions file or an LLM.

    Their content hash enters the key of everything downstream, so new descriptions mean a new
    CDE classifier, new pseudo-labels and a new tuned model. LLM lines that do not name their
    class get "<class>: " prepended (a switch in the key; files are used as written); metadata
    counts them per class, and the share of lines that name their class (reference: ~93 %).
    """
    started = time.perf_counter()
    name = context.partition_key
    spec = data.spec(name)
    try:
        texts, provenance = descriptions.describe(spec)
    except MissingAPIKeyError:
        raise
    except LLMError as error:
        if not error.transient:  # a rejected key or request: asking again in a minute cannot help
            raise
        # The provider retried each request already: wait out a longer outage (rate limits, a local
        # server restarting). Classes already answered are cached, so a retry asks only for the rest.
        raise RetryRequested(max_retries=2, seconds_to_wait=60) from error
    described = DescriptionSet(texts, provenance)
    prefixed = provenance.get("class_name_prefixed") or {}
    ref, reused = allocate_or_reuse(context, artifacts, {
        "classes": list(spec.classes), "content_hash": described.content_hash,
        "prefix_class_name": provenance.get("prefix_class_name")})
    if reused:
        return _result(ref, started, {"content_hash": described.content_hash}, reused=True)
    artifacts.write_json(ref, DESCRIPTIONS_FILE, described.to_json())
    ref = ref.with_facts(content_hash=described.content_hash)
    lines = [(c, line) for c, v in texts.items() for line in v]
    templates_only = not lines
    if templates_only:
        context.log.warning(f"{name}: no class descriptions; the CDE classifier is built from templates only")
    return _result(ref, started, {
        "source": descriptions.source(),
        "provider": str(provenance.get("provider")),
        "content_hash": described.content_hash,
        "descriptions": len(lines),
        "templates_only": templates_only,
        "class_name_prefixed": sum(prefixed.values()),
        "lines_naming_class": sum(names_class(line, c) for c, line in lines) / len(lines) if lines else None,
        "per_class": MetadataValue.md(reporting.markdown_table(
            ["class", "descriptions", "prefixed with the class name", "first description"],
            [(c, len(v), prefixed.get(c, 0), v[0] if v else "-") for c, v in texts.items()])),
    })


@nola_asset(group="text_classifier", version="1", pool=GPU_POOL)
def cde_classifier(
    context: AssetExecutionContext,
    class_descriptions: ArtifactRef,
    data: DatasetsResource,
    models: ModelsResource,
    compute: ComputeResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """Class Description Embeddings: per class, the mean of the CLIP text embeddings of its
    descriptions plus the dataset's templates (unit rows). Also the plain zero-shot template
    classifier, kept as the baseline every later stage is compared with."""
    started = time.perf_counter()
    name = context.partition_key
    spec = data.spec(name)
    texts = artifacts.read_json(class_descriptions, DESCRIPTIONS_FILE)["descriptions"]
    config, device = models.config(), compute.torch_device()
    ref, reused = allocate_or_reuse(context, artifacts, {
        "clip": config.clip_identity(),
        "descriptions": class_descriptions.facts["content_hash"],
        "classes": list(spec.classes),
        "templates": list(get_templates(spec.templates)),
    })
    if reused:
        return _result(ref, started, {}, reused=True)
    context.log.info(f"loading CLIP {config.clip_name} on {device}")
    clip = models.load_clip(device)
    text_checks = pipeline.text_checks(clip, spec, texts)
    zero_shot, cde = pipeline.text_classifiers(clip, spec, texts, device)
    artifacts.write_tensors(ref, CLASSIFIERS_FILE, {"zero_shot": zero_shot, "cde": cde})
    ref = ref.with_facts(random_clip=config.clip_is_random)

    for group in text_checks["collisions"]:
        context.log.warning(f"{name}: class names {group} collide after case/space/plural folding")
    for class_name, count in text_checks["truncated"].items():
        context.log.warning(f"{name}: {count} description(s) of {class_name!r} exceed the "
                            f"{text_checks['context_length']}-token context and are truncated")

    # The class-similarity heatmap is drawn by cde_pseudo_labels, a CPU step: this one holds the `gpu` slot.
    return _result(ref, started, {
        "name_collisions": MetadataValue.json(text_checks["collisions"]),
        "truncated_descriptions": sum(text_checks["truncated"].values()),
        "truncated_per_class": MetadataValue.md(reporting.markdown_table(
            ["class", "descriptions", "truncated"],
            [(c, len(texts.get(c, [])), n) for c, n in text_checks["truncated"].items() if n])),
        "classes": len(spec.classes),
        "embedding_dim": int(cde.shape[1]),
        "clip": MetadataValue.json(config.clip_identity()),
        "per_class": cde_class_table(spec.classes, texts, zero_shot, cde),
        "text_checks": MetadataValue.json(text_checks),
    })


def cde_class_table(classes, texts: dict, zero_shot: torch.Tensor, cde: torch.Tensor) -> MetadataValue:
    """Per class: descriptions, cos(CDE, zero-shot), and the nearest other class under the CDE."""
    similarity = (cde @ cde.T).fill_diagonal_(-2.0)
    nearest_cosine, nearest = similarity.max(dim=1)
    return reporting.per_class_table({
        "class": list(classes),
        "descriptions": [len(texts.get(c, [])) for c in classes],
        "cos(CDE, zero-shot)": [round(v, 4) for v in (zero_shot * cde).sum(-1).tolist()],
        "nearest class": [classes[i] for i in nearest.tolist()],
        "cos(nearest)": [round(v, 4) for v in nearest_cosine.tolist()],
    })


# ── 3. image features (incremental) ───────────────────────────────────────────────────────────


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
    records = pipeline.evaluation_records(unlabeled, labeled)
    config, device, feature_config = models.config(), compute.torch_device(), compute.feature_config()
    # Not in the key: batch size, workers and the number of processes (`nproc_per_node`) change
    # only float rounding, so switching 1 -> N processes reuses the table and computes new images only.
    model_key = {
        "model": config.clip_identity() if which == "clip" else config.dino_identity(),
        "precision": feature_config.resolved_precision(device),  # `auto` resolved: differs between CPUs
        "device_type": device.type,
        "decode": REDUCED_JPEG_DECODE,
    }
    ref, reused = allocate_or_reuse(context, artifacts, {"model_key": model_key,
                                                         "images": digest_of([r.image_id for r in records])})
    if reused:
        return _result(ref, started, {"computed": 0}, reused=True)
    previous_ref = artifacts.load_ref(asset_name, name)  # its rows are reused only under the same code version
    same_code = previous_ref is not None and previous_ref.key.get("code_version") == ref.key["code_version"]
    previous = (load_feature_table(previous_ref.file(FEATURES_FILE), mmap=True)
                if same_code and previous_ref.key["model_key"] == model_key else None)
    # New rows go to a scratch file, then old and new rows are merged chunk by chunk into the
    # table: neither is ever whole in RAM (1.3 M x 768 float16 is 2 GB).
    fresh = ref.file(f".new-{FEATURES_FILE}")

    def extract(todo) -> FeatureTable:
        context.log.info(f"{which.upper()} features for {len(todo)} image(s) on {device}")
        _on_processes(context, compute, len(todo), image_features_stage,
                      ImageFeaturesJob(config, which, spec.root, tuple(todo), feature_config, fresh),
                      progress=_image_progress(context, f"{which} features"))
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
            _pca_2d(sample[finite]), [labels.get(i, -1) for i in ids] if labels else None,
            f"{which.upper()} features, PCA of {len(ids)} images (colour: known label)"), "PCA of features")
    return _result(ref, started, metadata)


PCA_POINTS = 5000


def _pca_2d(features: torch.Tensor):
    x = features.float()
    x = x - x.mean(dim=0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return (x @ v[:2].T).numpy()


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


# ── 4. alignment: top-k pseudo-labels and the DL network ──────────────────────────────────────


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
    train_ids = pipeline.training_ids(unlabeled, clip_table, dino_table)
    if not train_ids:
        raise RuntimeError(f"{name}: no unlabeled image could be read by both CLIP and DINO")
    cde = artifacts.read_tensors(cde_classifier, CLASSIFIERS_FILE)["cde"]
    config = method.alignment_config()
    classes = dataset_manifest.facts["classes"]
    ref, reused = allocate_or_reuse(context, artifacts, {
        "cde": cde_classifier.digest, "clip_features": clip_features.digest,
        "train_ids": digest_of(train_ids), "k_min": config.k_min, "k_fraction": config.k_fraction,
        "logit_scale": config.logit_scale,
    })
    if reused:
        return _result(ref, started, {}, reused=True)
    selection = pipeline.cde_pseudo_labels(clip_table.rows_for(train_ids), cde, config)
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

    similarity_png = artifacts.write_bytes(ref, CLASS_SIMILARITY_FILE, reporting.class_similarity_heatmap(
        (cde @ cde.T).numpy(), classes, "CDE class-class cosine"))
    metadata = {
        "k": selection.k,
        "selected": report["selected"],
        "candidate_images": len(train_ids),
        "class_similarity": MetadataValue.path(str(similarity_png)),
        "per_class": MetadataValue.json(report["per_class"]),
        "short_classes": MetadataValue.json(report["short_classes"]),
        "classes_without_pseudo_labels": MetadataValue.json(empty),
        "histogram": reporting.png_markdown(reporting.bar_chart(
            list(report["per_class"]), list(report["per_class"].values()),
            f"pseudo-labels per class (k = {selection.k})", "images"), "pseudo-labels per class"),
    }
    if "precision" in report:
        metadata["precision"] = report["precision"]
        metadata["labelled_selected"] = report["labelled_selected"]
    return _result(ref, started, metadata)


def selection_frame(train_ids, paths, selection: PseudoLabelSelection, classes) -> pl.DataFrame:
    """One row per candidate image (row order = selection indices); label columns null unless selected."""
    chosen = {row: (label, score) for row, label, score in
              zip(selection.indices.tolist(), selection.labels.tolist(), selection.scores.tolist())}
    return pl.DataFrame({
        "image_id": list(train_ids),
        "path": [paths[i] for i in train_ids],
        "selected": [row in chosen for row in range(len(train_ids))],
        "pseudo_label": [chosen[row][0] if row in chosen else None for row in range(len(train_ids))],
        "class_name": [classes[chosen[row][0]] if row in chosen else None for row in range(len(train_ids))],
        "score": [chosen[row][1] if row in chosen else None for row in range(len(train_ids))],
    }, schema={"image_id": pl.String, "path": pl.String, "selected": pl.Boolean, "pseudo_label": pl.Int64,
               "class_name": pl.String, "score": pl.Float32})


def selection_from_frame(frame: pl.DataFrame, k: int, num_classes: int) -> PseudoLabelSelection:
    rows = frame.with_row_index("row").filter(pl.col("selected"))
    return PseudoLabelSelection(
        indices=torch.tensor(rows["row"].to_list(), dtype=torch.long),
        labels=torch.tensor(rows["pseudo_label"].to_list(), dtype=torch.long),
        scores=torch.tensor(rows["score"].to_list(), dtype=torch.float32),
        k=k,
        num_classes=num_classes,
    )


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
    name = context.partition_key
    frame = artifacts.read_table(cde_pseudo_labels, PSEUDO_LABELS_FILE)
    selection = selection_from_frame(frame, cde_pseudo_labels.facts["k"], cde_pseudo_labels.facts["num_classes"])
    features = load_feature_table(dino_features.file(FEATURES_FILE), mmap=True).rows_for(frame["image_id"].to_list())
    config, device = method.alignment_config(), compute.torch_device()
    ref, reused = allocate_or_reuse(context, artifacts, {
        "pseudo_labels": cde_pseudo_labels.digest, "dino_features": dino_features.digest,
        "config": dataclasses.asdict(config), "device_type": device.type,
    })
    if reused:
        return _result(ref, started, {}, reused=True)
    epochs_done = progress_callback("DL network", "epochs", context.log.info)

    def progress(epoch: int, epochs: int, loss: float) -> None:
        epochs_done(epoch, epochs, loss=loss)

    network, losses = train_alignment(features, selection, config, device, progress)
    shape = {"in_dim": int(features.shape[1]), "hidden_dim": config.hidden_dim, "num_classes": selection.num_classes}
    artifacts.write_tensors(ref, NETWORK_FILE, network.state_dict(), {k: str(v) for k, v in shape.items()})
    ref = ref.with_facts(**shape)
    return _result(ref, started, {
        "epochs": config.epochs,
        "training_images": int(selection.indices.numel()),
        "final_loss": losses[-1],
        "parameters": sum(p.numel() for p in network.parameters()),
        "loss_curve": reporting.png_markdown(
            reporting.line_chart({"cross-entropy": losses}, "DL network training loss", "epoch"), "loss"),
    })


def load_alignment_network(artifacts: ArtifactStore, ref: ArtifactRef) -> torch.nn.Module:
    network = alignment_network(ref.facts["in_dim"], ref.facts["num_classes"], ref.facts["hidden_dim"])
    network.load_state_dict(artifacts.read_tensors(ref, NETWORK_FILE))
    return network.eval()


# ── 5. prompt tuning ──────────────────────────────────────────────────────────────────────────


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
    key = {
        "clip": config.clip_identity(), "dino": config.dino_identity(), "manifest": dataset_manifest.digest,
        "cde": cde_classifier.digest, "pseudo_labels": cde_pseudo_labels.digest,
        "alignment": alignment_checkpoint.digest, "tuning": dataclasses.asdict(tuning), "wiseft_alpha": alpha,
        "device_type": device.type, "decode": REDUCED_JPEG_DECODE,
    }  # no process count: every optimizer step sees the same images whatever the split (nola_core.tuning)
    if tuning.fixed_pseudo_labels:  # only then do the stored DINO features shape the result
        key["dino_features"] = dino_features.digest
    ref, reused = allocate_or_reuse(context, artifacts, key)
    if reused:
        return _result(ref, started, {}, reused=True)
    dl_network = load_alignment_network(artifacts, alignment_checkpoint)
    fixed_labels = None
    if tuning.fixed_pseudo_labels:
        fixed_labels = pipeline.fixed_pseudo_labels(  # streamed over the mapped table; only labels travel
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
    trainable, history = _on_processes(context, compute, len(records), prompt_tuning_stage, job, progress=progress)
    for stats in history:  # epochs logged elsewhere (a spawned rank 0's compute log, an earlier resumed run)
        if stats.epoch not in logged:
            progress(stats)
    artifacts.write_tensors(ref, TRAINABLE_FILE, trainable, {"tuning": str(dataclasses.asdict(tuning))})
    shutil.rmtree(resume_dir, ignore_errors=True)  # the artifact is complete: nothing left to resume
    ref = ref.with_facts(tuning=dataclasses.asdict(tuning))
    return _result(ref, started, {
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


def load_tuned_classifier(artifacts: ArtifactStore, ref: ArtifactRef, clip: ClipModel, cde: torch.Tensor,
                          device: torch.device):
    if clip.config.clip_identity() != ref.key["clip"]:
        raise ValueError(f"the prompt-tuned encoder of {ref.dataset!r} was trained on CLIP {ref.key['clip']}, but the "
                         f"models resource now gives {clip.config.clip_identity()}: rematerialize prompt_tuned_encoder")
    classifier = pipeline.build_prompt_classifier(clip, cde, TuningConfig(**ref.facts["tuning"]))
    return load_trainable(classifier, ref.file(TRAINABLE_FILE)).to(device)


# ── 6. results ────────────────────────────────────────────────────────────────────────────────


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
    records = pipeline.evaluation_records(unlabeled, labeled)
    device = compute.torch_device()
    ref, reused = allocate_or_reuse(context, artifacts, {
        "tuned": prompt_tuned_encoder.digest, "clip_features": clip_features.digest,
        "manifest": dataset_manifest.digest, "precision": compute.feature_config().resolved_precision(device),
        "decode": REDUCED_JPEG_DECODE,
        "device_type": device.type,
    })
    if reused:
        return _result(ref, started, {}, reused=True)
    clip = models.load_clip(device)
    classifier = load_tuned_classifier(artifacts, prompt_tuned_encoder, clip,
                                       artifacts.read_tensors(cde_classifier, CLASSIFIERS_FILE)["cde"], device)
    tuned_table = pipeline.tuned_image_features(classifier, clip, spec.root, records, compute.feature_config(), device,
                                                output=ref.file(TUNED_FEATURES_FILE))  # written as computed
    ids = load_feature_table(clip_features.file(FEATURES_FILE), mmap=True).ids  # only the ids are read
    top = pipeline.tuned_head_top_classes(classifier, tuned_table, ids)  # streamed, never [N, C]
    frame = pipeline.prediction_table(unlabeled, ids, top, dataset_manifest.facts["classes"])
    artifacts.write_table(ref, PREDICTIONS_FILE, frame)

    counts = {c: 0 for c in dataset_manifest.facts["classes"]}
    counts.update(dict(frame.group_by("predicted_class").len().iter_rows()))
    return _result(ref, started, {
        "images": frame.height,
        "mean_confidence": float(frame["confidence"].mean()) if frame.height else float("nan"),
        "per_class": MetadataValue.json(counts),
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
    ref, reused = allocate_or_reuse(context, artifacts, {
        "predictions": predictions.digest, "dino_features": dino_features.digest,
        "alignment": alignment_checkpoint.digest, "pseudo_labels": cde_pseudo_labels.digest,
    })
    if reused:
        return _result(ref, started, {}, reused=True)
    classifiers = artifacts.read_tensors(cde_classifier, CLASSIFIERS_FILE)
    classifier = load_tuned_classifier(artifacts, prompt_tuned_encoder, models.load_clip("cpu"),
                                       classifiers["cde"], torch.device("cpu"))
    # Memory-mapped and streamed: each stage keeps only every image's top class (never [N, C]).
    clip_table = load_feature_table(clip_features.file(FEATURES_FILE), mmap=True)
    top = pipeline.stage_predictions(
        clip_table,
        load_feature_table(dino_features.file(FEATURES_FILE), mmap=True),
        classifiers["zero_shot"], classifiers["cde"],
        load_alignment_network(artifacts, alignment_checkpoint),
        classifier,
        load_feature_table(predictions.file(TUNED_FEATURES_FILE), mmap=True),
        cde_pseudo_labels.facts["logit_scale"],
    )
    selection, train_ids = _selection(artifacts.read_table(cde_pseudo_labels, PSEUDO_LABELS_FILE))
    stages = evaluate_stages(pipeline.nola_stage_outputs(top, clip_table.ids, selection, train_ids), classes,
                             EvaluationLabels.from_manifests(unlabeled, labeled))
    random_models = cde_classifier.facts["random_clip"] or dino_features.facts["random_weights"]
    note = pipeline.RANDOM_MODEL_NOTE if random_models else None
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
    precision = stage_value(stages, nola_method.SELECTION_STAGE, "pseudo_label_precision")
    if precision is not None:
        metadata["pseudo_label_precision"] = precision  # of the top-k selection, on the adaptation images
    return _result(ref, started, metadata)


def _selection(selected: pl.DataFrame) -> tuple[PseudoLabels, list[str]]:
    """The top-k pseudo-labels by id, and the training ids, from the `cde_pseudo_labels` table."""
    train_ids = selected["image_id"].to_list()
    chosen = selected.filter(pl.col("selected"))
    labels = torch.tensor(chosen["pseudo_label"].to_list(), dtype=torch.long)
    return PseudoLabels(tuple(chosen["image_id"].to_list()), labels, len(train_ids)), train_ids


NOLA_ASSETS = [
    dataset_manifest,
    class_descriptions,
    cde_classifier,
    clip_features,
    dino_features,
    cde_pseudo_labels,
    alignment_checkpoint,
    prompt_tuned_encoder,
    predictions,
    evaluation,
]
IMAGE_DEPENDENT_ASSETS = [a.key for a in NOLA_ASSETS if a not in (class_descriptions, cde_classifier)]
