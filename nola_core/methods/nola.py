"""NoLA (arXiv 2411.19346) as a method recipe: the stages of `nola_core.pipeline`, composed.

Nothing of NoLA is re-implemented here. `run_nola_method` calls the pipeline's own stage
functions (`cde_pseudo_labels`, `train_alignment`, `tune_prompts`, `apply_wiseft`,
`tuned_image_features`, `stage_predictions`) on the shared inputs a comparison (or the
Dagster graph) already holds, and packages their outputs as `StageOutput`s for the common
evaluation. `run_nola` stays the way to run NoLA alone on a folder.

Defaults are the paper's (`NolaConfig`: k = max(16, ⌊0.2·N/C⌋), MLP 768→256→C, Adam 1e-3,
batch 32, 50 epochs; 16 shallow prompts + LayerNorm affines + CDE head, AdamW 4e-3, wd 0.01,
batch 512, 50 epochs, label smoothing 0.1). Differences from the reference code are the
pipeline's (DINO gets ImageNet normalisation; the last epoch is kept, never a checkpoint chosen
on labels). In a comparison, `NolaConfig.models`, `.features` and `.device` are ignored: the
shared models, features and device are used for every method alike.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from nola_core.alignment import PseudoLabelSelection
from nola_core.data import ImageRecord
from nola_core.features import FeatureConfig, FeatureTable
from nola_core.methods.common import MethodRun, PseudoLabels, StageOutput, seeded
from nola_core.models import ClipModel, DinoModel
from nola_core.predictions import TopClasses
from nola_core.pipeline import (
    TUNED_STAGE,
    NolaConfig,
    apply_wiseft,
    cde_pseudo_labels,
    fixed_pseudo_labels,
    stage_predictions,
    train_alignment,
    tune_prompts,
    tuned_image_features,
)
from nola_core.runtime import resolve_device

METHOD = "nola"
SELECTION_STAGE = "top-k pseudo-labels"
DL_STAGE = "DL network (DINO)"
TEMPLATES_STAGE = "tuned encoder + templates"


def nola_config_with_seed(config: NolaConfig, seed: int) -> NolaConfig:
    return dataclasses.replace(
        config,
        alignment=dataclasses.replace(config.alignment, seed=seed),
        tuning=dataclasses.replace(config.tuning, seed=seed),
    )


def selection_pseudo_labels(selection: PseudoLabelSelection, train_ids: Sequence[str]) -> PseudoLabels:
    """NoLA's top-k selection (rows of the training features) as id-keyed pseudo-labels."""
    ids = tuple(train_ids[row] for row in selection.indices.tolist())
    return PseudoLabels(ids, selection.labels.long(), len(train_ids))


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
        StageOutput(SELECTION_STAGE, ids, None, selection),
        StageOutput(DL_STAGE, ids, probabilities[DL_STAGE], PseudoLabels.argmax(ids, probabilities[DL_STAGE], train_ids)),
        StageOutput(TUNED_STAGE, ids, probabilities[TUNED_STAGE], final=True),
        StageOutput(TEMPLATES_STAGE, ids, probabilities[TEMPLATES_STAGE]),
    ]


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
    zero-shot and CDE classifiers; `train_records` are the unlabeled images (all readable)."""
    device = resolve_device(device)
    train_ids = [r.image_id for r in train_records]
    selection = cde_pseudo_labels(clip_table.rows_for(train_ids), cde, config.alignment)
    dl_network, alignment_losses = train_alignment(dino_table.rows_for(train_ids), selection, config.alignment, device)
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
        artifacts={"selection": selection, "dl_network": dl_network, "classifier": classifier},
    )
