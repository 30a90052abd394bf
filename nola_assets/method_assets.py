"""The methods group: the other methods of the comparison, on the shared upstream assets of the NoLA graph.

Each method asset calls its `nola_core.methods` recipe on what the graph already holds (the
manifest, the CLIP feature table, the text classifiers, the class descriptions), stores its
checkpoint through the artifact store, and evaluates its stages into the common evaluation
table (`EVALUATION_SCHEMA`), kept in its artifact folder as method_evaluation.parquet. No
training maths lives here.

    cde_classifier, clip_features ───────────────> zero_shot_classifier ─┐  (zero-shot and CDE)
    class_descriptions, clip_features ───────────> lafter_encoder ───────┤
    clip_features ─> latteclip_texts ────────────> latteclip_encoder ────┼─> method_comparison
    (the NoLA graph) ────────────────────────────> evaluation ───────────┘  (nola_assets.result_assets)
"""


import dataclasses
import time

import polars as pl
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue

from nola_core.data.loading import evaluation_records, training_ids
from nola_core.features import FeatureTable, load_feature_table
from nola_core.methods import (
    EvaluationLabels,
    LatteTexts,
    MethodRun,
    ZeroShotConfig,
    evaluate_runs,
    generate_latteclip_texts,
    lafter_text_set,
    latteclip_zero_shot,
    run_cde,
    run_lafter,
    run_latteclip,
    run_zero_shot,
)
from nola_core.methods.cde import CDEConfig

from nola_assets import reporting
from nola_assets.artifacts import ArtifactRef, ArtifactStore, digest_of
from nola_assets.common import (
    CLASSIFIERS_FILE,
    DESCRIPTIONS_FILE,
    FEATURES_FILE,
    GPU_POOL,
    METHOD_EVALUATION_FILE,
    TUNED_FEATURES_FILE,
    allocate_or_reuse,
    asset_result,
    compute_facts,
    nola_asset,
)
from nola_assets.datasets import load_manifests
from nola_assets.result_assets import method_comparison
from nola_assets.resources import (
    DEFAULT_DESCRIPTIONS_CACHE,
    ComputeResource,
    DatasetsResource,
    DescriptionsResource,
    MethodResource,
    ModelsResource,
)

ZERO_SHOT_FILE = "zero_shot.safetensors"
LAFTER_FILE = "lafter.safetensors"
LATTE_TEXTS_FILE = "latte_texts.json"
LATTECLIP_FILE = "latteclip.safetensors"
# Description sources that are chat models able to look at images (LatteCLIP's LMM texts).
LMM_SOURCES = ("auto", "anthropic", "openai", "openai-compatible")


@dataclasses.dataclass
class _Inputs:
    unlabeled: object
    labeled: object
    clip_table: FeatureTable
    train_ids: list[str]
    train_records: list
    eval_records: list


def _inputs(artifacts: ArtifactStore, dataset_manifest: ArtifactRef, clip_features: ArtifactRef, name: str) -> _Inputs:
    unlabeled, labeled = load_manifests(artifacts, dataset_manifest)
    clip_table = load_feature_table(clip_features.file(FEATURES_FILE), mmap=True)
    train_ids = training_ids(unlabeled, clip_table)
    if not train_ids:
        raise RuntimeError(f"{name}: no unlabeled image could be read by CLIP")
    by_id = {r.image_id: r for r in unlabeled.records}
    return _Inputs(unlabeled, labeled, clip_table, train_ids, [by_id[i] for i in train_ids],
                   evaluation_records(unlabeled, labeled))


def _evaluate(name: str, classes, runs: list[MethodRun], inputs: _Inputs, random_models: bool) -> pl.DataFrame:
    """Labels enter here, after training, for reporting only."""
    return evaluate_runs(runs, dataset=name, classes=classes, unlabeled_ids=inputs.train_ids,
                         labels=EvaluationLabels.from_manifests(inputs.unlabeled, inputs.labeled),
                         random_models=random_models)


def _history_table(epochs: list[dict]) -> MetadataValue:
    keys = [k for k in ("epoch", "loss", "mean_entropy", "agreement", "images", "failed_images")
            if epochs and k in epochs[0]] or (list(epochs[0]) if epochs else [])
    return MetadataValue.md(reporting.markdown_table(keys, [[e.get(k) for k in keys] for e in epochs]))


# ── training-free baselines ───────────────────────────────────────────────────────────────────


@nola_asset(group="methods", version="1", kinds={"pytorch", "parquet"})
def zero_shot_classifier(
    context: AssetExecutionContext,
    dataset_manifest: ArtifactRef,
    cde_classifier: ArtifactRef,
    clip_features: ArtifactRef,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """Zero-shot CLIP (the dataset's templates) and CDE zero-shot as methods of their own: the
    classifiers `cde_classifier` already built, scored on the shared CLIP features (nothing is
    recomputed). Evaluation rows of both methods: `zero-shot` and `cde`."""
    started = time.perf_counter()
    name = context.partition_key
    classes = dataset_manifest.facts["classes"]
    inputs = _inputs(artifacts, dataset_manifest, clip_features, name)
    zero_shot_config, cde_config = ZeroShotConfig(), CDEConfig()
    ref, reused = allocate_or_reuse(
        context, artifacts,
        upstream={"classifiers": cde_classifier, "clip_features": clip_features, "manifest": dataset_manifest},
        train_ids=digest_of(inputs.train_ids), zero_shot=zero_shot_config, cde=cde_config)
    if reused:
        return asset_result(ref, started, {}, reused=True)
    weights = artifacts.read_tensors(cde_classifier, CLASSIFIERS_FILE)
    runs = [run_zero_shot(inputs.clip_table, weights["zero_shot"], inputs.train_ids, zero_shot_config),
            run_cde(inputs.clip_table, weights["cde"], inputs.train_ids, cde_config)]
    artifacts.write_tensors(ref, ZERO_SHOT_FILE, {"zero_shot": weights["zero_shot"], "cde": weights["cde"]})
    frame = _evaluate(name, classes, runs, inputs, bool(cde_classifier.facts.get("random_clip")))
    artifacts.write_table(ref, METHOD_EVALUATION_FILE, frame)
    ref = ref.with_facts(methods=["zero-shot", "cde"])
    return asset_result(ref, started, {
        "classes": len(classes),
        "images": len(inputs.clip_table.ids),
        "unlabeled_images": len(inputs.train_ids),
        **reporting.evaluation_metadata(frame),
    })


# ── LaFTer ────────────────────────────────────────────────────────────────────────────────────


@nola_asset(group="methods", version="1", pool=GPU_POOL, kinds={"pytorch", "parquet"})
def lafter_encoder(
    context: AssetExecutionContext,
    dataset_manifest: ArtifactRef,
    class_descriptions: ArtifactRef,
    clip_features: ArtifactRef,
    data: DatasetsResource,
    models: ModelsResource,
    method: MethodResource,
    compute: ComputeResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """LaFTer: a text-only linear classifier trained on the embedded descriptions and templates
    (noise + label smoothing), then CLIP's vision tower with 50 visual prompts, LayerNorm affines
    and that classifier as head, FixMatch-style on pseudo-labels from a frozen copy of it. Epochs,
    seed and batch sizes follow the shared tuning settings (`NOLA_TUNING_EPOCHS`, ...). Stored: the text
    classifier and the trainable tensors (lafter.safetensors), and the tuned encoder's embeddings
    (tuned_features.safetensors, written as computed and scored from the file)."""
    started = time.perf_counter()
    name = context.partition_key
    spec = data.spec(name)
    inputs = _inputs(artifacts, dataset_manifest, clip_features, name)
    texts = artifacts.read_json(class_descriptions, DESCRIPTIONS_FILE)["descriptions"]
    config, model_config, device = method.lafter_config(compute, name), models.config(), compute.torch_device()
    features = compute.feature_config()
    ref, reused = allocate_or_reuse(
        context, artifacts, upstream={"clip_features": clip_features, "manifest": dataset_manifest}, clip=model_config,
        compute=compute_facts(device, features.resolved_precision(device), reads_images=True),
        descriptions=class_descriptions.facts["content_hash"], templates=config.templates or spec.templates,
        train_ids=digest_of(inputs.train_ids), config=config)
    if reused:
        return asset_result(ref, started, {}, reused=True)
    context.log.info(f"LaFTer on {len(inputs.train_records)} images, {config.tuning.epochs} epochs, device {device}")
    clip = models.load_clip(device)
    text_set = lafter_text_set(clip, spec.classes, config.templates or spec.templates, texts, device)
    run = run_lafter(clip, text_set, len(spec.classes), spec.root, inputs.train_records, inputs.eval_records,
                     inputs.clip_table, config, features, device, tuned_output=ref.file(TUNED_FEATURES_FILE))
    artifacts.write_tensors(ref, LAFTER_FILE, run.tensors, {"config": str(dataclasses.asdict(config))})
    frame = _evaluate(name, spec.classes, [run], inputs, model_config.clip_is_random)
    artifacts.write_table(ref, METHOD_EVALUATION_FILE, frame)
    ref = ref.with_facts(methods=["lafter"], num_prompts=config.tuning.num_prompts)
    epochs = run.history["epochs"]
    return asset_result(ref, started, {
        "texts": int(text_set[0].shape[0]),
        "text_iterations": config.text.iterations,
        "text_final_loss": run.history["text_loss"][-1] if run.history["text_loss"] else float("nan"),
        "epochs": config.tuning.epochs,
        "training_images": len(inputs.train_records),
        "final_loss": epochs[-1]["loss"] if epochs else float("nan"),
        "trainable_parameters": sum(t.numel() for k, t in run.tensors.items() if k.startswith("tuned.")),
        "history": _history_table(epochs),
        **reporting.evaluation_metadata(frame),
    })


# ── LatteCLIP ─────────────────────────────────────────────────────────────────────────────────


@nola_asset(group="methods", version="1", kinds={"json"})
def latteclip_texts(
    context: AssetExecutionContext,
    dataset_manifest: ArtifactRef,
    clip_features: ArtifactRef,
    data: DatasetsResource,
    models: ModelsResource,
    method: MethodResource,
    compute: ComputeResource,
    descriptions: DescriptionsResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """LatteCLIP's LMM texts: a description of every unlabeled image and of every group of images
    sharing a zero-shot pseudo-label, when the description source is a chat model (`NOLA_DESCRIPTIONS`
    = auto | anthropic | openai | openai-compatible). With any other source (the default `dataset`,
    `file`, `templates`) there is no LMM: the texts are empty and LatteCLIP runs on class texts
    only (the paper's T_class-only ablation); `fallback` in the metadata says so."""
    started = time.perf_counter()
    name = context.partition_key
    spec = data.spec(name)
    inputs = _inputs(artifacts, dataset_manifest, clip_features, name)
    source = descriptions.source()
    config = method.latteclip_config(compute, name)
    lmm = source in LMM_SOURCES
    key: dict = {"source": source, "train_ids": digest_of(inputs.train_ids)}
    if lmm:  # only then do the model, the CLIP features and the grouping shape the texts
        key.update(upstream={"clip_features": clip_features}, clip=models.config(),
                   model=descriptions.setting("descriptions_model"), base_url=descriptions.setting("descriptions_base_url"),
                   group_size=config.group_size, seed=config.seed, class_template=config.class_template)
    ref, reused = allocate_or_reuse(context, artifacts, **key)
    if reused:
        return asset_result(ref, started, {}, reused=True)
    fallback = None
    if lmm:
        from nola_core.llm import make_provider

        provider = make_provider(source, model=descriptions.setting("descriptions_model"),
                                 base_url=descriptions.setting("descriptions_base_url"))
        device = compute.torch_device()
        _, _, zero_shot_labels = latteclip_zero_shot(models.load_clip(device), spec.classes, inputs.clip_table,
                                                     inputs.train_ids, config, device)
        texts = generate_latteclip_texts(
            provider, spec.root, inputs.train_records, zero_shot_labels.labels, domain=spec.domain,
            group_size=config.group_size, seed=config.seed,
            cache_dir=descriptions.setting("descriptions_cache", DEFAULT_DESCRIPTIONS_CACHE),
            prompts_dir=descriptions.setting("prompts_dir"))
    else:
        texts = LatteTexts()
        fallback = (f"description source {source!r} is not a chat model that sees images: no LMM texts, "
                    "LatteCLIP runs on class texts only (T_class-only ablation)")
        context.log.warning(f"{name}: {fallback}")
    artifacts.write_json(ref, LATTE_TEXTS_FILE, {"image": dict(texts.image), "group": dict(texts.group),
                                                 "failed": list(texts.failed), "source": source,
                                                 "fallback": fallback})
    ref = ref.with_facts(lmm=lmm, content_hash=digest_of([dict(texts.image), dict(texts.group)]))
    return asset_result(ref, started, {
        "source": source,
        "lmm": lmm,
        "fallback": fallback or "none",
        "image_texts": len(texts.image),
        "group_texts": len(set(texts.group.values())),
        "failed_calls": len(texts.failed),
        "training_images": len(inputs.train_ids),
    })


@nola_asset(group="methods", version="1", pool=GPU_POOL, kinds={"pytorch", "parquet"})
def latteclip_encoder(
    context: AssetExecutionContext,
    dataset_manifest: ArtifactRef,
    clip_features: ArtifactRef,
    latteclip_texts: ArtifactRef,
    data: DatasetsResource,
    models: ModelsResource,
    method: MethodResource,
    compute: ComputeResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """LatteCLIP: the whole CLIP fine-tuned with momentum class prototypes, the dynamic feature
    mixer over image / group / class texts, dual pseudo-labels (frozen zero-shot and the
    prototypes) and the FLYP contrastive loss; inference is the nearest prototype. The paper's
    per-dataset lr; `NOLA_TUNING_EPOCHS` caps its epochs. Stored: prototypes and the fine-tuned
    weights (latteclip.safetensors), and the fine-tuned encoder's embeddings
    (tuned_features.safetensors, written as computed and scored from the file)."""
    started = time.perf_counter()
    name = context.partition_key
    spec = data.spec(name)
    inputs = _inputs(artifacts, dataset_manifest, clip_features, name)
    stored = artifacts.read_json(latteclip_texts, LATTE_TEXTS_FILE)
    texts = LatteTexts(stored["image"], stored["group"], tuple(stored["failed"]))
    config, model_config, device = method.latteclip_config(compute, name), models.config(), compute.torch_device()
    features = compute.feature_config()
    ref, reused = allocate_or_reuse(
        context, artifacts,
        upstream={"texts": latteclip_texts, "clip_features": clip_features, "manifest": dataset_manifest},
        clip=model_config, compute=compute_facts(device, features.resolved_precision(device), reads_images=True),
        train_ids=digest_of(inputs.train_ids), config=config)
    if reused:
        return asset_result(ref, started, {}, reused=True)
    context.log.info(f"LatteCLIP on {len(inputs.train_records)} images, at most {config.max_epochs} epochs / "
                     f"{config.max_iterations} iterations, lr {config.lr:g}, device {device}")
    clip = models.load_clip(device)
    run = run_latteclip(clip, spec.classes, spec.root, inputs.train_records, inputs.eval_records, inputs.clip_table,
                        texts, config, features, device, tuned_output=ref.file(TUNED_FEATURES_FILE))
    artifacts.write_tensors(ref, LATTECLIP_FILE, run.tensors, {"config": str(dataclasses.asdict(config))})
    frame = _evaluate(name, spec.classes, [run], inputs, model_config.clip_is_random)
    artifacts.write_table(ref, METHOD_EVALUATION_FILE, frame)
    ref = ref.with_facts(methods=["latteclip"])
    epochs = run.history["epochs"]
    return asset_result(ref, started, {
        "epochs": len(epochs),
        "training_images": len(inputs.train_records),
        "lr": config.lr,
        "lmm_texts": bool(latteclip_texts.facts.get("lmm")),
        "trainable_parameters": sum(t.numel() for k, t in run.tensors.items() if k.startswith("model.")),
        "history": _history_table(epochs),
        **reporting.evaluation_metadata(frame),
    })


METHOD_ASSETS = [zero_shot_classifier, lafter_encoder, latteclip_texts, latteclip_encoder, method_comparison]
"""The other methods, and `method_comparison` (results group, nola_assets.result_assets) over them."""
