"""LaFTer (Mirza et al., NeurIPS 2023, arXiv 2305.18287) as a recipe of plain stage functions,
checked against its reference code (jmiemirza/LaFTer: `LaFTer.py`, `trainers/LaFTer.py`,
`utils/utils.py`, `utils/model_utils.py`, `scripts/LaFTer.sh`).

1. `lafter_text_set`: every LLM description and every filled template of every class, embedded
   one by one with the CLIP text encoder and L2-normalised: a labelled *text* data set.
2. `train_text_classifier`: a linear classifier Linear(D→C, no bias) trained full-batch on it
   (every text at every iteration, as `train_txt_cls` does), Gaussian noise (std 0.1) added to the
   embeddings, label-smoothed cross-entropy (0.1), AdamW lr 5e-4 (weight decay 0.01), a constant
   rate, 400–600 iterations by dataset (`utils.text_cls_epochs`, `lafter_config_for`).
3. `tune_lafter`: FixMatch-style prompt tuning through the core loop `train_prompts`: 50 visual
   prompt tokens + LayerNorm affines + the text classifier as the head, which reads the
   unnormalised projected CLS feature with no scale (`forward_aug_with_prompts`: the feature
   norm is the logit scale), label-smoothed cross-entropy on the strong view, no confidence
   threshold. Pseudo-labels: the argmax of a *frozen copy* of the trained text classifier
   (`adapter_pl = deepcopy(adapter)`) on the L2-normalised features of the un-prompted vision
   tower for the weak view (`forward_normal_for_pl`); the tower's LayerNorm affines are the ones
   being tuned, so only the labeller's head is frozen. Settings (`scripts/LaFTer.sh`, `LaFTer.py`
   defaults): AdamW lr 5e-4, weight decay 0.01 except on biases, batch 50, constant rate (its
   `MultiStepLR` has no milestones), 50 epochs. Strong view (`get_random_transform`):
   RandomResizedCrop 0.2–1, flip, colour jitter p = 0.8, RandomGrayscale 0.2, Gaussian blur;
   weak view: resize + centre crop.

Where this differs from the reference, and why:
- The paper's Linear is unspecified on the bias; the reference's has none, as ours.
- Eq. 2 writes the noise as N(0, I); the reference code's standard deviation, 0.1, is ours.
- The tuned model is the last epoch's: the reference code reported the best test accuracy over
  epochs, a selection on test labels we do not repeat.
- The reference runs in fp32; we use the core loop's precision setting (bf16 autocast on GPUs).
- Prompt initialisation: the reference's bound hard-codes a 16-pixel patch, also for ViT-B/32;
  ours (`models.vpt`, shared with NoLA) uses the model's patch size (0.040 against 0.063).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nola_core.data import ImageRecord, MultiView, eval_transform, strong_transform
from nola_core.data.loading import tuned_image_features
from nola_core.data.transforms import Preprocess, Transform, views_decode_min_side
from nola_core.features import FeatureConfig, FeatureTable
from nola_core.methods.common import MethodRun, PseudoLabels, StageOutput, seeded
from nola_core.models import ClipModel, PromptTunedClassifier
from nola_core.predictions import PREDICTION_CHUNK_SIZE, TopClasses, streamed_top_classes, tuned_head_top_classes
from nola_core.runtime import resolve_device
from nola_core.stage_names import LAFTER_TEXT_STAGE, LAFTER_TUNED_STAGE
from nola_core.text import cde_texts, embed_texts, get_templates
from nola_core.tuning import EpochStats, TuningConfig, build_prompt_classifier, train_prompts

logger = logging.getLogger(__name__)

METHOD = "lafter"


# The reference's text-classifier iterations per dataset (`utils/utils.py`, `text_cls_epochs`).
TEXT_CLASSIFIER_ITERATIONS = {
    "dtd": 400, "eurosat": 400, "fgvc_aircraft": 500, "food101": 400, "cifar10": 400, "cifar100": 400,
    "imagenet": 500, "flowers102": 600, "sun397": 500, "ucf101": 400, "imagenet_r": 500, "imagenet_a": 500,
    "imagenet_sketch": 500, "caltech101": 500,
}

# LaFTer's template sets that differ from the dataset's own (NoLA's) set.
TEMPLATE_SETS = {"eurosat": "eurosat_openai3"}


@dataclass(frozen=True)
class TextClassifierConfig:
    """LaFTer's text-only classifier (`LaFTer.py`, `train_txt_cls`; `trainers/LaFTer.py`,
    `train_txt_clas`): full batch, noise std 0.1, label smoothing 0.1, AdamW 5e-4 with weight
    decay 0.01, constant rate; `iterations` 500 (ImageNet's; `lafter_config_for` sets each
    dataset's 400–600)."""

    noise_std: float = 0.1
    label_smoothing: float = 0.1
    lr: float = 5e-4
    weight_decay: float = 0.01
    iterations: int = 500
    seed: int = 0


def _lafter_tuning() -> TuningConfig:
    """LaFTer's prompt tuning (`scripts/LaFTer.sh`, `LaFTer.py` defaults, `utils.py`:
    `setup_lafter_training_utils`; the head as `trainers/LaFTer.py`: `forward_aug_with_prompts`)."""
    return TuningConfig(num_prompts=50, deep_prompts=False, lr=5e-4, weight_decay=0.01,
                        no_decay_names=("bias", "LayerNorm.bias", "LayerNorm.weight"), batch_size=50,
                        micro_batch_size=25, reference_batch_size=50, epochs=50, label_smoothing=0.1,
                        head_input="projected", head_logit_scale=1.0, lr_schedule="constant")


@dataclass(frozen=True)
class LaFTerConfig:
    text: TextClassifierConfig = field(default_factory=TextClassifierConfig)
    tuning: TuningConfig = field(default_factory=_lafter_tuning)
    templates: str | None = None  # a template-set name; None takes the dataset's own

    def with_seed(self, seed: int) -> "LaFTerConfig":
        return dataclasses.replace(
            self, text=dataclasses.replace(self.text, seed=seed), tuning=dataclasses.replace(self.tuning, seed=seed)
        )


def lafter_config_for(dataset: str, config: LaFTerConfig = LaFTerConfig()) -> LaFTerConfig:
    """`config` with the reference's text-classifier iterations for `dataset` and, unless
    `config.templates` is set, its template set where it differs from the dataset's own
    (EuroSAT: `ds_specific_templates` in LaFTer's `utils/data_utils.py` is CLIP's three)."""
    name = dataset.lower()
    if name in TEXT_CLASSIFIER_ITERATIONS:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text,
                                                                      iterations=TEXT_CLASSIFIER_ITERATIONS[name]))
    if config.templates is None and name in TEMPLATE_SETS:
        config = dataclasses.replace(config, templates=TEMPLATE_SETS[name])
    return config


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

    Every iteration takes every text with fresh noise (full batch, as the reference); the noise
    comes from one seeded generator and the layer from a seeded default initialisation.
    """
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings for {labels.shape[0]} labels")
    device = resolve_device(device)
    generator = torch.Generator().manual_seed(config.seed)
    with seeded(config.seed):
        layer = nn.Linear(embeddings.shape[1], num_classes, bias=False)
    layer.to(device)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    inputs = F.normalize(embeddings.float(), dim=-1).to(device)
    targets = labels.long().to(device)
    losses: list[float] = []
    for _ in range(config.iterations):
        noisy = inputs + config.noise_std * torch.randn(inputs.shape, generator=generator).to(device)
        loss = F.cross_entropy(layer(noisy), targets, label_smoothing=config.label_smoothing)
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
    """Prompted copy of the vision tower with the trained text classifier, its rows as trained (not
    normalised), as the head; `config.head_input` / `head_logit_scale` say what the head reads
    (LaFTer: the unnormalised projected feature, no scale, as `forward_aug_with_prompts`)."""
    classifier = build_prompt_classifier(clip, weight, config)
    with torch.no_grad():
        classifier.head.weight.copy_(weight.float())
    return classifier


def lafter_pseudo_labeller(classifier: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Hard labels for weak views from a frozen copy of the classifier's head as it is now.

    The reference's `forward_normal_for_pl`: CLIP's own `encode_image` (no prompts; the LayerNorm
    affines are shared with the model being tuned), L2-normalised, through `adapter_pl`, the copy
    of the text classifier taken before tuning (`txt_cls_init`), no scale. Call it before training:
    the copy never follows the head being trained.
    """
    frozen_head = classifier.head.weight.detach().clone().float()

    def label(weak_views: torch.Tensor) -> torch.Tensor:
        features = F.normalize(classifier.encoder.visual(weak_views).float(), dim=-1)
        return (features @ frozen_head.to(features.device).T).argmax(dim=-1)

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


def lafter_strong_view(pre: Preprocess) -> Transform:
    """The reference's `get_random_transform` (`utils/model_utils.py`): RandomResizedCrop 0.2–1
    (bilinear), flip, ColorJitter(.4, .4, .4, .1) p = 0.8, RandomGrayscale 0.2, Gaussian blur
    σ ∈ [0.1, 2] on every image; no perspective, no second jitter."""
    return strong_transform(pre, crop_scale=(0.2, 1.0), crop_interpolation="bilinear", flip_p=0.5,
                            jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, perspective_p=0.0,
                            second_jitter=None, blur_sigma=(0.1, 2.0), blur_p=1.0)


def lafter_views(clip: ClipModel) -> MultiView:
    """(weak = resize + centre crop, the reference's `te_transform`; strong = `lafter_strong_view`),
    CLIP-normalised; large JPEGs decode reduced as far as both views allow."""
    strong = lafter_strong_view(clip.preprocess)
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
        StageOutput(LAFTER_TEXT_STAGE, clip_table.ids, text_top,
                    PseudoLabels.argmax(clip_table.ids, text_top, unlabeled_ids)),
        StageOutput(LAFTER_TUNED_STAGE, clip_table.ids, tuned_top, final=True),
    ]
    tensors = {"text_classifier": weight}
    tensors.update({f"tuned.{name}": t.cpu() for name, t in classifier.trainable_state_dict().items()})
    return MethodRun(
        method=METHOD, seed=config.tuning.seed, stages=stages, tensors=tensors,
        history={"text_loss": text_losses, "epochs": [dataclasses.asdict(s) for s in history]},
        artifacts={"classifier": classifier},
    )
