"""LatteCLIP (Cao et al., arXiv 2410.08211) as a recipe of plain functions.

Texts (Sec. 3.1). For every training image x: an image description T_image (an LMM describes
x), a group description T_group (the LMM describes a few images that share x's zero-shot
pseudo-label, shown together) and a class description T_class = "a photo of a [c]." for a
pseudo-label c. `generate_latteclip_texts` asks an LMM through `nola_core.llm.describe_image`
with the prompt set `latteclip_v1` (the paper's prompts word for word).

Training (Sec. 3.2), per batch, as the reference code does it (astra-vision/LatteCLIP,
`src/training/train.py`, `train_one_epoch_v2`):
- dual pseudo-labels: c_zs from the frozen zero-shot model, c_ft = the nearest prototype of the
  model being tuned (`dual_pseudo_labels`);
- Dynamic Feature Mixer (Eq. 1): each text's weight is the gap between its top-1 and top-2
  cosine similarity to the prototypes, plus 1e-6 (`mixer_weights`); the prototypes it compares
  with are those of the start of the epoch (the reference stacks them once per epoch);
- prototype-text embedding (Eq. 2): t̄ = (1 − α)·Σ wᵢ g(Tᵢ) / Σ wᵢ + α·p_c, α = 0.99 (the
  reference's `--alpha 0.01` is 1 − α), for T ∈ {T_image, T_group, T_class(c)}, once with
  c = c_zs and once with c = c_ft (`prototype_text_embeddings`);
- prototype update (`update_prototypes`): every class c labelled in the batch (by c_zs or c_ft)
  gets p_c ← normalise(mean of the t̄ of both assignments labelled c). Since t̄ already holds
  α·p_c, this is the paper's momentum update with µ = α = 0.99 (a step of about 1e-2), then
  renormalised; there is no second momentum on top;
- loss L_zs + L_ft, each open_clip's ClipLoss (the mean of the image→text and text→image
  cross-entropies) between the normalised image embeddings and their t̄ (`flyp_loss`); image and
  text encoders are both fine-tuned.
Prototypes start as the class-template embeddings; inference is the nearest prototype.
Settings (the reference's scripts/unsupervised/*.sh, `src/training/main.py`): OpenCLIP
ViT-B/32 (laion2b), batch 512, AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.2, none on
gains, biases and the logit scale), cosine schedule after a linear warm-up of about one epoch
(10–140 steps), 15/50/100 epochs per dataset (`latteclip_config_for`), lr 1e-7 (1e-6 on Food101
and SUN397, from the paper's appendix; the README's commands use 1e-7 everywhere). The training
view is open_clip's: RandomResizedCrop(0.9–1), colour jitter (.5, .5, .5, .1) p = 0.8,
grayscale p = 0.2 (`latteclip_train_view`).

Where this differs from the reference code, and why:
- c_zs is computed once, on the evaluation view, from the shared frozen CLIP features (the
  reference too reads precomputed CLIP predictions, `--clip-prediction-path`). Training reads
  only this hard label, so the zero-shot scores are streamed and only each image's top class kept.
- The reference mixes the zero-shot branch's class text with the c_ft branch's weight but
  divides by the zero-shot branch's total (`label_text_weight` for `label_text_weight_zeroshot`,
  a typo); ours uses each branch's own weights, so t̄ is a true weighted mean.
- The temperature is the model's learned logit scale, kept fixed here (the reference trains it
  at the same tiny lr, clamped to 100; it barely moves).
- A text missing for an image (an LMM call failed, or no LMM at all) is masked out of the
  mixer; with neither image nor group texts the method is the paper's "T_class only" ablation.
- Groups (`latteclip_groups`) partition each pseudo-class into groups of `group_size` (4) once,
  one LMM call per group, rather than sampling a new group around every image.
- `max_iterations` (2000, the paper's cap) shortens only Food101 (the script's 15 epochs are
  2,070 steps).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from nola_core.data import (ImageRecord, ManifestImageDataset, collate_skipping_failures, eval_transform,
                            strong_transform)
from nola_core.data.transforms import Preprocess, views_decode_min_side
from nola_core.features import FeatureConfig, FeatureTable, extract_features
from nola_core.methods.common import MethodRun, PseudoLabels, StageOutput, seeded
from nola_core.models import ClipModel
from nola_core.predictions import PREDICTION_CHUNK_SIZE, TopClasses, cosine_top_classes
from nola_core.runtime import ComputeSettings, autocast_context, cpu_thread_budget, loader_workers, resolve_device
from nola_core.stage_names import LATTECLIP_FINAL_STAGE, LATTECLIP_ZERO_SHOT_STAGE
from nola_core.text import zero_shot_classifier

logger = logging.getLogger(__name__)

METHOD = "latteclip"
TEXT_KINDS = ("image", "group", "class")

# Appendix B: lr 1e-6 on these two datasets, 1e-7 on the others.
DATASET_LEARNING_RATES = {"food101": 1e-6, "sun397": 1e-6}
# The reference's scripts/unsupervised/<dataset>_fine_tune_multiclass.sh: --epochs, --warmup, --wd.
DATASET_EPOCHS = {"caltech101": 50, "dtd": 100, "eurosat": 15, "fgvc_aircraft": 50, "flowers102": 50,
                  "food101": 15, "oxford_pets": 100, "stanford_cars": 50, "sun397": 15, "ucf101": 50}
DATASET_WARMUP_STEPS = {"caltech101": 10, "dtd": 10, "eurosat": 40, "fgvc_aircraft": 15, "flowers102": 12,
                        "food101": 140, "oxford_pets": 10, "stanford_cars": 20, "sun397": 40, "ucf101": 20}
DATASET_WEIGHT_DECAY = {"caltech101": 1.0}
# The reference's class text is its dataset's first zero-shot template (`src/training/abo.py`).
DATASET_CLASS_TEMPLATES = {"dtd": "{} texture.", "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
                           "flowers102": "a photo of a {}, a type of flower.",
                           "food101": "a photo of a {}, a type of food.", "ucf101": "a photo of a person doing {}"}
# Added to every mixer weight (reference `compute_text_weights(...) + 1e-6`): no weight is zero.
MIXER_EPSILON = 1e-6


@dataclass(frozen=True)
class LatteCLIPConfig:
    """Defaults are the reference code's (scripts/unsupervised, src/training/main.py) unless a
    field says otherwise; `latteclip_config_for` sets its per-dataset values."""

    class_template: str = "a photo of a {}."
    prototype_weight: float = 0.99  # α in Eq. 2 (reference: 1 - --alpha 0.01); also the update's momentum
    dynamic_mixer: bool = True  # False: every text weighs 1 (the paper's ablation)
    zero_shot_loss: bool = True  # L_zs
    finetune_loss: bool = True  # L_ft
    lr: float = 1e-7
    weight_decay: float = 0.2  # open_clip's default; none on gains, biases, the logit scale
    betas: tuple[float, float] = (0.9, 0.98)  # open_clip's default
    eps: float = 1e-6  # open_clip's default
    warmup_steps: int | None = None  # linear warm-up; None: one epoch of steps, at least 10 (the scripts' rule)
    batch_size: int = 512
    max_iterations: int = 2000  # the paper's cap (the reference has none)
    max_epochs: int = 50
    train_image_encoder: bool = True
    train_text_encoder: bool = True
    logit_scale: float | None = None  # None: the model's own exp(logit_scale), fixed
    group_size: int = 4
    compute: ComputeSettings = field(default_factory=ComputeSettings)  # num_workers, precision, cpu_threads are read
    seed: int = 0

    def with_seed(self, seed: int) -> "LatteCLIPConfig":
        return dataclasses.replace(self, seed=seed)


def latteclip_config_for(dataset: str, config: LatteCLIPConfig = LatteCLIPConfig()) -> LatteCLIPConfig:
    """The reference's per-dataset settings on top of `config`: epochs, warm-up steps, weight decay
    and class template from its scripts, and the paper's learning rate (1e-6 on Food101, SUN397)."""
    name = dataset.lower()
    tables = {"lr": DATASET_LEARNING_RATES, "max_epochs": DATASET_EPOCHS, "warmup_steps": DATASET_WARMUP_STEPS,
              "weight_decay": DATASET_WEIGHT_DECAY, "class_template": DATASET_CLASS_TEMPLATES}
    return dataclasses.replace(config, **{key: table[name] for key, table in tables.items() if name in table})


def warmup_steps_for(config: LatteCLIPConfig, steps_per_epoch: int) -> int:
    """`config.warmup_steps`, or about one epoch (at least 10 steps): what each reference script
    sets (10 for 8–11 steps per epoch, 40 for 37, 140 for 138)."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return max(10, steps_per_epoch)


# --- the maths, on tensors -------------------------------------------------------------------


def mixer_weights(texts: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Dynamic Feature Mixer, Eq. 1: top-1 minus top-2 cosine similarity to the prototypes.

    `texts` [..., D] → weights [...]. Needs at least two prototypes.
    """
    if prototypes.shape[0] < 2:
        raise ValueError("the feature mixer needs at least two prototypes")
    similarity = F.normalize(texts.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T
    top = similarity.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def prototype_text_embeddings(
    texts: torch.Tensor,
    weights: torch.Tensor,
    present: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """Eq. 2: t̄ = (1 − α)·Σᵢ wᵢ tᵢ / Σᵢ wᵢ + α·p_label, over the texts present.

    `texts` [B, T, D] (normalised text embeddings), `weights` [B, T], `present` [B, T] bool,
    `labels` [B] → [B, D]. Rows whose present weights sum to zero average their texts equally.
    """
    mask = present.to(texts.dtype)
    w = weights.to(texts.dtype) * mask
    total = w.sum(-1, keepdim=True)
    equal = mask / mask.sum(-1, keepdim=True).clamp_min(1.0)
    w = torch.where(total > 1e-12, w / total.clamp_min(1e-12), equal)
    mixed = (w.unsqueeze(-1) * texts).sum(-2)
    return (1.0 - alpha) * mixed + alpha * prototypes[labels].to(texts.dtype)


@torch.no_grad()
def update_prototypes(prototypes: torch.Tensor, t_bar: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """p_c ← normalise(mean of the t̄ labelled c), for each c in `labels` (reference
    `train_one_epoch_v2`: `memory_bank[c] = F.normalize(temp_bank[c] / cnt[c])`).

    `t_bar` holds both assignments' rows (c_zs and c_ft, with `labels` to match); each t̄ already
    mixes in α·p_label, so this is a momentum update with µ = α. Returns a new tensor; classes
    absent from the batch keep their prototype.
    """
    out = prototypes.clone()
    t_bar = t_bar.detach().to(prototypes.dtype)
    for c in torch.unique(labels).tolist():
        out[c] = F.normalize(t_bar[labels == c].mean(0), dim=-1)
    return out


@torch.no_grad()
def dual_pseudo_labels(
    zero_shot_labels: torch.Tensor, image_embeddings: torch.Tensor, prototypes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_zs, c_ft): the frozen zero-shot labels as given, and the nearest prototype of the
    model being tuned (cosine similarity of its image embeddings to the prototypes)."""
    similarity = F.normalize(image_embeddings.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T
    return zero_shot_labels.long(), similarity.argmax(dim=-1)


def flyp_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Eq. 3 as open_clip's ClipLoss computes it: the mean of the image→text and text→image
    cross-entropies over the batch, pairs on the diagonal. The images are normalised, the texts
    (t̄, nearly unit) are used as given, as in the reference (`encode_image(normalize=True)`, t̄ raw)."""
    images = F.normalize(image_embeddings.float(), dim=-1)
    logits = logit_scale * images @ text_embeddings.float().T
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


# --- texts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatteTexts:
    """LMM texts by image id: `image` (its own description) and `group` (its group's)."""

    image: Mapping[str, str] = field(default_factory=dict)
    group: Mapping[str, str] = field(default_factory=dict)
    failed: tuple[str, ...] = ()  # ids (or group keys) whose LMM call failed


@dataclass(frozen=True)
class TextBank:
    """Every distinct text once, and per training image / class the index of its texts (−1: none)."""

    texts: tuple[str, ...]
    image: torch.Tensor  # [N] long
    group: torch.Tensor  # [N] long
    classes: torch.Tensor  # [C] long


def text_bank(ids: Sequence[str], texts: LatteTexts, classes: Sequence[str], class_template: str) -> TextBank:
    index: dict[str, int] = {}

    def position(text: str | None) -> int:
        if text is None or not text.strip():
            return -1
        return index.setdefault(text, len(index))

    class_rows = [position(class_template.replace("{}", name)) for name in classes]
    image_rows = [position(texts.image.get(i)) for i in ids]
    group_rows = [position(texts.group.get(i)) for i in ids]
    return TextBank(tuple(index), torch.tensor(image_rows), torch.tensor(group_rows), torch.tensor(class_rows))


def latteclip_groups(
    ids: Sequence[str], labels: torch.Tensor, group_size: int = 4, seed: int = 0
) -> list[list[str]]:
    """Partition the images of each pseudo-class into seeded random groups of `group_size`.

    A leftover single image joins the class's previous group, so no group of a class with
    several images is a lone image.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    generator = torch.Generator().manual_seed(seed)
    groups: list[list[str]] = []
    for c in torch.unique(labels).tolist():
        members = [ids[i] for i in torch.nonzero(labels == c).flatten().tolist()]
        order = torch.randperm(len(members), generator=generator).tolist()
        chunks = [[members[j] for j in order[k : k + group_size]] for k in range(0, len(order), group_size)]
        if len(chunks) > 1 and len(chunks[-1]) == 1 and group_size > 1:
            chunks[-2].extend(chunks.pop())
        groups.extend(chunks)
    return groups


def generate_latteclip_texts(
    provider,
    root: Path,
    records: Sequence[ImageRecord],
    zero_shot_labels: torch.Tensor,
    *,
    domain: str | None = None,
    prompt_set: str = "latteclip_v1",
    group_size: int = 4,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    kinds: Sequence[str] = ("image", "group"),
    prompts_dir: str | Path | None = None,
) -> LatteTexts:
    """Image and group descriptions from an LMM (`provider`: a `nola_core.llm` chat provider).

    One call per image and one per group (images sharing a zero-shot pseudo-label, sent
    together). A failed call is logged and leaves that text missing (LatteCLIP masks missing
    texts); the failures are listed in the result, never silently dropped.
    """
    from nola_core.llm import LLMError, describe_image, load_prompt_set

    prompts = load_prompt_set(prompt_set, prompts_dir)
    by_id = {r.image_id: r for r in records}
    image_texts: dict[str, str] = {}
    group_texts: dict[str, str] = {}
    failed: list[str] = []
    if "image" in kinds:
        prompt = prompts.render_image_prompt("image", domain)
        for record in records:
            try:
                image_texts[record.image_id] = describe_image(provider, root / record.path, prompt, cache_dir=cache_dir)
            except (LLMError, OSError) as error:
                logger.warning("no image description for %s: %s", record.path, error)
                failed.append(record.image_id)
    if "group" in kinds:
        prompt = prompts.render_image_prompt("group", domain)
        for group in latteclip_groups([r.image_id for r in records], zero_shot_labels, group_size, seed):
            try:
                text = describe_image(provider, [root / by_id[i].path for i in group], prompt, cache_dir=cache_dir)
            except (LLMError, OSError) as error:
                logger.warning("no group description for %d images starting %s: %s", len(group),
                               by_id[group[0]].path, error)
                failed.append("group:" + group[0])
                continue
            group_texts.update({i: text for i in group})
    logger.info("LatteCLIP texts: %d image, %d group (of %d images), %d failed calls",
                len(image_texts), len(group_texts), len(records), len(failed))
    return LatteTexts(image_texts, group_texts, tuple(failed))


# --- training ---------------------------------------------------------------------------------


@dataclass
class LatteStepStats:
    loss: float
    agreement: float  # fraction of images with c_zs == c_ft
    weights: dict[str, float]  # mean mixer weight per text kind (c_ft assignment)


@dataclass
class LatteEpochStats:
    """Label-free signals per epoch, for people to inspect; nothing is selected by them."""

    epoch: int
    steps: int
    loss: float
    agreement: float
    mean_weights: dict[str, float]
    images: int
    failed_images: int


def latteclip_step(
    image_embeddings: torch.Tensor,
    encode_texts: Callable[[list[str]], torch.Tensor],
    bank: TextBank,
    indices: torch.Tensor,
    zero_shot_labels: torch.Tensor,
    prototypes: torch.Tensor,
    config: LatteCLIPConfig,
    logit_scale: float,
    mixer_prototypes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, LatteStepStats]:
    """One LatteCLIP step on a batch: (loss to backpropagate, updated prototypes, stats).

    `image_embeddings` [B, D] carry gradients to the image encoder; `encode_texts` embeds a
    list of strings (with gradients when the text encoder is trained); `indices` are the
    batch's rows of the training set (into `bank` and `zero_shot_labels`). `mixer_prototypes`
    (default `prototypes`) are what the feature mixer compares texts with: the loop passes those
    of the epoch's start, as the reference does. Both assignments update the prototypes, whichever
    losses are on (reference: its loss switches only scale the losses).
    """
    device = image_embeddings.device
    prototypes = prototypes.to(device)
    mixer_prototypes = prototypes if mixer_prototypes is None else mixer_prototypes.to(device)
    if not (config.zero_shot_loss or config.finetune_loss):
        raise ValueError("LatteCLIP needs at least one of zero_shot_loss and finetune_loss")
    c_zs, c_ft = dual_pseudo_labels(zero_shot_labels[indices].to(device), image_embeddings.detach(), prototypes)
    image_rows, group_rows = bank.image[indices].to(device), bank.group[indices].to(device)
    class_rows = bank.classes.to(device)
    wanted = torch.cat([image_rows, group_rows, class_rows[c_zs], class_rows[c_ft]])
    unique = torch.unique(wanted[wanted >= 0])
    embedded = F.normalize(encode_texts([bank.texts[i] for i in unique.tolist()]).float(), dim=-1)
    lookup = torch.full((len(bank.texts),), -1, dtype=torch.long, device=device)
    lookup[unique] = torch.arange(unique.numel(), device=device)

    t_bars = []
    for labels in (c_zs, c_ft):
        rows = torch.stack([image_rows, group_rows, class_rows[labels]], dim=1)  # [B, 3]
        present = rows >= 0
        texts = embedded[lookup[rows.clamp_min(0)]] * present.unsqueeze(-1)  # [B, 3, D]
        if config.dynamic_mixer:
            weights = mixer_weights(texts.detach(), mixer_prototypes) + MIXER_EPSILON
        else:
            weights = torch.ones(present.shape, device=device)
        t_bars.append(prototype_text_embeddings(texts, weights, present, prototypes, labels, config.prototype_weight))
    mean_weights = {  # the c_ft assignment's (the loop's last)
        kind: float(weights[:, k][present[:, k]].mean()) if present[:, k].any() else float("nan")
        for k, kind in enumerate(TEXT_KINDS)
    }
    t_zs, t_ft = t_bars
    loss = image_embeddings.new_zeros((), dtype=torch.float32)
    if config.zero_shot_loss:
        loss = loss + flyp_loss(image_embeddings, t_zs, logit_scale)
    if config.finetune_loss:
        loss = loss + flyp_loss(image_embeddings, t_ft, logit_scale)
    new_prototypes = update_prototypes(prototypes, torch.cat([t_zs, t_ft]), torch.cat([c_zs, c_ft]))
    stats = LatteStepStats(loss=loss.item(), agreement=float((c_zs == c_ft).float().mean()), weights=mean_weights)
    return loss, new_prototypes, stats


def latteclip_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters as the reference's `main.py` makes them: no decay
    on gains, biases and the logit scale (ndim < 2, or "bn" / "ln" / "bias" / "logit_scale" in
    the name), `weight_decay` on the rest."""
    exempt = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": weight_decay}]


def train_latteclip_loop(
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    encode_texts: Callable[[list[str]], torch.Tensor],
    parameters: Sequence[nn.Parameter] | Sequence[dict],
    batches: Callable[[int], Iterable[tuple[torch.Tensor | None, torch.Tensor, list[int]]]],
    steps_per_epoch: int,
    bank: TextBank,
    zero_shot_labels: torch.Tensor,
    prototypes: torch.Tensor,
    config: LatteCLIPConfig,
    logit_scale: float,
    device: torch.device,
    progress: Callable[[LatteEpochStats], None] | None = None,
) -> tuple[torch.Tensor, list[LatteEpochStats]]:
    """The optimisation loop around `latteclip_step`, for any image / text encoders.

    `parameters`: tensors (decayed by `config.weight_decay`) or AdamW groups
    (`latteclip_parameter_groups`). `batches(epoch)` yields (inputs, row indices, failed indices)
    like the core image loaders (`collate_skipping_failures`); the run stops after
    min(max_iterations, max_epochs epochs) steps, the learning rate warms up linearly for
    `warmup_steps_for(config, steps_per_epoch)` steps, then follows a cosine. The prototypes
    each step returns are the next step's; the mixer compares with those of the epoch's start.
    Returns the final prototypes and per-epoch statistics.
    """
    total_steps = min(config.max_iterations, config.max_epochs * max(steps_per_epoch, 1))
    optimizer = torch.optim.AdamW(list(parameters), lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(warmup_steps_for(config, steps_per_epoch), total_steps))
    prototypes = prototypes.detach().float().to(device)
    history: list[LatteEpochStats] = []
    step, epoch = 0, 0
    while step < total_steps:
        losses, agreements, weights = [], [], {k: [] for k in TEXT_KINDS}
        seen = failed = 0
        mixer_prototypes = prototypes  # reference: stacked from the memory bank once per epoch
        for inputs, indices, batch_failed in batches(epoch):
            failed += len(batch_failed)
            if inputs is None or len(indices) < 2:  # a contrastive loss needs two pairs
                continue
            with autocast_context(device, config.compute.precision):
                image_embeddings = encode_images(inputs.to(device, non_blocking=True))
                loss, prototypes, stats = latteclip_step(
                    image_embeddings, encode_texts, bank, indices, zero_shot_labels, prototypes, config, logit_scale,
                    mixer_prototypes,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            seen += len(indices)
            losses.append(stats.loss)
            agreements.append(stats.agreement)
            for kind, value in stats.weights.items():
                if not math.isnan(value):
                    weights[kind].append(value)
            if step >= total_steps:
                break
        epoch += 1
        if not losses:
            raise RuntimeError("LatteCLIP: an epoch produced no usable batch (fewer than two readable images?)")
        stats = LatteEpochStats(
            epoch=epoch, steps=step, loss=sum(losses) / len(losses), agreement=sum(agreements) / len(agreements),
            mean_weights={k: (sum(v) / len(v) if v else float("nan")) for k, v in weights.items()},
            images=seen, failed_images=failed,
        )
        history.append(stats)
        logger.info("LatteCLIP epoch %d (step %d/%d): loss %.4f, c_zs = c_ft on %.1f%%, weights %s",
                    epoch, step, total_steps, stats.loss, 100 * stats.agreement,
                    {k: round(v, 3) for k, v in stats.mean_weights.items()})
        if progress is not None:
            progress(stats)
    return prototypes.cpu(), history


def _warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


# --- CLIP wrappers ----------------------------------------------------------------------------


TRAIN_CROP_SCALE = (0.9, 1.0)  # open_clip's AugmentationCfg default


def latteclip_train_view(pre: Preprocess) -> Callable:
    """open_clip's training transform with the reference's `aug_cfg` (`src/training/main.py`):
    RandomResizedCrop(0.9–1), colour jitter (.5, .5, .5, .1) p = 0.8, grayscale p = 0.2; no flip,
    perspective or blur."""
    return strong_transform(pre, crop_scale=TRAIN_CROP_SCALE, crop_interpolation=pre.interpolation, flip_p=0.0,
                            jitter=(0.5, 0.5, 0.5, 0.1), jitter_p=0.8, perspective_distortion=0.0, perspective_p=0.0,
                            second_jitter=None, blur_p=0.0, grayscale_p=0.2)


def class_text_weights(clip: ClipModel, classes: Sequence[str], template: str, device="cpu") -> torch.Tensor:
    """[C, D] unit rows: the class descriptions "a photo of a [c]." under the frozen text encoder.

    Both the frozen zero-shot classifier (c_zs) and the initial prototypes.
    """
    return zero_shot_classifier(clip, classes, (template,), device)


def build_latteclip_model(clip: ClipModel, config: LatteCLIPConfig) -> nn.Module:
    """A trainable copy of the whole open_clip model (the loaded one stays frozen)."""
    model = copy.deepcopy(clip.model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if config.train_image_encoder:
        for parameter in model.visual.parameters():
            parameter.requires_grad_(True)
    if config.train_text_encoder:
        for name, parameter in model.named_parameters():
            if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias"):
                parameter.requires_grad_(True)
    return model


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def tune_latteclip(
    clip: ClipModel,
    root: Path,
    records: Sequence[ImageRecord],
    texts: LatteTexts,
    zero_shot_labels: torch.Tensor,
    prototypes: torch.Tensor,
    classes: Sequence[str],
    config: LatteCLIPConfig = LatteCLIPConfig(),
    device: str | torch.device = "auto",
    progress: Callable[[LatteEpochStats], None] | None = None,
) -> tuple[nn.Module, torch.Tensor, list[LatteEpochStats]]:
    """Fine-tune a copy of CLIP on the unlabeled `records`; returns (model, prototypes, history).

    `zero_shot_labels[i]` is c_zs of `records[i]`; `prototypes` are the initial ones
    (`class_text_weights`). Everything random is drawn from `config.seed`. On the CPU, loader
    workers and compute threads share the CPUs (`runtime.loader_workers`, `cpu_thread_budget`).
    """
    device = resolve_device(device)
    model = build_latteclip_model(clip, config).to(device)
    model.train()
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("LatteCLIP: neither the image nor the text encoder is set to train")
    logit_scale = config.logit_scale if config.logit_scale is not None else float(model.logit_scale.exp())
    bank = text_bank([r.image_id for r in records], texts, classes, config.class_template)
    dataset = ManifestImageDataset(Path(root), records, latteclip_train_view(clip.preprocess),  # large JPEGs
                                   decode_min_side=views_decode_min_side(clip.preprocess, clip.preprocess,  # decode
                                                                         TRAIN_CROP_SCALE))  # reduced
    batch_size = max(2, min(config.batch_size, len(dataset)))
    generator = torch.Generator().manual_seed(config.seed)
    workers = loader_workers(device, config.compute.num_workers)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                        num_workers=workers, collate_fn=collate_skipping_failures,
                        pin_memory=device.type == "cuda", drop_last=len(dataset) > batch_size,
                        persistent_workers=workers > 0)  # one start for all epochs, not one per epoch

    def encode_texts(strings: list[str]) -> torch.Tensor:
        return model.encode_text(clip.tokenizer(strings).to(device))

    logger.info("LatteCLIP: %d images, batch %d, lr %.1e, %d texts (%d image, %d group)", len(dataset), batch_size,
                config.lr, len(bank.texts), int((bank.image >= 0).sum()), int((bank.group >= 0).sum()))
    with seeded(config.seed), cpu_thread_budget(device, workers, threads=config.compute.cpu_threads):
        final_prototypes, history = train_latteclip_loop(
            model.encode_image, encode_texts, latteclip_parameter_groups(model, config.weight_decay),
            lambda epoch: loader, len(loader), bank,
            zero_shot_labels, prototypes, config, logit_scale, device, progress,
        )
    return model.eval(), final_prototypes, history


def latteclip_top_classes(
    model: nn.Module,
    prototypes: torch.Tensor,
    clip: ClipModel,
    root: Path,
    records: Sequence[ImageRecord],
    ids: Sequence[str],
    features: FeatureConfig,
    device,
    logit_scale: float = 100.0,
    chunk_size: int = PREDICTION_CHUNK_SIZE,
    output: Path | None = None,
) -> TopClasses:
    """The nearest prototype (and its probability) under the fine-tuned image encoder for every
    id of `ids` (ids it could not read score a zero embedding), streamed `chunk_size` rows at a
    time; with `output`, the embeddings are written there as computed, not held in RAM."""
    table = extract_features(lambda images: model.encode_image(images, normalize=True), root, records,
                             eval_transform(clip.preprocess), features, device, dtype=torch.float32,
                             output=output, decode_min_side=clip.preprocess.resize_size)
    return cosine_top_classes(table, ids, prototypes, logit_scale, chunk_size=chunk_size)


def latteclip_zero_shot(
    clip: ClipModel,
    classes: Sequence[str],
    clip_table: FeatureTable,
    unlabeled_ids: Sequence[str],
    config: LatteCLIPConfig = LatteCLIPConfig(),
    device="cpu",
    chunk_size: int = PREDICTION_CHUNK_SIZE,
) -> tuple[torch.Tensor, TopClasses, PseudoLabels]:
    """The frozen model's side: (class-description weights = initial prototypes, the top class
    of every row of `clip_table`, streamed `chunk_size` rows at a time, and c_zs, that class, of
    every unlabeled image in `unlabeled_ids` order)."""
    weights = class_text_weights(clip, classes, config.class_template, device)
    top = cosine_top_classes(clip_table, clip_table.ids, weights, 100.0, chunk_size=chunk_size)
    labels = PseudoLabels.argmax(clip_table.ids, top, unlabeled_ids)
    if len(labels.ids) != len(unlabeled_ids):
        raise ValueError("every unlabeled image needs a row in clip_table")
    return weights, top, labels


def run_latteclip(
    clip: ClipModel,
    classes: Sequence[str],
    root: Path,
    train_records: Sequence[ImageRecord],
    eval_records: Sequence[ImageRecord],
    clip_table: FeatureTable,
    texts: LatteTexts = LatteTexts(),
    config: LatteCLIPConfig = LatteCLIPConfig(),
    features: FeatureConfig = FeatureConfig(),
    device: str | torch.device = "auto",
    chunk_size: int = PREDICTION_CHUNK_SIZE,
    tuned_output: Path | None = None,
) -> MethodRun:
    """All of LatteCLIP on one dataset from the shared inputs (`clip_table`: frozen CLIP
    features of `eval_records`; `texts`: from `generate_latteclip_texts`, or empty). Both stages
    keep only each image's top class; `tuned_output`: see `latteclip_top_classes`' `output`."""
    device = resolve_device(device)
    class_weights, zs_top, zs_labels = latteclip_zero_shot(
        clip, classes, clip_table, [r.image_id for r in train_records], config, device, chunk_size
    )
    model, prototypes, history = tune_latteclip(clip, root, train_records, texts, zs_labels.labels, class_weights,
                                                classes, config, device)
    final = latteclip_top_classes(model, prototypes, clip, root, eval_records, clip_table.ids, features, device,
                                  chunk_size=chunk_size, output=tuned_output)
    stages = [
        StageOutput(LATTECLIP_ZERO_SHOT_STAGE, clip_table.ids, zs_top, zs_labels),
        StageOutput(LATTECLIP_FINAL_STAGE, clip_table.ids, final, final=True),
    ]
    tensors = {"prototypes": prototypes}
    tensors.update({f"model.{name}": t for name, t in trainable_tensors(model).items()})
    return MethodRun(
        method=METHOD, seed=config.seed, stages=stages, tensors=tensors,
        history={"epochs": [dataclasses.asdict(s) for s in history]},
        artifacts={"model": model, "prototypes": prototypes},
    )
