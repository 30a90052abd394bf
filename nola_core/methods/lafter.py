"""LaFTer (Mirza et al., NeurIPS 2023, arXiv 2305.18287) as a recipe of plain stage functions.

1. `lafter_text_set`: every LLM description and every filled template of every class, embedded
   one by one with the CLIP text encoder and L2-normalised: a labelled *text* data set.
2. `train_text_classifier`: a linear classifier Linear(D→C) trained on it with Gaussian noise
   added to the embeddings (std 0.1), label-smoothed cross-entropy (0.1), AdamW 5e-4, a few
   hundred iterations. It transfers to image embeddings because CLIP aligns the two.
3. `tune_lafter`: FixMatch-style prompt tuning through the core loop `train_prompts`: 50 visual
   prompt tokens + LayerNorm affines + the text classifier as the head; pseudo-labels are the
   argmax of the *same* model without prompts on the weak view (online, as in the paper: the two
   branches share the LayerNorm affines and the classifier), cross-entropy with label smoothing
   on the strong view, no confidence threshold.

Where this differs from the paper, and why:
- The classifier has no bias, so it can be the prompt-tuned model's head as it is (the VPT head
  is bias-free); the paper's Linear is unspecified on this point. Its weights are used raw
  (logit scale 1): normalising rows, as NoLA's CDE head does, would change its predictions.
- Eq. 2 writes the noise as N(0, I); the reference code's standard deviation, 0.1, is our default.
- Weak view: resize + centre crop (the paper's "identity" at the model's input size). Strong
  view: the core `strong_transform` (RandomResizedCrop 0.2–1, flip, colour jitter p=0.8,
  perspective, blur), close to SimSiam's set the paper cites (SimSiam has grayscale where we
  have perspective).
- The optimiser of stage 3 (AdamW 4e-3, wd 0.01, effective batch 512, cosine, 50 epochs) is
  NoLA's `TuningConfig`; LaFTer's own schedule is in its supplementary, which we do not have.
  Only the prompt count differs (50). The tuned model is the last epoch's: the reference code
  reported the best test accuracy over epochs, a selection on test labels we do not repeat.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nola_core.data import ImageRecord, MultiView, eval_transform, strong_transform
from nola_core.data.transforms import views_decode_min_side
from nola_core.features import FeatureConfig, FeatureTable
from nola_core.methods.common import MethodRun, PseudoLabels, StageOutput, seeded
from nola_core.models import ClipModel, PromptTunedClassifier
from nola_core.pipeline import tuned_head_top_classes, tuned_image_features
from nola_core.predictions import PREDICTION_CHUNK_SIZE, TopClasses, streamed_top_classes
from nola_core.runtime import resolve_device
from nola_core.text import cde_texts, embed_texts, get_templates
from nola_core.tuning import EpochStats, TuningConfig, train_prompts

logger = logging.getLogger(__name__)

METHOD = "lafter"
TEXT_STAGE = "LaFTer text classifier"
TUNED_STAGE = "LaFTer prompt-tuned"


@dataclass(frozen=True)
class TextClassifierConfig:
    """LaFTer's text-only classifier: noise std 0.1, label smoothing 0.1, AdamW 5e-4, a few hundred iterations."""

    noise_std: float = 0.1
    label_smoothing: float = 0.1
    lr: float = 5e-4
    weight_decay: float = 0.01  # AdamW's default
    iterations: int = 300
    batch_size: int = 256
    seed: int = 0


def _lafter_tuning() -> TuningConfig:
    return TuningConfig(num_prompts=50)


@dataclass(frozen=True)
class LaFTerConfig:
    text: TextClassifierConfig = field(default_factory=TextClassifierConfig)
    tuning: TuningConfig = field(default_factory=_lafter_tuning)
    templates: str | None = None  # a template-set name; None takes the dataset's own

    def with_seed(self, seed: int) -> "LaFTerConfig":
        return dataclasses.replace(
            self, text=dataclasses.replace(self.text, seed=seed), tuning=dataclasses.replace(self.tuning, seed=seed)
        )


def lafter_text_set(
    clip: ClipModel,
    classes: Sequence[str],
    templates: str,
    descriptions: Mapping[str, Sequence[str]],
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [T, D], class index [T]) of every description and filled template."""
    texts = cde_texts(classes, get_templates(templates), descriptions)
    return embed_texts(lambda batch: clip.encode_text(batch, device), texts)


def train_text_classifier(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: TextClassifierConfig = TextClassifierConfig(),
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, list[float]]:
    """Fit Linear(D→C, no bias) on noisy text embeddings; returns its weight [C, D] and the losses.

    Batches are drawn with replacement from one seeded generator, which also draws the noise;
    the layer starts from a seeded random initialisation (as in the paper).
    """
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings for {labels.shape[0]} labels")
    device = resolve_device(device)
    generator = torch.Generator().manual_seed(config.seed)
    with seeded(config.seed):
        layer = nn.Linear(embeddings.shape[1], num_classes, bias=False)
    layer.to(device)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    inputs = F.normalize(embeddings.float(), dim=-1)
    losses: list[float] = []
    for _ in range(config.iterations):
        rows = torch.randint(inputs.shape[0], (min(config.batch_size, inputs.shape[0]),), generator=generator)
        noisy = inputs[rows] + config.noise_std * torch.randn(len(rows), inputs.shape[1], generator=generator)
        loss = F.cross_entropy(layer(noisy.to(device)), labels[rows].to(device), label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    logger.info("LaFTer text classifier: %d texts, %d iterations, final loss %.4f",
                inputs.shape[0], config.iterations, losses[-1] if losses else float("nan"))
    return layer.weight.detach().cpu(), losses


def text_classifier_probabilities(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Softmax of the text classifier on a chunk of L2-normalised image embeddings: [n, C]."""
    return torch.softmax(F.normalize(features.float(), dim=-1) @ weight.float().T, dim=-1)


def text_classifier_top_classes(
    table: FeatureTable, weight: torch.Tensor, chunk_size: int = PREDICTION_CHUNK_SIZE
) -> TopClasses:
    """The text classifier's top class for every row of `table`, scored `chunk_size` rows at a
    time, so a memory-mapped float16 table is never copied whole and [N, C] never built."""
    return streamed_top_classes(table, table.ids, lambda x, _: text_classifier_probabilities(x, weight),
                                chunk_size=chunk_size)


def build_lafter_classifier(clip: ClipModel, weight: torch.Tensor, config: TuningConfig) -> PromptTunedClassifier:
    """Prompted copy of the vision tower with the trained text classifier, unnormalised, as its head."""
    classifier = PromptTunedClassifier(
        copy.deepcopy(clip.visual),
        weight,
        num_prompts=config.num_prompts,
        deep_prompts=config.deep_prompts,
        logit_scale=1.0,
        init_seed=config.seed,
    )
    with torch.no_grad():
        classifier.head.weight.copy_(weight.float())
    return classifier


def lafter_pseudo_labeller(classifier: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Argmax of the model being tuned, without its prompts, on weak views (online pseudo-labels).

    Uses the classifier's `encoder.visual` (the vision tower whose LayerNorm affines are being
    tuned), its `head` and `logit_scale`: the un-prompted branch of LaFTer's Eq. 3.
    """

    def label(weak_views: torch.Tensor) -> torch.Tensor:
        features = F.normalize(classifier.encoder.visual(weak_views).float(), dim=-1)
        return (classifier.logit_scale * classifier.head(features)).argmax(dim=-1)

    return label


def tune_lafter(
    classifier: nn.Module,
    preprocess_views: MultiView,
    root: Path,
    records: Sequence[ImageRecord],
    config: TuningConfig,
    device: str | torch.device = "auto",
    progress: Callable[[EpochStats], None] | None = None,
) -> list[EpochStats]:
    """LaFTer's stage 3 on `classifier` in place (built by `build_lafter_classifier`).

    `preprocess_views` is (weak, strong); `lafter_views(clip)` gives the paper's pair.
    Runs under a seeded RNG so transforms in the main process repeat too.
    """
    with seeded(config.seed):
        return train_prompts(classifier, root, records, preprocess_views, lafter_pseudo_labeller(classifier),
                             config, device, progress)


def lafter_views(clip: ClipModel) -> MultiView:
    """(weak = resize + centre crop, strong = the core strong augmentation), CLIP-normalised;
    large JPEGs decode reduced as far as both views allow."""
    strong = strong_transform(clip.preprocess, perspective_p=0.0, second_jitter=None)  # the reference has neither
    return MultiView((eval_transform(clip.preprocess), strong),
                     decode_min_side=views_decode_min_side(clip.preprocess, clip.preprocess))


def run_lafter(
    clip: ClipModel,
    text_set: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    root: Path,
    train_records: Sequence[ImageRecord],
    eval_records: Sequence[ImageRecord],
    clip_table: FeatureTable,
    config: LaFTerConfig = LaFTerConfig(),
    features: FeatureConfig = FeatureConfig(),
    device: str | torch.device = "auto",
    chunk_size: int = PREDICTION_CHUNK_SIZE,
    tuned_output: Path | None = None,
) -> MethodRun:
    """All of LaFTer on one dataset, from the shared inputs.

    `text_set` is `lafter_text_set(...)`; `clip_table` holds the frozen CLIP features of
    `eval_records` (the shared feature asset); `train_records` are the unlabeled images. Both
    stages keep only each image's top class, scored `chunk_size` rows at a time; with
    `tuned_output`, the tuned embeddings are written there as computed, not held in RAM.
    """
    device = resolve_device(device)
    weight, text_losses = train_text_classifier(*text_set, num_classes, config.text, device)
    text_top = text_classifier_top_classes(clip_table, weight, chunk_size)
    unlabeled_ids = [r.image_id for r in train_records]
    classifier = build_lafter_classifier(clip, weight, config.tuning)
    history = tune_lafter(classifier, lafter_views(clip), root, train_records, config.tuning, device)
    tuned = tuned_image_features(classifier, clip, root, eval_records, features, device, output=tuned_output)
    tuned_top = tuned_head_top_classes(classifier, tuned, clip_table.ids, chunk_size=chunk_size)
    stages = [
        StageOutput(TEXT_STAGE, clip_table.ids, text_top, PseudoLabels.argmax(clip_table.ids, text_top, unlabeled_ids)),
        StageOutput(TUNED_STAGE, clip_table.ids, tuned_top, final=True),
    ]
    tensors = {"text_classifier": weight}
    tensors.update({f"tuned.{name}": t.cpu() for name, t in classifier.trainable_state_dict().items()})
    return MethodRun(
        method=METHOD, seed=config.tuning.seed, stages=stages, tensors=tensors,
        history={"text_loss": text_losses, "epochs": [dataclasses.asdict(s) for s in history]},
        artifacts={"classifier": classifier},
    )
