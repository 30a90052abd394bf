"""The text_classifier group: class descriptions and the CDE (and zero-shot) classifiers.

    preflight ─> class_descriptions ─> cde_classifier ─> cde_pseudo_labels, the methods
"""

import time

import torch
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, RetryRequested

from nola_core.llm import DescriptionSet, LLMError, MissingAPIKeyError, names_class
from nola_core.text import dataset as text_dataset
from nola_core.text import get_templates

from nola_assets import reporting
from nola_assets.artifacts import ArtifactRef, ArtifactStore
from nola_assets.common import CLASSIFIERS_FILE, DESCRIPTIONS_FILE, GPU_POOL, allocate_or_reuse, asset_result, nola_asset
from nola_assets.preflight_asset import preflight
from nola_assets.resources import ComputeResource, DatasetsResource, DescriptionsResource, ModelsResource


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
    ref, reused = allocate_or_reuse(context, artifacts, classes=list(spec.classes), content_hash=described.content_hash,
                                    prefix_class_name=provenance.get("prefix_class_name"))
    if reused:
        return asset_result(ref, started, {"content_hash": described.content_hash}, reused=True)
    artifacts.write_json(ref, DESCRIPTIONS_FILE, described.to_json())
    ref = ref.with_facts(content_hash=described.content_hash)
    lines = [(c, line) for c, v in texts.items() for line in v]
    templates_only = not lines
    if templates_only:
        context.log.warning(f"{name}: no class descriptions; the CDE classifier is built from templates only")
    return asset_result(ref, started, {
        "source": descriptions.source(),
        "provider": str(provenance.get("provider")),
        "content_hash": described.content_hash,
        "descriptions": len(lines),
        "templates_only": templates_only,
        "class_name_prefixed": sum(prefixed.values()),
        "lines_naming_class": sum(names_class(line, c) for c, line in lines) / len(lines) if lines else None,
        "per_class": reporting.per_class_table({
            "class": list(texts),
            "descriptions": [len(v) for v in texts.values()],
            "prefixed with the class name": [prefixed.get(c, 0) for c in texts],
            "first description": [v[0] if v else "-" for v in texts.values()],
        }, rank=[-len(v) for v in texts.values()], ranked_by="the fewest descriptions first"),
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
    ref, reused = allocate_or_reuse(context, artifacts, clip=config, descriptions=class_descriptions.facts["content_hash"],
                                    classes=list(spec.classes), templates=list(get_templates(spec.templates)))
    if reused:
        return asset_result(ref, started, {}, reused=True)
    context.log.info(f"loading CLIP {config.clip_name} on {device}")
    clip = models.load_clip(device)
    text_checks = text_dataset.text_checks(clip, spec, texts)
    zero_shot, cde = text_dataset.text_classifiers(clip, spec, texts, device)
    artifacts.write_tensors(ref, CLASSIFIERS_FILE, {"zero_shot": zero_shot, "cde": cde})
    ref = ref.with_facts(random_clip=config.clip_is_random)

    for group in text_checks["collisions"]:
        context.log.warning(f"{name}: class names {group} collide after case/space/plural folding")
    for class_name, count in text_checks["truncated"].items():
        context.log.warning(f"{name}: {count} description(s) of {class_name!r} exceed the "
                            f"{text_checks['context_length']}-token context and are truncated")

    truncated = {c: n for c, n in text_checks["truncated"].items() if n}
    # The class-similarity heatmap is drawn by cde_pseudo_labels, a CPU step: this one holds the `gpu` slot.
    return asset_result(ref, started, {
        "name_collisions": MetadataValue.json(text_checks["collisions"]),
        "truncated_descriptions": sum(text_checks["truncated"].values()),
        "truncated_per_class": reporting.per_class_table({
            "class": list(truncated), "descriptions": [len(texts.get(c, [])) for c in truncated],
            "truncated": list(truncated.values())}, rank=list(truncated.values()), ranked_by="the most truncated first"),
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
    }, rank=nearest_cosine.tolist(), ranked_by="the most confused first (highest cos(nearest))")
