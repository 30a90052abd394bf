"""NoLA end to end on a dataset folder, from Python alone (no Dagster).

descriptions → CDE classifier → DINO features → top-k pseudo-labels → DL network →
prompt-tuned CLIP encoder → predictions. Each step is a function of `nola_core`; this module
only chains them, the same way the Dagster assets do one step per asset.

The end of the pipeline streams (`stage_predictions`, `nola_core.predictions`): each stage is
scored chunk by chunk over the feature tables and keeps only each image's top classes, so the
[N, C] probability matrices of a million-image dataset are never built. `cosine_probabilities`
and `tuned_head_probabilities` score one chunk of rows; `cosine_top_classes`,
`tuned_head_top_classes` and `dl_network_top_classes` stream them over a table (the method
recipes of `nola_core.methods` use them too).
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import polars as pl
import torch

from nola_core.alignment import (
    AlignmentConfig,
    PseudoLabelSelection,
    class_log_odds,
    per_class_k,
    select_top_k,
    selection_report,
    train_alignment,
)
from nola_core.data import (
    DatasetSpec,
    ImageRecord,
    Manifest,
    build_manifest,
    known_labels,
    load_dataset_spec,
)
from nola_core.data.transforms import (
    MultiView,
    eval_transform,
    strong_transform,
    views_decode_min_side,
    weak_transform,
)
from nola_core.eval import EvaluationLabels, evaluate_stages, format_stage_table
from nola_core.features import FeatureConfig, FeatureTable, extract_features
from nola_core.models import ClipModel, DinoModel, ModelConfig, PromptTunedClassifier, load_clip, load_dino
from nola_core.models.vpt import interpolate_trainable
from nola_core.predictions import (
    PREDICTION_CHUNK_SIZE,
    TopClasses,
    streamed_top_classes,
)
from nola_core.runtime import resolve_device
from nola_core.text import (
    cde_classifier,
    clip_token_counter,
    colliding_class_names,
    get_templates,
    truncated_texts,
    zero_shot_classifier,
)
from nola_core.tuning import EpochStats, TuningConfig, train_prompts

logger = logging.getLogger(__name__)

ZERO_SHOT_STAGE = "zero-shot (templates)"
CDE_STAGE = "CDE (descriptions)"
TUNED_STAGE = "NoLA prompt-tuned"

RANDOM_MODEL_NOTE = (
    "NOTE: these models are randomly initialised (tiny profile or no weights): the accuracy and "
    "precision figures only show that the pipeline runs; they say nothing about the method."
)


def nola_tuning_config(**overrides) -> TuningConfig:
    """NoLA's tuning: `TuningConfig`'s defaults with one pseudo-label per image from the DINO
    features of the evaluation view, as the reference labels its deterministic `te_transform`
    view (resize + centre crop) at every step (`TuningConfig.fixed_pseudo_labels`)."""
    return TuningConfig(**{"fixed_pseudo_labels": True, **overrides})


@dataclass(frozen=True)
class NolaConfig:
    models: ModelConfig = field(default_factory=ModelConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    tuning: TuningConfig = field(default_factory=nola_tuning_config)
    device: str = "auto"
    # Rows scored at once by `stage_predictions` (memory ~ chunk × (classes + feature dims)).
    prediction_chunk_size: int = PREDICTION_CHUNK_SIZE


@dataclass
class NolaResult:
    spec: DatasetSpec
    manifest: Manifest
    zero_shot: torch.Tensor  # [C, D] template classifier
    cde: torch.Tensor  # [C, D] class description embedding classifier
    selection: PseudoLabelSelection
    selection_report: dict
    dl_network: torch.nn.Module
    classifier: PromptTunedClassifier
    history: list[EpochStats]
    predictions: pl.DataFrame  # one row per unlabeled image (`prediction_table`)
    stages: pl.DataFrame  # `nola_core.eval.evaluate_stages`: accuracy per named split, pseudo-label quality
    random_models: bool
    text_checks: dict  # class-name collisions and descriptions longer than CLIP's context

    def stage_table(self) -> str:
        """Every stage's transductive and held-out accuracy (named columns) and pseudo-label precision."""
        return format_stage_table(self.stages, RANDOM_MODEL_NOTE if self.random_models else None)


def resolve_descriptions(spec: DatasetSpec, descriptions: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """Given descriptions, else the dataset's descriptions file, else none (templates only, with a warning)."""
    if descriptions is None and spec.descriptions is not None:
        from nola_core.llm import load_descriptions

        descriptions = load_descriptions(spec.descriptions)
    if descriptions is None:
        warnings.warn(
            f"dataset {spec.name!r} has no class descriptions: the CDE classifier falls back to "
            "templates only (run `nola describe` or set `descriptions:` in dataset.yaml)",
            stacklevel=2,
        )
        return {name: [] for name in spec.classes}
    unknown = sorted(set(descriptions) - set(spec.classes))
    if unknown:
        logger.warning("descriptions for classes not in %s ignored: %s", spec.name, unknown[:10])
    return {name: list(descriptions.get(name, [])) for name in spec.classes}


def evaluation_records(unlabeled: Manifest, labeled: Manifest | None) -> list[ImageRecord]:
    """Unlabeled images first, then labelled images that are not also unlabeled (held-out)."""
    records = list(unlabeled.records)
    if labeled is not None:
        seen = set(unlabeled.ids)
        records += [r for r in labeled.records if r.image_id not in seen]
    return records


def training_ids(manifest: Manifest, *tables: FeatureTable) -> list[str]:
    """Unlabeled image ids, in manifest order, that every feature table holds (readable by all)."""
    usable = set.intersection(*(set(table.ids) for table in tables))
    return [image_id for image_id in manifest.ids if image_id in usable]


def image_features(
    model: ClipModel | DinoModel,
    root: Path,
    records: Sequence[ImageRecord],
    config: FeatureConfig,
    device,
    progress: Callable[[int, int], None] | None = None,
    output: Path | None = None,
) -> FeatureTable:
    """The model's float16 image embeddings of `records`; with `output`, written there batch by
    batch and returned memory-mapped (`features.extract_features`)."""
    tower = model.visual if isinstance(model, ClipModel) else model.model  # what encode_image runs
    return extract_features(model.encode_image, root, records, eval_transform(model.preprocess), config, device,
                            progress, module=tower, output=output, decode_min_side=model.preprocess.resize_size)


def build_prompt_classifier(clip: ClipModel, class_embeddings: torch.Tensor, config: TuningConfig) -> PromptTunedClassifier:
    """A fresh copy of the vision tower, so the zero-shot model stays untouched."""
    return PromptTunedClassifier(
        copy.deepcopy(clip.visual),
        class_embeddings,
        num_prompts=config.num_prompts,
        deep_prompts=config.deep_prompts,
        logit_scale=config.head_logit_scale,
        head_input=config.head_input,
        init_seed=config.seed,
    )


def tuning_views(clip: ClipModel, dino: DinoModel) -> MultiView:
    """(DINO's weak view, CLIP's strong view) of one decode, which large JPEGs may do at reduced
    scale as far as both views allow (`data.views_decode_min_side`)."""
    return MultiView((weak_transform(dino.preprocess), strong_transform(clip.preprocess)),
                     decode_min_side=views_decode_min_side(dino.preprocess, clip.preprocess))


def dino_pseudo_labeller(dino: DinoModel, dl_network: torch.nn.Module, device):
    """Hard argmax labels of the DL network on DINO features of the weak view."""
    network = dl_network.to(device).eval()

    def label(weak_views: torch.Tensor) -> torch.Tensor:
        return network(dino.encode_image(weak_views).float()).argmax(dim=-1)

    return label


def load_dataset(dataset_dir: str | Path) -> tuple[DatasetSpec, Manifest, Manifest | None]:
    """The spec, the unlabeled manifest, and the labelled one when `labeled/` exists."""
    spec = load_dataset_spec(dataset_dir)
    manifest = build_manifest(spec, "unlabeled")
    labeled = build_manifest(spec, "labeled") if spec.labeled_dir.is_dir() else None
    logger.info("%s: %d images (%d skipped), %d classes", spec.name, len(manifest), len(manifest.skipped),
                len(spec.classes))
    return spec, manifest, labeled


def text_classifiers(
    clip: ClipModel, spec: DatasetSpec, descriptions: Mapping[str, Sequence[str]], device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero-shot template classifier, CDE classifier), both [C, D] unit rows."""
    templates = get_templates(spec.templates)
    zero_shot = zero_shot_classifier(clip, spec.classes, templates, device)
    return zero_shot, cde_classifier(clip, spec.classes, templates, descriptions, device)


def cde_pseudo_labels(
    clip_features: torch.Tensor, cde: torch.Tensor, config: AlignmentConfig
) -> PseudoLabelSelection:
    """Top-k most confident images per class under the CDE classifier (rows of `clip_features`)."""
    k = per_class_k(clip_features.shape[0], cde.shape[0], config.k_min, config.k_fraction)
    return select_top_k(class_log_odds(clip_features, cde, config.logit_scale, config.score_chunk_size), k)


def tune_prompts(
    clip: ClipModel,
    dino: DinoModel,
    dl_network: torch.nn.Module,
    cde: torch.Tensor,
    root: Path,
    records: Sequence[ImageRecord],
    config: TuningConfig,
    device,
    progress=None,
    fixed_labels: torch.Tensor | None = None,
    distributed=None,
    resume_dir: Path | None = None,
) -> tuple[PromptTunedClassifier, list[EpochStats]]:
    """NoLA's last stage: VPT on CLIP, supervised by the DL network's labels on weak views.

    With `config.fixed_pseudo_labels`, `fixed_labels` (one per record, `fixed_pseudo_labels`)
    replace the per-view labels. `resume_dir`: per-epoch resumable state (see `train_prompts`).
    """
    classifier = build_prompt_classifier(clip, cde, config)
    history = train_prompts(
        classifier, root, records, tuning_views(clip, dino), dino_pseudo_labeller(dino, dl_network, device), config,
        device, progress, fixed_labels=fixed_labels, frozen_modules=(dino.model,), distributed=distributed,
        resume_dir=resume_dir,
    )
    return classifier, history


def fixed_pseudo_labels(dl_network: torch.nn.Module, dino_table: FeatureTable, ids: Sequence[str]) -> torch.Tensor:
    """[len(ids)] the DL network's class for each image from its stored (evaluation-view) DINO
    features, streamed over the (mapped) table: the labels `TuningConfig.fixed_pseudo_labels`
    trains on, computed once instead of one DINO forward per weak view and step."""
    return dl_network_top_classes(dl_network, dino_table, ids).predicted


def tuned_image_features(
    classifier: PromptTunedClassifier,
    clip: ClipModel,
    root: Path,
    records: Sequence[ImageRecord],
    config: FeatureConfig,
    device,
    output: Path | None = None,
) -> FeatureTable:
    """Projected image embeddings of the tuned encoder (eval view), unnormalised, float32.

    One pass serves both the tuned head (`tuned_head_probabilities`, which reads them as training
    did) and the forgetting guard (the same embeddings, normalised, scored by the untouched
    zero-shot template classifier). With `output`, rows go to that store file as
    they are computed and the table comes back memory-mapped (`features.extract_features`).
    """
    return extract_features(classifier.image_features, root, records, eval_transform(clip.preprocess),
                            config, device, dtype=torch.float32, module=classifier, output=output,
                            decode_min_side=clip.preprocess.resize_size)


def tuned_head_probabilities(classifier: PromptTunedClassifier, features: torch.Tensor) -> torch.Tensor:
    """Softmax of the tuned head on a chunk of `tuned_image_features` embeddings, [n, C] on the
    CPU (`tuned_head_top_classes` streams it over a table): the same logits as the forward."""
    with torch.no_grad():
        return torch.softmax(classifier.logits_from_features(features.to(classifier.head.weight.device)),
                             dim=-1).cpu()


def apply_wiseft(
    classifier: PromptTunedClassifier, clip: ClipModel, cde: torch.Tensor, config: TuningConfig, alpha: float
) -> None:
    """Interpolate, in place, between the untuned (initial, seeded) and tuned trainable tensors."""
    untuned = build_prompt_classifier(clip, cde, config).trainable_state_dict()
    classifier.load_trainable_state_dict(interpolate_trainable(untuned, classifier.trainable_state_dict(), alpha))


def text_checks(clip: ClipModel, spec: DatasetSpec, descriptions: Mapping[str, Sequence[str]]) -> dict:
    """Class names that collide after normalisation, and descriptions CLIP will truncate; logged."""
    collisions = colliding_class_names(spec.classes)
    for group in collisions:
        logger.warning("%s: class names %s are the same after case/space/plural folding", spec.name, group)
    context = getattr(clip.tokenizer, "context_length", 77)
    truncated = truncated_texts(clip_token_counter(clip.tokenizer), descriptions, context)
    for name, count in truncated.items():
        logger.warning("%s: %d description(s) of class %r exceed CLIP's %d-token context and are truncated",
                       spec.name, count, name, context)
    return {"collisions": collisions, "truncated": truncated, "context_length": context}


def run_nola(
    dataset_dir: str | Path,
    config: NolaConfig = NolaConfig(),
    descriptions: Mapping[str, Sequence[str]] | None = None,
) -> NolaResult:
    """Run the whole method on one dataset folder and return every intermediate result."""
    device = resolve_device(config.device)
    spec, manifest, labeled = load_dataset(dataset_dir)
    texts = resolve_descriptions(spec, descriptions)
    clip = load_clip(config.models, device)
    checks = text_checks(clip, spec, texts)
    dino = load_dino(config.models, device)
    zero_shot, cde = text_classifiers(clip, spec, texts, device)

    records = evaluation_records(manifest, labeled)
    clip_table = image_features(clip, spec.root, records, config.features, device)
    dino_table = image_features(dino, spec.root, records, config.features, device)
    train_ids = training_ids(manifest, clip_table, dino_table)
    if not train_ids:
        raise RuntimeError(f"{spec.unlabeled_dir}: no image could be read at feature extraction")

    selection = cde_pseudo_labels(clip_table.rows_for(train_ids), cde, config.alignment)
    labels_by_id = known_labels(manifest, labeled) if labeled is not None else {}
    report = selection_report(selection, spec.classes, train_ids, labels_by_id)
    logger.info("top-%d pseudo-labels: %s", selection.k, report["per_class"])
    empty = [name for name, count in report["per_class"].items() if count == 0]
    if empty:
        logger.warning("%s: no pseudo-label at all for classes %s: the DL network never sees them",
                       spec.name, empty)
    dl_network, _ = train_alignment(dino_table.rows_for(train_ids), selection, config.alignment, device)

    by_id = {r.image_id: r for r in manifest.records}
    classifier, history = tune_prompts(
        clip, dino, dl_network, cde, spec.root, [by_id[i] for i in train_ids], config.tuning, device,
        fixed_labels=fixed_pseudo_labels(dl_network, dino_table, train_ids) if config.tuning.fixed_pseudo_labels else None,
    )
    if config.tuning.wiseft_alpha is not None:
        apply_wiseft(classifier, clip, cde, config.tuning, config.tuning.wiseft_alpha)
    tuned_table = tuned_image_features(classifier, clip, spec.root, records, config.features, device)
    predictions = stage_predictions(clip_table, dino_table, zero_shot, cde, dl_network, classifier, tuned_table,
                                    config.alignment.logit_scale, chunk_size=config.prediction_chunk_size)
    from nola_core.methods.nola import selection_pseudo_labels  # here: nola_core.methods imports this module

    result = NolaResult(
        spec=spec, manifest=manifest, zero_shot=zero_shot, cde=cde, selection=selection,
        selection_report=report, dl_network=dl_network, classifier=classifier, history=history,
        predictions=prediction_table(manifest, clip_table.ids, predictions[TUNED_STAGE], spec.classes),
        stages=evaluate_stages(
            nola_stage_outputs(predictions, clip_table.ids, selection_pseudo_labels(selection, train_ids), train_ids),
            spec.classes, EvaluationLabels.from_manifests(manifest, labeled)),
        random_models=config.models.clip_is_random or config.models.dino_is_random,
        text_checks=checks,
    )
    logger.info("\n%s", result.stage_table())
    return result


def stage_predictions(
    clip_table: FeatureTable,
    dino_table: FeatureTable,
    zero_shot: torch.Tensor,
    cde: torch.Tensor,
    dl_network: torch.nn.Module,
    classifier: PromptTunedClassifier,
    tuned_table: FeatureTable,
    logit_scale: float,
    *,
    k: int = 1,
    chunk_size: int = PREDICTION_CHUNK_SIZE,
) -> dict[str, TopClasses]:
    """The top `k` classes of every stage, rows in the order of `clip_table.ids` (what
    `nola_stage_outputs` and `prediction_table` take); `tuned_table` is `tuned_image_features`.

    Streamed: `chunk_size` rows at a time are read from the (possibly memory-mapped) tables,
    scored and reduced to their top classes. An id that the DINO table lacks gets probability 0
    for every class, one the tuned table lacks the scores of a zero embedding (as before: these
    are images that became unreadable between two extractions).
    """
    ids = clip_table.ids
    return {
        ZERO_SHOT_STAGE: cosine_top_classes(clip_table, ids, zero_shot, logit_scale, k, chunk_size),
        CDE_STAGE: cosine_top_classes(clip_table, ids, cde, logit_scale, k, chunk_size),
        "DL network (DINO)": dl_network_top_classes(dl_network, dino_table, ids, k, chunk_size),
        TUNED_STAGE: tuned_head_top_classes(classifier, tuned_table, ids, k, chunk_size),
        "tuned encoder + templates": cosine_top_classes(tuned_table, ids, zero_shot, logit_scale, k, chunk_size),
    }


def cosine_top_classes(
    table: FeatureTable,
    ids: Sequence[str],
    classifier: torch.Tensor,
    logit_scale: float,
    k: int = 1,
    chunk_size: int = PREDICTION_CHUNK_SIZE,
) -> TopClasses:
    """The top classes of a cosine classifier ([C, D] rows, softmax at `logit_scale`) for `ids`
    (rows of `table`; missing ids score a zero embedding, so every class ties), streamed."""
    return streamed_top_classes(table, ids, lambda x, _: cosine_probabilities(x, classifier, logit_scale), k,
                                chunk_size)


def tuned_head_top_classes(
    classifier: PromptTunedClassifier,
    tuned_table: FeatureTable,
    ids: Sequence[str],
    k: int = 1,
    chunk_size: int = PREDICTION_CHUNK_SIZE,
) -> TopClasses:
    """The tuned model's top classes for `ids` (rows of `tuned_table`; missing ids score a zero
    embedding), streamed: what the `predictions` asset writes."""
    return streamed_top_classes(tuned_table, ids, lambda x, _: tuned_head_probabilities(classifier, x), k,
                                chunk_size)


def dl_network_top_classes(
    dl_network: torch.nn.Module,
    dino_table: FeatureTable,
    ids: Sequence[str],
    k: int = 1,
    chunk_size: int = PREDICTION_CHUNK_SIZE,
) -> TopClasses:
    """The DL network's top classes for `ids` (rows of `dino_table`; missing ids get probability
    0 for every class, so class 0 with confidence 0), streamed."""
    return streamed_top_classes(dino_table, ids, dl_network_probabilities(dl_network), k, chunk_size)


def dl_network_probabilities(dl_network: torch.nn.Module):
    """(features chunk, present rows or None) → the DL network's class probabilities on the CPU,
    all zeros for rows not present; the scorer of `nola_core.predictions`."""
    device = next(dl_network.parameters()).device
    num_classes = [m for m in dl_network.modules() if isinstance(m, torch.nn.Linear)][-1].out_features

    def probabilities(features: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        if present is None:
            return torch.softmax(dl_network(features.to(device)), dim=-1).cpu()
        out = torch.zeros(len(features), num_classes)
        if bool(present.any()):
            out[present] = torch.softmax(dl_network(features[present].to(device)), dim=-1).cpu()
        return out

    return probabilities


def nola_stage_outputs(
    stage_predictions: Mapping[str, TopClasses | torch.Tensor],
    ids: Sequence[str],
    selection,
    train_ids: Sequence[str],
) -> list:
    """NoLA's stage table as `StageOutput`s for `nola_core.eval.evaluate_stages`: the top-k
    selection, the zero-shot and CDE baselines, then the DL network, the tuned model (final) and
    the tuned encoder with templates. `stage_predictions` is `stage_predictions`' output (rows
    follow `ids`), `selection` the top-k pseudo-labels by id (`methods.nola.selection_pseudo_labels`).
    """
    from nola_core.methods.common import StageOutput  # here: nola_core.methods imports this module
    from nola_core.methods.nola import nola_stages

    ids = tuple(ids)
    selection_stage, *own = nola_stages(ids, stage_predictions, selection, train_ids)
    baselines = [StageOutput(name, ids, stage_predictions[name]) for name in (ZERO_SHOT_STAGE, CDE_STAGE)]
    return [selection_stage, *baselines, *own]


def prediction_table(
    manifest: Manifest, ids: Sequence[str], predictions: TopClasses | torch.Tensor, classes: Sequence[str]
) -> pl.DataFrame:
    """One row per manifest image that `ids` holds: its most probable class and that probability.

    `predictions`: `TopClasses` (rows following `ids`), or [N, C] probabilities."""
    if not isinstance(predictions, TopClasses):
        predictions = TopClasses.of(predictions)
    row = {image_id: i for i, image_id in enumerate(ids)}
    present = [r for r in manifest.records if r.image_id in row]
    rows = torch.tensor([row[r.image_id] for r in present], dtype=torch.long)
    predicted, confidence = predictions.predicted[rows], predictions.confidence[rows]
    return pl.DataFrame(
        {
            "image_id": [r.image_id for r in present],
            "path": [r.path for r in present],
            "predicted_class": [classes[i] for i in predicted.tolist()],
            "predicted_index": predicted.tolist(),
            "confidence": confidence.tolist(),
        }
    )


def cosine_probabilities(features: torch.Tensor, classifier: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Softmax of scaled cosine logits of a chunk of rows, [n, C] float32 (`cosine_top_classes`
    streams it over a table)."""
    weights = torch.nn.functional.normalize(classifier.float(), dim=-1)
    return torch.softmax(logit_scale * torch.nn.functional.normalize(features.float(), dim=-1) @ weights.T, dim=-1)
