"""NoLA (arXiv 2411.19346): its recipe, its config, and its stages, in one place.

descriptions → CDE classifier → DINO features → top-k pseudo-labels → DL network →
prompt-tuned CLIP encoder → predictions. `run_nola` runs it alone on a dataset folder;
`run_nola_method` runs it from the shared inputs a comparison (or the Dagster graph) already
holds and packages its outputs as `StageOutput`s for the common evaluation. The stage functions
(`cde_pseudo_labels`, `tune_prompts`, `apply_wiseft`, `stage_predictions`, ...) are what the
Dagster assets call, one per asset; what other methods share (dataset loading and features:
`nola_core.data.loading`; texts: `nola_core.text.dataset`; scoring: `nola_core.predictions`)
lives outside this file.

Defaults are the paper's (`NolaConfig`: k = max(16, ⌊0.2·N/C⌋), MLP 768→256→C, Adam 1e-3,
batch 32, 50 epochs; 16 shallow prompts + LayerNorm affines + CDE head, AdamW 4e-3, wd 0.01,
batch 512, 50 epochs, label smoothing 0.1). Differences from the reference code are listed in
docs/fidelity.md (DINO gets ImageNet normalisation; the last epoch is kept, never a checkpoint
chosen on labels). In a comparison, `NolaConfig.models`, `.features` and `.device` are ignored:
the shared models, features and device are used for every method alike.

The end streams (`stage_predictions`, `nola_core.predictions`): each stage is scored chunk by
chunk over the feature tables and keeps only each image's top classes, so the [N, C]
probability matrices of a million-image dataset are never built.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

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
from nola_core.data import DatasetSpec, ImageRecord, Manifest, known_labels
from nola_core.data.loading import evaluation_records, image_features, load_dataset, training_ids, tuned_image_features
from nola_core.data.transforms import MultiView, strong_transform, views_decode_min_side, weak_transform
from nola_core.distributed import DistributedContext
from nola_core.eval import RANDOM_MODEL_NOTE, EvaluationLabels, evaluate_stages, format_stage_table
from nola_core.features import FeatureConfig, FeatureTable
from nola_core.methods.common import MethodRun, PseudoLabels, StageOutput, seeded
from nola_core.models import ClipModel, DinoModel, ModelConfig, PromptTunedClassifier, load_clip, load_dino
from nola_core.models.vpt import interpolate_trainable
from nola_core.predictions import (
    PREDICTION_CHUNK_SIZE,
    TopClasses,
    cosine_top_classes,
    dl_network_top_classes,
    prediction_table,
    tuned_head_top_classes,
)
from nola_core.runtime import resolve_device
from nola_core.stage_names import (
    CDE_STAGE,
    NOLA_DL_STAGE,
    NOLA_SELECTION_STAGE,
    NOLA_TEMPLATES_STAGE,
    NOLA_TUNED_STAGE,
    ZERO_SHOT_STAGE,
)
from nola_core.text.dataset import resolve_descriptions, text_checks, text_classifiers
from nola_core.tuning import EpochStats, TuningConfig, build_prompt_classifier, train_prompts

logger = logging.getLogger(__name__)

METHOD = "nola"


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


def nola_config_with_seed(config: NolaConfig, seed: int) -> NolaConfig:
    return dataclasses.replace(
        config,
        alignment=dataclasses.replace(config.alignment, seed=seed),
        tuning=dataclasses.replace(config.tuning, seed=seed),
    )


def cde_pseudo_labels(
    clip_features: torch.Tensor, cde: torch.Tensor, config: AlignmentConfig
) -> PseudoLabelSelection:
    """Top-k most confident images per class under the CDE classifier (rows of `clip_features`)."""
    k = per_class_k(clip_features.shape[0], cde.shape[0], config.k_min, config.k_fraction)
    return select_top_k(class_log_odds(clip_features, cde, config.logit_scale, config.score_chunk_size), k)


def selection_pseudo_labels(selection: PseudoLabelSelection, train_ids: Sequence[str]) -> PseudoLabels:
    """NoLA's top-k selection (rows of the training features) as id-keyed pseudo-labels."""
    ids = tuple(train_ids[row] for row in selection.indices.tolist())
    return PseudoLabels(ids, selection.labels.long(), len(train_ids))




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


def fixed_pseudo_labels(dl_network: torch.nn.Module, dino_table: FeatureTable, ids: Sequence[str]) -> torch.Tensor:
    """[len(ids)] the DL network's class for each image from its stored (evaluation-view) DINO
    features, streamed over the (mapped) table: the labels `TuningConfig.fixed_pseudo_labels`
    trains on, computed once instead of one DINO forward per weak view and step."""
    return dl_network_top_classes(dl_network, dino_table, ids).predicted


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
    distributed: DistributedContext | None = None,
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


def apply_wiseft(
    classifier: PromptTunedClassifier, clip: ClipModel, cde: torch.Tensor, config: TuningConfig, alpha: float
) -> None:
    """Interpolate, in place, between the untuned (initial, seeded) and tuned trainable tensors."""
    untuned = build_prompt_classifier(clip, cde, config).trainable_state_dict()
    classifier.load_trainable_state_dict(interpolate_trainable(untuned, classifier.trainable_state_dict(), alpha))


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
        NOLA_DL_STAGE: dl_network_top_classes(dl_network, dino_table, ids, k, chunk_size),
        NOLA_TUNED_STAGE: tuned_head_top_classes(classifier, tuned_table, ids, k, chunk_size),
        NOLA_TEMPLATES_STAGE: cosine_top_classes(tuned_table, ids, zero_shot, logit_scale, k, chunk_size),
    }


def nola_stages(
    ids: Sequence[str],
    probabilities: dict[str, TopClasses | torch.Tensor],
    selection: PseudoLabels,
    train_ids: Sequence[str],
) -> list[StageOutput]:
    """NoLA's stages for the common evaluation, from `stage_predictions`' output (rows = `ids`)
    and the top-k selection: what `run_nola_method` returns and the Dagster `evaluation` asset
    evaluates from its stored artifacts."""
    ids = tuple(ids)
    return [
        StageOutput(NOLA_SELECTION_STAGE, ids, None, selection),
        StageOutput(NOLA_DL_STAGE, ids, probabilities[NOLA_DL_STAGE],
                    PseudoLabels.argmax(ids, probabilities[NOLA_DL_STAGE], train_ids)),
        StageOutput(NOLA_TUNED_STAGE, ids, probabilities[NOLA_TUNED_STAGE], final=True),
        StageOutput(NOLA_TEMPLATES_STAGE, ids, probabilities[NOLA_TEMPLATES_STAGE]),
    ]


def nola_stage_outputs(
    stage_predictions: Mapping[str, TopClasses | torch.Tensor],
    ids: Sequence[str],
    selection: PseudoLabels,
    train_ids: Sequence[str],
) -> list[StageOutput]:
    """NoLA's stage table as `StageOutput`s for `nola_core.eval.evaluate_stages`: the top-k
    selection, the zero-shot and CDE baselines, then the DL network, the tuned model (final) and
    the tuned encoder with templates. `stage_predictions` is `stage_predictions`' output (rows
    follow `ids`), `selection` the top-k pseudo-labels by id (`selection_pseudo_labels`).
    """
    ids = tuple(ids)
    selection_stage, *own = nola_stages(ids, stage_predictions, selection, train_ids)
    baselines = [StageOutput(name, ids, stage_predictions[name]) for name in (ZERO_SHOT_STAGE, CDE_STAGE)]
    return [selection_stage, *baselines, *own]


def run_nola_method(
    clip: ClipModel,
    dino: DinoModel,
    root: Path,
    train_records: Sequence[ImageRecord],
    eval_records: Sequence[ImageRecord],
    clip_table: FeatureTable,
    dino_table: FeatureTable,
    zero_shot: torch.Tensor,
    cde: torch.Tensor,
    config: NolaConfig = NolaConfig(),
    features: FeatureConfig = FeatureConfig(),
    device: str | torch.device = "auto",
) -> MethodRun:
    """NoLA from the shared inputs: CLIP and DINO feature tables of `eval_records`, the
    zero-shot and CDE classifiers; `train_records` are the unlabeled images (all readable).
    `run_nola` is this chain after loading the dataset, models, texts and features itself."""
    device = resolve_device(device)
    train_ids = [r.image_id for r in train_records]
    selection = cde_pseudo_labels(clip_table.rows_for(train_ids), cde, config.alignment)
    empty = [c for c, count in enumerate(selection.counts) if count == 0]
    if empty:
        logger.warning("no pseudo-label at all for classes %s (indices): the DL network never sees them", empty)
    dl_network, alignment_losses = train_alignment(dino_table.rows_for(train_ids), selection, config.alignment, device,
                                                   cpu_threads=config.tuning.compute.cpu_threads)
    fixed = fixed_pseudo_labels(dl_network, dino_table, train_ids) if config.tuning.fixed_pseudo_labels else None
    with seeded(config.tuning.seed):
        classifier, history = tune_prompts(clip, dino, dl_network, cde, root, train_records, config.tuning, device,
                                           fixed_labels=fixed)
    if config.tuning.wiseft_alpha is not None:
        apply_wiseft(classifier, clip, cde, config.tuning, config.tuning.wiseft_alpha)
    tuned_table = tuned_image_features(classifier, clip, root, eval_records, features, device)
    predictions = stage_predictions(clip_table, dino_table, zero_shot, cde, dl_network, classifier, tuned_table,
                                    config.alignment.logit_scale, chunk_size=config.prediction_chunk_size)
    stages = nola_stages(clip_table.ids, predictions, selection_pseudo_labels(selection, train_ids), train_ids)
    tensors = {f"dl_network.{name}": t.detach().cpu() for name, t in dl_network.state_dict().items()}
    tensors.update({f"tuned.{name}": t.cpu() for name, t in classifier.trainable_state_dict().items()})
    return MethodRun(
        method=METHOD, seed=config.tuning.seed, stages=stages, tensors=tensors,
        history={"alignment_loss": alignment_losses, "epochs": [dataclasses.asdict(s) for s in history]},
        artifacts={"selection": selection, "dl_network": dl_network, "classifier": classifier, "history": history,
                   "stage_predictions": predictions},
    )


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

    by_id = {r.image_id: r for r in manifest.records}
    run = run_nola_method(clip, dino, spec.root, [by_id[i] for i in train_ids], records, clip_table, dino_table,
                          zero_shot, cde, config, config.features, device)
    selection, predictions = run.artifacts["selection"], run.artifacts["stage_predictions"]
    labels_by_id = known_labels(manifest, labeled) if labeled is not None else {}
    report = selection_report(selection, spec.classes, train_ids, labels_by_id)
    logger.info("top-%d pseudo-labels: %s", selection.k, report["per_class"])
    result = NolaResult(
        spec=spec, manifest=manifest, zero_shot=zero_shot, cde=cde, selection=selection,
        selection_report=report, dl_network=run.artifacts["dl_network"], classifier=run.artifacts["classifier"],
        history=run.artifacts["history"],
        predictions=prediction_table(manifest, clip_table.ids, predictions[NOLA_TUNED_STAGE], spec.classes),
        stages=evaluate_stages(
            nola_stage_outputs(predictions, clip_table.ids, selection_pseudo_labels(selection, train_ids), train_ids),
            spec.classes, EvaluationLabels.from_manifests(manifest, labeled)),
        random_models=config.models.clip_is_random or config.models.dino_is_random,
        text_checks=checks,
    )
    logger.info("\n%s", result.stage_table())
    return result
