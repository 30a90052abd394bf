"""Train the mini world's CLIP and DINO from Debian's Fashion-MNIST and ship their weights.

    python -m nola_core.mini.train [--out nola_core/mini/weights] [--clip-steps 600] [--dino-steps 3000]

- CLIP (`nola-mini-clip`, open_clip config in nola_core/models/model_configs): contrastive on
  the Fashion-MNIST *training* split with captions from the grammar of `fashion.py`;
  class-aware targets (every caption of an image's class is a positive, as in supervised
  contrastive learning), ordinary augmentation (crop, flip, colour tint, brightness/contrast,
  inversion, noise, blur) so it is not blind to every change, but never textures or edges.
- DINO (`nola-mini-dino`, a small timm ViT): self-distillation (multi-crop with 2 global and
  2 local crops, teacher EMA, Sinkhorn-Knopp centring and sharpening, KoLeo: DINOv2's recipe)
  on *unlabeled* images: random renderings of source training images and the target domains'
  `unlabeled/` part; never labels.

Fixed seeds; the weights are written as fp16 safetensors with a manifest of their SHA-256
(`manifest.json`) and the training log (`train_log.txt`). Labels of the test split are read
only for the final report of accuracies in the log.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nola_core.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from nola_core.mini.domains import RENDERED_SHIFTS, SHIFTS, SOURCE, domain_indices, random_rendering, shift_images
from nola_core.mini.fashion import CLASSES, FASHION_MNIST_DIR, caption, load_split
from nola_core.models.registry import (
    DINO_CONFIGS,
    MINI_CLIP_NAME,
    MINI_DINO_NAME,
    MINI_MANIFEST,
    MINI_WEIGHTS_DIR,
    register_tiny_clip_configs,
)

DINO_DOMAIN_PER_CLASS = 100
"""Unlabeled images per class of each target domain that DINO trains on (the default size of
`python -m nola_core.mini.domains`; the shipped small domain is a prefix of it)."""


def _log(lines: list[str], text: str) -> None:
    print(text, flush=True)
    lines.append(text)


# ---------------------------------------------------------------- batched augmentation

def _resized_crops(x: torch.Tensor, size: int, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip for a batch [B, C, H, W] through one affine grid."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(*scale, generator=gen)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = log_ratio.exp()
    sx = (area * ratio).sqrt().clamp(max=1.0)
    sy = (area / ratio).sqrt().clamp(max=1.0)
    tx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sx)
    ty = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _blur(x: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (kernel[:, None] * kernel[None, :]).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])


def _where(p: float, b: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(b, 1, 1, 1, generator=gen) < p).float()


def clip_augment(gray: torch.Tensor, gen: torch.Generator, size: int = 32) -> torch.Tensor:
    """[B, 28, 28] uint8 → [B, 3, size, size] CLIP-normalised, ordinary augmentation."""
    b = gray.shape[0]
    x = _resized_crops(gray[:, None].float() / 255, size, (0.5, 1.0), gen)
    tint = torch.rand(b, 3, 1, 1, generator=gen) * 0.7 + 0.3
    ground = torch.rand(b, 3, 1, 1, generator=gen) * 0.35
    coloured = _where(0.5, b, gen)
    x = coloured * (x * tint + (1 - x) * ground) + (1 - coloured) * x.expand(-1, 3, -1, -1)
    invert = _where(0.15, b, gen)
    x = invert * (1 - x) + (1 - invert) * x
    contrast = torch.empty(b, 1, 1, 1).uniform_(0.6, 1.4, generator=gen)
    brightness = torch.empty(b, 1, 1, 1).uniform_(-0.2, 0.2, generator=gen)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    jitter = _where(0.8, b, gen)
    x = jitter * ((x - mean) * contrast + mean + brightness) + (1 - jitter) * x
    x = torch.where(_where(0.3, b, gen).bool(), _blur(x), x)
    noise_std = torch.rand(b, 1, 1, 1, generator=gen) * 0.15 * _where(0.3, b, gen)
    x = x + torch.randn(x.shape, generator=gen) * noise_std
    x = x.clamp(0, 1)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def dino_augment(rgb: torch.Tensor, gen: torch.Generator, size: int, scale: tuple[float, float],
                 solarize_p: float) -> torch.Tensor:
    """DINO's view: resized crop, flip, colour jitter, channel shuffle, grayscale, blur,
    solarisation; [B, 3, 28, 28] in [0, 1] → ImageNet-normalised [B, 3, size, size]."""
    b = rgb.shape[0]
    x = _resized_crops(rgb, size, scale, gen)
    jitter = _where(0.8, b, gen)
    contrast = torch.empty(b, 1, 1, 1).uniform_(0.6, 1.4, generator=gen)
    brightness = torch.empty(b, 1, 1, 1).uniform_(-0.3, 0.3, generator=gen)
    gray = x.mean(dim=1, keepdim=True)
    saturation = torch.empty(b, 1, 1, 1).uniform_(0.6, 1.4, generator=gen)
    jittered = ((gray + (x - gray) * saturation) - x.mean(dim=(1, 2, 3), keepdim=True)) * contrast \
        + x.mean(dim=(1, 2, 3), keepdim=True) + brightness
    x = jitter * jittered + (1 - jitter) * x
    perm = torch.stack([torch.randperm(3, generator=gen) for _ in range(b)])
    shuffled = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    x = torch.where(_where(0.3, b, gen).bool(), shuffled, x)
    x = torch.where(_where(0.2, b, gen).bool(), x.mean(dim=1, keepdim=True).expand_as(x), x)
    x = torch.where(_where(0.5, b, gen).bool(), _blur(x), x)
    x = x.clamp(0, 1)
    x = torch.where(_where(solarize_p, b, gen).bool() & (x > 0.5), 1 - x, x)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def _cosine(step: int, total: int, base: float, warmup: int, final: float = 0.0) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- CLIP

def train_clip(images: np.ndarray, labels: np.ndarray, steps: int, batch_size: int, captions_per_step: int,
               seed: int, log: list[str]) -> nn.Module:
    """Contrastive training with class-aware targets: image i and caption j are a positive
    pair when their classes match (each row's target mass is spread over its positives).
    Each step embeds `captions_per_step` captions, every class at least once (the text tower
    costs as much as the image tower per item, and ten classes need few captions)."""
    import open_clip

    register_tiny_clip_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(MINI_CLIP_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MINI_CLIP_NAME)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    pool_labels = np.repeat(np.arange(len(CLASSES)), 300)
    pool_tokens = tokenizer([caption(int(c), rng) for c in pool_labels])
    by_class = [np.flatnonzero(pool_labels == c) for c in range(len(CLASSES))]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.98))
    images_t, labels_t = torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(step, steps, 1e-3, warmup=min(50, steps // 10 + 1))
        batch = torch.from_numpy(rng.choice(len(images), batch_size, replace=False))
        y = labels_t[batch]
        text_classes = np.concatenate([np.arange(len(CLASSES)),
                                       rng.integers(0, len(CLASSES), captions_per_step - len(CLASSES))])
        text_rows = [int(rng.choice(by_class[c])) for c in text_classes]
        pixels = clip_augment(images_t[batch], gen)
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(pool_tokens[text_rows], normalize=True)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        same = (y[:, None] == torch.from_numpy(text_classes)[None, :]).float()
        loss = 0.5 * (torch.sum(-same / same.sum(1, keepdim=True) * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-same.T / same.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1), 1).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == steps - 1:
            _log(log, f"clip step {step:4d}/{steps} loss {loss.item():.4f} "
                      f"scale {model.logit_scale.exp().item():.1f} {time.perf_counter() - start:.0f}s")
    model.eval()
    return model


# ---------------------------------------------------------------- DINO

class DinoHead(nn.Module):
    """DINO's projection head: MLP, L2-normalised bottleneck, weight-normalised prototypes."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden: int = 512, bottleneck: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


def build_dino_backbone() -> nn.Module:
    import timm

    spec = DINO_CONFIGS[MINI_DINO_NAME]
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.overrides)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """DINOv2's teacher centring (`sinkhorn_knopp_teacher`): targets whose prototype use is
    balanced over the batch. It stands in for DINO's running centre, which at this scale let
    the teacher go flat (every target near uniform) within a hundred steps."""
    q = torch.exp((logits - logits.max()) / temperature).T  # [prototypes, batch]
    prototypes, batch = q.shape
    tiny = torch.finfo(q.dtype).tiny  # a prototype far from the whole batch underflows to 0
    q /= q.sum()
    for _ in range(iterations):
        q /= (q.sum(dim=1, keepdim=True) * prototypes).clamp_min(tiny)
        q /= (q.sum(dim=0, keepdim=True) * batch).clamp_min(tiny)
    return (q * batch).T


def koleo_loss(features: torch.Tensor) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: −mean log distance of each L2-normalised feature to its
    nearest neighbour in the batch, which spreads the class tokens out."""
    normed = F.normalize(features, dim=-1)
    with torch.no_grad():
        similarity = normed @ normed.T
        similarity.fill_diagonal_(-2.0)
        nearest = similarity.argmax(dim=1)
    return -torch.log((normed - normed[nearest]).norm(dim=-1) + 1e-8).mean()


def train_dino(source_renderings: np.ndarray, target_images: np.ndarray, steps: int, batch_size: int, seed: int,
               log: list[str], local_crops: int = 2, teacher_momentum: float = 0.99,
               teacher_temp: float = 0.015, lr_per_256: float = 2e-3, freeze_last_layer_steps: int = 50,
               out_dim: int = 256, koleo_weight: float = 0.1, target_share: float = 0.25) -> nn.Module:
    """Self-distillation without labels: multi-crop (2 global, `local_crops` local views),
    teacher EMA (momentum rising from `teacher_momentum` to 1, cosine), Sinkhorn-Knopp centring
    with sharpening (`teacher_temp`; student 0.1) and a KoLeo term on the student's class tokens
    (DINOv2's recipe for both), prototypes frozen for the first `freeze_last_layer_steps` steps.

    Each batch is `target_share` target-domain images ([N, 28, 28, 3] uint8, DINO's ordinary
    views) and source images seen through `source_renderings` ([S, R, 28, 28, 3]: R random
    renderings of each, see domains.random_rendering), every view taking one at random, so the
    views of a source image share only the garment's shape. Without these (ordinary views of
    the images alone), every crop of a textured image shares its background, and 400 steps
    made the features worse than a random network's on that domain (docs/mini_world.md)."""
    import copy

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    student = nn.ModuleDict({"backbone": build_dino_backbone()})
    student["head"] = DinoHead(student["backbone"].num_features, out_dim=out_dim)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    base_lr = lr_per_256 * batch_size / 256
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.04},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=base_lr)
    renderings = torch.from_numpy(source_renderings).permute(0, 1, 4, 2, 3)
    targets = torch.from_numpy(target_images).permute(0, 3, 1, 2)
    target_count = int(round(batch_size * target_share))
    source_count = batch_size - target_count
    start = time.perf_counter()
    student.train()
    for step in range(steps):
        lr = _cosine(step, steps, base_lr, warmup=min(100, steps // 10 + 1), final=1e-6)
        for group in optimizer.param_groups:
            group["lr"] = lr
        momentum = 1 - (1 - teacher_momentum) * (math.cos(math.pi * step / steps) + 1) / 2
        sources = torch.from_numpy(rng.integers(0, len(renderings), source_count))
        target_rows = targets[torch.from_numpy(rng.integers(0, len(targets), target_count))]

        def view_images() -> torch.Tensor:
            rendering = torch.from_numpy(rng.integers(0, renderings.shape[1], source_count))
            return torch.cat([renderings[sources, rendering], target_rows]).float() / 255

        globals_ = [dino_augment(view_images(), gen, 32, (0.4, 1.0), 0.0),
                    dino_augment(view_images(), gen, 32, (0.4, 1.0), 0.2)]
        locals_ = [dino_augment(view_images(), gen, 16, (0.1, 0.4), 0.0) for _ in range(local_crops)]
        with torch.no_grad():
            teacher_out = teacher["head"](teacher["backbone"](torch.cat(globals_)))
            teacher_probs = sinkhorn_knopp(teacher_out, teacher_temp).chunk(2)
            teacher_confidence = teacher_probs[0].max(dim=-1).values.mean().item()
        class_tokens = student["backbone"](torch.cat(globals_))
        student_out = [student["head"](class_tokens), student["head"](student["backbone"](torch.cat(locals_)))]
        student_logp = [F.log_softmax(o / 0.1, dim=-1) for o in student_out]
        student_views = student_logp[0].chunk(2) + student_logp[1].chunk(local_crops)
        loss, terms = 0.0, 0
        for t_index, t in enumerate(teacher_probs):
            for s_index, s in enumerate(student_views):
                if s_index == t_index:
                    continue
                loss = loss + torch.sum(-t * s, dim=-1).mean()
                terms += 1
        distillation = loss / terms
        koleo = koleo_loss(class_tokens[:batch_size])
        loss = distillation + koleo_weight * koleo
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 3.0)
        if step < freeze_last_layer_steps:
            for p in student["head"].last.parameters():
                p.grad = None
        optimizer.step()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)
        if step % 25 == 0 or step == steps - 1:
            _log(log, f"dino step {step:4d}/{steps} distillation {distillation.item():.4f} "
                      f"(uniform {math.log(out_dim):.2f}) koleo {koleo.item():.3f} lr {lr:.2e} "
                      f"teacher max-prob {teacher_confidence:.3f} {time.perf_counter() - start:.0f}s")
    teacher_backbone = teacher["backbone"]
    teacher_backbone.eval()
    return teacher_backbone


def dino_images(train_images: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray, source_count: int,
                renderings: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unlabeled DINO training images: `renderings` random renderings of each of `source_count`
    source (training split) images, [S, R, 28, 28, 3], and the `unlabeled/` part of every target
    domain at its default size, [N, 28, 28, 3]; all RGB uint8."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(train_images), source_count, replace=False)
    source = np.stack([
        np.stack([random_rendering(train_images[i], np.random.default_rng([seed, int(i), r])) for r in range(renderings)])
        for i in chosen
    ])
    unlabeled, _ = domain_indices(test_labels, DINO_DOMAIN_PER_CLASS, 0)
    targets = [np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image
               for name in RENDERED_SHIFTS for image in shift_images(name, test_images, unlabeled)]
    return source, np.stack(targets)


# ---------------------------------------------------------------- shipping and report

def save_weights(module: nn.Module, path: Path) -> str:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def report(weights_dir: Path, files: dict[str, str], test_images: np.ndarray, test_labels: np.ndarray,
           log: list[str], per_class: int = 100, head_train_per_class: int = 30) -> dict:
    """Zero-shot (generic templates) of the written CLIP and kNN accuracy of the written DINO,
    loaded by the checkpoint route the `mini` profile takes (hashes verified), on the source
    test images and each shifted domain; with the room label-free adaptation has there: the
    precision of NoLA's top-k zero-shot pseudo-labels, and the DL network head fitted on the
    true labels of `head_train_per_class` images per class (the shipped small domain's size),
    on DINO and on CLIP features, scored on the domain's other images."""
    from nola_core.mini.evaluate import (
        clip_features,
        dino_features,
        generic_zero_shot,
        head_accuracy_with_true_labels,
        knn_accuracy,
        top_k_precision,
        zero_shot_accuracy,
    )
    from nola_core.models import ModelConfig, load_clip, load_dino

    clip_file, dino_file = f"{MINI_CLIP_NAME}.safetensors", f"{MINI_DINO_NAME}.safetensors"
    config = ModelConfig(
        clip_name=MINI_CLIP_NAME, clip_pretrained=None, clip_checkpoint=str(weights_dir / clip_file),
        clip_checkpoint_sha256=files[clip_file], dino_name=MINI_DINO_NAME, dino_pretrained=False,
        dino_checkpoint=str(weights_dir / dino_file), dino_checkpoint_sha256=files[dino_file],
    )
    clip, dino = load_clip(config), load_dino(config)
    zero_shot_weights = generic_zero_shot(clip)
    indices, _ = domain_indices(test_labels, per_class, 0)
    # The heads' split is the same images (a prefix per class), so each model encodes them once.
    head_train, head_test = domain_indices(test_labels, head_train_per_class, per_class - head_train_per_class)
    row = {int(index): position for position, index in enumerate(indices)}
    train_rows, test_rows = ([row[int(i)] for i in part] for part in (head_train, head_test))
    labels = test_labels[indices]
    results = {}
    for name in [SOURCE, *SHIFTS]:
        shifted = shift_images(name, test_images, indices)
        features = {"clip": clip_features(clip, shifted), "dino": dino_features(dino, shifted)}
        zero_shot = zero_shot_accuracy(features["clip"], zero_shot_weights, labels)
        knn = knn_accuracy(features["dino"], labels)
        precision = top_k_precision(features["clip"], zero_shot_weights, labels)
        heads = {
            f"{model}_head_true_labels": head_accuracy_with_true_labels(
                rows[train_rows], labels[train_rows], rows[test_rows], labels[test_rows])
            for model, rows in (("dino", features["dino"]), ("clip", features["clip"]))
        }
        results[name] = {"clip_zero_shot": zero_shot, "dino_knn": knn, "top_k_precision": precision, **heads}
        _log(log, f"{name:9s} CLIP zero-shot {zero_shot:.3f}  DINO 20-NN (leave-one-out) {knn:.3f}  "
                  f"top-k precision {precision:.3f}  ({len(indices)} test images); DL head on true labels of "
                  f"{len(head_train)}, scored on {len(head_test)}: DINO {heads['dino_head_true_labels']:.3f}, "
                  f"CLIP {heads['clip_head_true_labels']:.3f}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=FASHION_MNIST_DIR)
    parser.add_argument("--out", type=Path, default=MINI_WEIGHTS_DIR)
    parser.add_argument("--clip-steps", type=int, default=600)
    parser.add_argument("--clip-batch", type=int, default=256)
    parser.add_argument("--clip-captions", type=int, default=64)
    parser.add_argument("--dino-steps", type=int, default=3000)
    parser.add_argument("--dino-batch", type=int, default=64)
    parser.add_argument("--dino-source-images", type=int, default=6000)
    parser.add_argument("--dino-renderings", type=int, default=6, help="random renderings kept per source image")
    parser.add_argument("--dino-target-share", type=float, default=0.25, help="of each batch")
    parser.add_argument("--dino-out-dim", type=int, default=256)
    parser.add_argument("--dino-teacher-temp", type=float, default=0.015)
    parser.add_argument("--dino-lr", type=float, default=2e-3, help="per 256 images")
    parser.add_argument("--dino-local-crops", type=int, default=2)
    parser.add_argument("--dino-koleo", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1: on a shared 2-core machine, 2 were 2-3x slower")
    parser.add_argument("--only", choices=["clip", "dino", "report"], default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log: list[str] = []
    _log(log, f"nola mini world training: {vars(args)}")
    _log(log, f"host: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{args.threads} threads")
    train_images, train_labels = load_split("train", args.source)
    test_images, test_labels = load_split("test", args.source)
    manifest_path = args.out / MINI_MANIFEST
    started = time.perf_counter()
    written: dict[str, str] = {}
    if args.only in (None, "clip"):
        clip = train_clip(train_images, train_labels, args.clip_steps, args.clip_batch, args.clip_captions,
                          args.seed, log)
        written[f"{MINI_CLIP_NAME}.safetensors"] = save_weights(clip, args.out / f"{MINI_CLIP_NAME}.safetensors")
    if args.only in (None, "dino"):
        renderings, targets = dino_images(train_images, test_images, test_labels, args.dino_source_images,
                                          args.dino_renderings, args.seed)
        _log(log, f"dino images: {len(renderings)} source images x {renderings.shape[1]} renderings, "
                  f"{len(targets)} target-domain unlabeled images")
        dino = train_dino(renderings, targets, args.dino_steps, args.dino_batch, args.seed, log,
                          local_crops=args.dino_local_crops, teacher_temp=args.dino_teacher_temp,
                          lr_per_256=args.dino_lr, out_dim=args.dino_out_dim, koleo_weight=args.dino_koleo,
                          target_share=args.dino_target_share)
        written[f"{MINI_DINO_NAME}.safetensors"] = save_weights(dino, args.out / f"{MINI_DINO_NAME}.safetensors")
    _log(log, f"training wall time {time.perf_counter() - started:.0f}s")
    # Read the manifest only now: `--only clip` and `--only dino` may run side by side.
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"files": {}}
    manifest["files"].update(written)
    manifest.setdefault("commands", {})[args.only or "all"] = " ".join(
        ["python -m nola_core.mini.train", *(sys.argv[1:] if argv is None else argv)])
    if len(manifest["files"]) == 2 and args.only in (None, "report"):
        manifest["report"] = report(args.out, manifest["files"], test_images, test_labels, log)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log_name = f"train_log{'_' + args.only if args.only else ''}.txt"
    (args.out / log_name).write_text("\n".join(log) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
