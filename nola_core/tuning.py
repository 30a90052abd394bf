"""Prompt tuning of the CLIP vision encoder, FixMatch-style (NoLA; LaFTer uses the same loop).

Each image is decoded once per step and turned into two views: a weak view, from which a frozen
pseudo-labeller (the DL network on DINO features, for NoLA) takes a hard argmax label, and a
strong view, on which the prompted CLIP classifier is trained with label-smoothed
cross-entropy. No confidence threshold. Gradient accumulation keeps the paper's effective
batch of 512 on small memory; the learning rate is scaled down linearly when the effective
batch is smaller than the reference batch (tiny datasets).

Determinism: every epoch's image order and every image's augmentation seed come from
`TuningConfig.seed` alone, so the trained tensors do not depend on the number of data-loader
workers or, under `torch.distributed` (see `nola_core.distributed`), on the number of processes:
each optimizer step sees the same images, split across ranks, and the loss is the sum over the
step's images divided by their count, whatever the split.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from nola_core.acceleration import compute_dtype, fused_attention, precast_weights, resolve_precision
from nola_core.data import ImageRecord, ManifestImageDataset, MultiView, collate_skipping_failures
from nola_core.distributed import DistributedContext
from nola_core.models.loading import ClipModel
from nola_core.models.vpt import PromptTunedClassifier
from nola_core.runtime import (
    ComputeSettings,
    atomic_output,
    autocast_context,
    cpu_thread_budget,
    loader_workers,
    resolve_device,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuningConfig:
    """Defaults are NoLA's reference (`trainers/NoLA.py`, `config.yml`; docs/fidelity.md): 16
    shallow prompts, AdamW 4e-3, weight decay 0.01 except on tensors whose name contains one of
    `no_decay_names`, a constant learning rate, batch 512, 50 epochs, label smoothing 0.1.

    The head (`models.vpt.PromptTunedClassifier`): `head_input` "projected" applies it to the
    unnormalised projected CLS feature and `head_logit_scale` 1 adds no scale, as the reference's
    `cde_adapter` (and LaFTer's `adapter`); "normalized" with e.g. 100 gives a cosine-style head.
    Zero-shot and CDE scoring stay cosine x 100 (`AlignmentConfig.logit_scale`).

    `fixed_pseudo_labels`: True takes one label per image, computed once from the DINO features of
    the evaluation view (the feature store holds them), and skips the weak view and the DINO
    forward during tuning (about a quarter less compute per step, BENCHMARKS.md). That is what
    NoLA's reference does in effect: its "weak" view is `te_transform` (resize + centre crop, no
    randomness), so every image gets the same label at every step; NoLA's recipe therefore sets
    it (`methods.nola.nola_tuning_config`). False (this dataclass's default, and LaFTer's) runs the
    labeller on a fresh weak view (`MultiView`'s first transform) of every image at every step.
    `compute` (`runtime.ComputeSettings`, shared with feature extraction): loader workers,
    precision, and `fused_attention` / `precast_weights`, which only change speed
    (`nola_core.acceleration`).

    `wiseft_alpha`: the WiSE-FT post-step after training (`methods.nola.apply_wiseft`): mix the
    untuned and tuned trainable tensors with this weight on the tuned ones (0 = untuned,
    1 = tuned). None (default) keeps the tuned model as trained. It does not change training.
    """

    num_prompts: int = 16
    deep_prompts: bool = False
    lr: float = 4e-3
    weight_decay: float = 0.01
    batch_size: int = 512  # effective batch per optimizer step (accumulated, over all processes)
    micro_batch_size: int = 32  # images per forward/backward per process; lower it on small memory
    reference_batch_size: int = 512  # the batch the learning rate was set for
    epochs: int = 50
    # The reference's list: in open_clip's names (ln_pre, ln_1, ...) only "bias" ever matches,
    # so LayerNorm weights, prompts and the head are decayed, LayerNorm biases are not.
    no_decay_names: tuple[str, ...] = ("bias", "LayerNorm.bias", "LayerNorm.weight")
    label_smoothing: float = 0.1
    head_input: str = "projected"  # projected | normalized
    head_logit_scale: float = 1.0
    lr_schedule: str = "constant"  # constant (the reference's MultiStepLR without milestones) | cosine
    seed: int = 0
    fixed_pseudo_labels: bool = False
    wiseft_alpha: float | None = None
    compute: ComputeSettings = field(default_factory=ComputeSettings)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TuningConfig":
        """The config `dataclasses.asdict` gave (what artifact facts hold), also from the flat
        layout written before `compute` was nested (num_workers, precision, ... at the top)."""
        values = dict(values)
        compute = dict(values.pop("compute", None) or {})
        for name in ComputeSettings.__dataclass_fields__:
            if name in values:
                compute.setdefault(name, values.pop(name))
        if isinstance(values.get("no_decay_names"), list):
            values["no_decay_names"] = tuple(values["no_decay_names"])
        return cls(**values, compute=ComputeSettings(**compute))


@dataclass
class EpochStats:
    """Label-free signals, logged for people to inspect; nothing is selected by them."""

    epoch: int
    loss: float
    mean_entropy: float  # of the tuned model's predictions on strong views
    agreement: float  # fraction of strong-view predictions equal to the pseudo-label
    images: int
    failed_images: int


class _SeededItems(Dataset):
    """Items keyed by (index, seed): the transform's randomness is a function of the key alone."""

    def __init__(self, base: ManifestImageDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]


class _StrongOnly:
    """The last view of a MultiView, as a 1-tuple (fixed pseudo-labels need no weak view)."""

    def __init__(self, views: MultiView):
        self.transform = views.transforms[-1]

    def __call__(self, image):
        return (self.transform(image),)


def epoch_plan(num_images: int, step_size: int, micro: int, seed: int, epoch: int, rank: int = 0,
               world_size: int = 1) -> list[tuple[int, list[list[tuple[int, int]]]]]:
    """This rank's share of one epoch: per optimizer step, (images in the whole step, micro-batches).

    The order and the per-image augmentation seeds depend on (seed, epoch) only; rank r takes
    positions r, r + W, ... of each step, cut into micro-batches of at most `micro` keys.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_images, generator=generator).tolist()
    item_seeds = torch.randint(0, 2**62, (num_images,), generator=generator).tolist()
    plan = []
    for start in range(0, num_images, step_size):
        step = order[start : start + step_size]
        mine = [(index, item_seeds[index]) for index in step[rank::world_size]]
        plan.append((len(step), [mine[i : i + micro] for i in range(0, len(mine), micro)]))
    return plan


def train_prompts(
    classifier: PromptTunedClassifier,
    root: Path,
    records: Sequence[ImageRecord],
    views: MultiView,
    pseudo_labeller: Callable[[torch.Tensor], torch.Tensor] | None,
    config: TuningConfig = TuningConfig(),
    device: str | torch.device = "auto",
    progress: Callable[[EpochStats], None] | None = None,
    *,
    fixed_labels: torch.Tensor | None = None,
    frozen_modules: Sequence[nn.Module] = (),
    distributed: DistributedContext | None = None,
    resume_dir: Path | None = None,
) -> list[EpochStats]:
    """Train the classifier's trainable tensors in place; returns per-epoch statistics.

    `views` gives (weak view for the pseudo-labeller, strong view for CLIP) from one decode;
    `pseudo_labeller` maps a batch of weak views to hard labels (it runs under inference mode).
    With `config.fixed_pseudo_labels`, `fixed_labels` [len(records)] replaces it: only the strong
    view is made and no labeller runs. `frozen_modules` are networks the labeller uses (DINO),
    sped up like the classifier's frozen tower. With `distributed` (world size > 1) the
    classifier is wrapped in DDP and each rank trains on its share of every step; all ranks end
    with the same tensors. The tuned model is the last epoch's: no checkpoint is chosen by any
    accuracy. `progress` is called on rank 0 only.

    With `resume_dir`, the resumable state (trainable tensors, optimizer, scheduler, RNG, epoch,
    history) is written there atomically after every epoch (rank 0), and a rerun with the same
    records and config resumes after the last saved epoch, under any number of processes: a run
    killed at any point ends with the same tensors as an uninterrupted one (the epoch plans depend
    on the seed and epoch only).
    A state saved for other records or another config is ignored (training restarts).
    """
    device = resolve_device(device)
    rank, world = (distributed.rank, distributed.world_size) if distributed is not None else (0, 1)
    local_processes = distributed.local_world_size if distributed is not None else 1
    if config.fixed_pseudo_labels != (fixed_labels is not None):
        raise ValueError("TuningConfig.fixed_pseudo_labels=True needs fixed_labels (one per record), and "
                         "fixed_labels are only used with fixed_pseudo_labels=True")
    if fixed_labels is not None and len(fixed_labels) != len(records):
        raise ValueError(f"fixed_labels has {len(fixed_labels)} labels for {len(records)} records")
    if fixed_labels is None and pseudo_labeller is None:
        raise ValueError("a pseudo_labeller is needed unless fixed pseudo-labels are used")
    if len(records) < world:
        raise ValueError(f"{len(records)} images cannot be shared by {world} processes")
    classifier.to(device)
    transform = _StrongOnly(views) if fixed_labels is not None else views
    dataset = _SeededItems(ManifestImageDataset(Path(root), records, transform, decode_min_side=views.decode_min_side))
    micro = max(1, min(config.micro_batch_size, len(dataset)))
    # Images per optimizer step: `batch_size` for any micro-batch size and number of processes (each
    # takes its share of the step in micro-batches of at most `micro`), so neither changes the
    # training beyond float rounding.
    step_size = min(config.batch_size, len(dataset))
    accumulation = math.ceil(step_size / (micro * world))  # micro-batches per process per step, at most
    lr = config.lr * min(1.0, step_size / config.reference_batch_size)
    optimizer = tuning_optimizer(classifier, lr, config)
    steps_per_epoch = math.ceil(len(dataset) / step_size)
    scheduler = _schedule(optimizer, config.lr_schedule, steps_per_epoch * config.epochs)
    model: nn.Module = classifier
    if world > 1:
        model = nn.parallel.DistributedDataParallel(classifier, device_ids=[device.index] if device.type == "cuda" else None)
    labels_on_device = fixed_labels.long().to(device) if fixed_labels is not None else None
    if rank == 0:
        logger.info("prompt tuning: %d images, %d process(es) x micro-batch %d x %d accumulation, lr %.2e, "
                    "%d epochs, %s pseudo-labels, precision %s", len(dataset), world, micro, accumulation, lr,
                    config.epochs, "fixed" if fixed_labels is not None else "per-view",
                    resolve_precision(device, config.compute.precision))
    history: list[EpochStats] = []
    fingerprint = _resume_fingerprint(records, config, fixed_labels)
    start = 0
    if resume_dir is not None:
        start, history = _load_resume_state(Path(resume_dir), fingerprint, classifier, optimizer, scheduler)
        if start and rank == 0:
            logger.info("prompt tuning: resuming after epoch %d/%d from %s", start, config.epochs, resume_dir)
    workers = loader_workers(device, config.compute.num_workers)
    epochs = range(start, config.epochs)
    # The plans are made lazily, once each, for the loop and the loader; the loader runs ahead of the
    # loop by its prefetch only, so `tee` holds no more than the plans between the two.
    plans, sampled = itertools.tee(epoch_plan(len(dataset), step_size, micro, config.seed, epoch, rank, world)
                                   for epoch in epochs)
    threads = cpu_thread_budget(device, workers, local_processes, config.compute.cpu_threads)
    with _fast_modules([classifier, *frozen_modules], device, config), threads:
        batches = _micro_batches(dataset, sampled, workers, device, config.seed)
        for epoch, plan in zip(epochs, plans):
            stats = _train_epoch(model, classifier, batches, plan, pseudo_labeller, labels_on_device, optimizer,
                                 scheduler, config, device, world)
            stats.epoch = epoch + 1
            history.append(stats)
            if resume_dir is not None and rank == 0:
                _save_resume_state(Path(resume_dir), fingerprint, epoch + 1, history, classifier, optimizer, scheduler)
            if rank == 0:
                logger.info("epoch %d/%d loss %.4f entropy %.3f agreement %.3f", stats.epoch, config.epochs,
                            stats.loss, stats.mean_entropy, stats.agreement)
                if progress is not None:
                    progress(stats)
    classifier.eval()
    return history


@contextlib.contextmanager
def _fast_modules(modules: Sequence[nn.Module], device: torch.device, config: TuningConfig):
    with contextlib.ExitStack() as stack:
        for module in modules:
            if config.compute.fused_attention:
                stack.enter_context(fused_attention(module))
            if config.compute.precast_weights:
                stack.enter_context(precast_weights(module, compute_dtype(device, config.compute.precision)))
        yield


def _micro_batches(dataset: Dataset, plans: Iterator, workers: int, device: torch.device, seed: int) -> Iterator:
    """The collated micro-batches of every plan in turn, from one loader for the whole run: its
    workers start once and prefetch across epoch boundaries (a loader per epoch re-spawned them at
    each, seconds on spawn / forkserver while the GPU waited). No workers for one micro-batch in
    all. Its own generator seeds the workers, so the caller's RNG is not drawn (items carry seeds).
    """
    keys = (batch for plan in plans for _, batches in plan for batch in batches)
    head = list(itertools.islice(keys, 2))
    loader = DataLoader(
        dataset,
        batch_sampler=itertools.chain(head, keys),
        num_workers=workers if len(head) > 1 else 0,
        collate_fn=collate_skipping_failures,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


def _train_epoch(model, classifier, batches: Iterator, plan, pseudo_labeller, fixed_labels, optimizer, scheduler,
                 config: TuningConfig, device: torch.device, world: int) -> EpochStats:
    """One epoch's optimizer steps; takes exactly the plan's micro-batches from `batches`."""
    totals = torch.zeros(5, dtype=torch.float64)  # loss, entropy, agreement, images, failed
    classifier.train()
    last_input: torch.Tensor | None = None
    for step_images, step_batches in plan:
        optimizer.zero_grad(set_to_none=True)
        if not step_batches:  # fewer images in this step than processes: join the gradient sync with zeros
            _join_sync_with_zeros(model, last_input, device, config)
        for position in range(len(step_batches)):
            views_batch, indices, batch_failed = next(batches)
            totals[4] += len(batch_failed)
            synced = position == len(step_batches) - 1
            sync = contextlib.nullcontext() if synced or world == 1 else model.no_sync()
            with sync:
                if views_batch is None or not len(indices):
                    if synced and world > 1:  # every image of it failed; the sync must still happen
                        _join_sync_with_zeros(model, last_input, device, config)
                    continue
                strong = views_batch[-1].to(device, non_blocking=True)
                if fixed_labels is not None:
                    targets = fixed_labels[indices.to(device)]
                else:
                    weak = views_batch[0].to(device, non_blocking=True)
                    with torch.inference_mode(), autocast_context(device, config.compute.precision):
                        targets = pseudo_labeller(weak).long()
                    targets = targets.clone()  # inference tensors cannot enter autograd
                last_input = strong
                with autocast_context(device, config.compute.precision):
                    logits = model(strong)
                losses = F.cross_entropy(logits.float(), targets, label_smoothing=config.label_smoothing,
                                         reduction="none")
                # DDP averages gradients over ranks: scaling by `world` makes the result the mean
                # over the step's images however they are split.
                (losses.sum() * (world / step_images)).backward()
            with torch.no_grad():
                probs = torch.softmax(logits.detach().float(), dim=-1)
                totals[0] += float(losses.detach().sum())
                totals[1] += float(-(probs * probs.clamp_min(1e-12).log()).sum())
                totals[2] += float((probs.argmax(-1) == targets).sum())
                totals[3] += len(targets)
        optimizer.step()
        scheduler.step()
    if world > 1:
        torch.distributed.all_reduce(totals)
    seen = max(int(totals[3]), 1)
    return EpochStats(epoch=0, loss=float(totals[0]) / seen, mean_entropy=float(totals[1]) / seen,
                      agreement=float(totals[2]) / seen, images=int(totals[3]), failed_images=int(totals[4]))


def _join_sync_with_zeros(model, last_input, device, config: TuningConfig) -> None:
    """A zero-gradient backward, so DDP's all-reduce of this step finds every rank."""
    if last_input is None:
        raise RuntimeError("a process had no readable image before a gradient sync; use fewer processes")
    with autocast_context(device, config.compute.precision):
        (model(last_input[:1]).float().sum() * 0.0).backward()


def tuning_optimizer(classifier: nn.Module, lr: float, config: TuningConfig) -> torch.optim.AdamW:
    """AdamW over the trainable tensors in two groups, as the reference's `setup_optim`: weight
    decay `config.weight_decay`, except for tensors whose name contains one of
    `config.no_decay_names` (weight decay 0)."""
    trainable = [(name, p) for name, p in classifier.named_parameters() if p.requires_grad]
    exempt = [any(part in name for part in config.no_decay_names) for name, _ in trainable]
    groups = [
        {"params": [p for (_, p), no in zip(trainable, exempt) if not no], "weight_decay": config.weight_decay},
        {"params": [p for (_, p), no in zip(trainable, exempt) if no], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=lr)


def _schedule(optimizer, name: str, total_steps: int):
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    raise ValueError(f"unknown lr_schedule {name!r}; choose constant or cosine")


RESUME_FILE = "resume.pt"


def _resume_fingerprint(records: Sequence[ImageRecord], config: TuningConfig,
                        fixed_labels: torch.Tensor | None) -> str:
    """What a saved state must have been trained on to be resumed from (speed-only knobs and the
    post-training WiSE-FT weight excluded).

    Not the number of processes: the step's images, learning rate and schedule do not depend on
    it, and every saved tensor is the same on all ranks, so a run killed under N processes
    resumes under M.
    """
    # The flat layout of before `compute` was nested: the same digest, so saved states still resume.
    flat = {**dataclasses.asdict(config), **dataclasses.asdict(config.compute)}
    trained_on = {k: v for k, v in flat.items() if k not in ("compute", "num_workers", "cpu_threads", "wiseft_alpha")}
    digest = hashlib.sha256(json.dumps(trained_on, sort_keys=True, default=str).encode())
    for record in records:
        digest.update(f"\0{record.image_id}\0{record.path}".encode())
    if fixed_labels is not None:
        digest.update(fixed_labels.long().cpu().numpy().tobytes())
    return digest.hexdigest()


def _save_resume_state(folder: Path, fingerprint: str, epoch: int, history: list[EpochStats],
                       classifier: PromptTunedClassifier, optimizer, scheduler) -> None:
    """One file, plain tensors and containers only (loads with weights_only=True), renamed into place."""
    state = {
        "fingerprint": fingerprint,
        "epoch": epoch,
        "history": [dataclasses.asdict(s) for s in history],
        "trainable": {name: t.contiguous().cpu() for name, t in classifier.trainable_state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_output(folder / RESUME_FILE) as temporary:
        torch.save(state, temporary)


def _load_resume_state(folder: Path, fingerprint: str, classifier: PromptTunedClassifier, optimizer,
                       scheduler) -> tuple[int, list[EpochStats]]:
    """(epochs already done, their statistics); (0, []) when there is nothing usable to resume from."""
    path = folder / RESUME_FILE
    if not path.is_file():
        return 0, []
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a state from an older torch, or damaged: restart cleanly
        logger.warning("prompt tuning: cannot read the resume state %s (%s); starting from epoch 1", path, error)
        return 0, []
    if state.get("fingerprint") != fingerprint:
        logger.warning("prompt tuning: the resume state %s is for other images or another config; starting "
                       "from epoch 1", path)
        return 0, []
    classifier.load_trainable_state_dict(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]), [EpochStats(**s) for s in state["history"]]


def save_trainable(classifier: PromptTunedClassifier, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Only the trainable tensors (prompts, LayerNorm affines, classifier), atomically, as safetensors."""
    tensors = {name: t.contiguous().cpu() for name, t in classifier.trainable_state_dict().items()}
    with atomic_output(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata or {})


def load_trainable(classifier: PromptTunedClassifier, path: Path) -> PromptTunedClassifier:
    classifier.load_trainable_state_dict(load_file(str(path)))
    return classifier.eval()


def build_prompt_classifier(clip: ClipModel, class_embeddings: torch.Tensor,
                            config: TuningConfig) -> PromptTunedClassifier:
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
