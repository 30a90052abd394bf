"""NoLA's alignment stage: top-k CDE pseudo-labels, and the DINO-based labelling (DL) network.

The DL network is a small MLP on frozen DINO CLS features, trained with cross-entropy on the
k most confident images per class under the CDE classifier. Selection streams over chunks of
scores, so the score matrix of a million-image dataset never has to sit in memory at once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nola_core.runtime import cpu_thread_budget, resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignmentConfig:
    """Defaults are NoLA's: k = max(16, floor(0.2·N/C)); MLP 768→256→C; Adam 1e-3, batch 32, 50 epochs."""

    k_min: int = 16
    k_fraction: float = 0.2
    hidden_dim: int = 256
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 50
    seed: int = 0
    logit_scale: float = 100.0
    score_chunk_size: int = 65536


def per_class_k(num_images: int, num_classes: int, k_min: int = 16, k_fraction: float = 0.2) -> int:
    return max(k_min, math.floor(k_fraction * num_images / num_classes))


@dataclass(frozen=True)
class PseudoLabelSelection:
    """Images chosen as confident examples of a class: `indices` are rows of the scored table."""

    indices: torch.Tensor  # [M] long, ascending
    labels: torch.Tensor  # [M] long
    scores: torch.Tensor  # [M] float, the log-odds that won the image (sigmoid → probability)
    k: int
    num_classes: int

    @property
    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    @property
    def short_classes(self) -> list[int]:
        """Classes with fewer than k images: too few candidates, or lost in conflicts."""
        return [c for c, n in enumerate(self.counts) if n < self.k]


def class_log_odds(
    features: torch.Tensor,
    classifier: torch.Tensor,
    logit_scale: float = 100.0,
    chunk_size: int = 65536,
) -> Iterable[torch.Tensor]:
    """log(p / (1 - p)) of every class under the softmax of cosine logits, chunk by chunk.

    A ranking score that is monotone in the softmax probability but does not saturate: at
    CLIP's logit scale of 100, the top probability (and its log) rounds to exactly 1.0 (0.0) in
    float32 for most images, and ranking by it would turn into tie-breaking.
    Features may be float16 or memory-mapped; `torch.sigmoid` of a score gives the probability.
    """
    weights = F.normalize(classifier.float(), dim=-1)
    for start in range(0, features.shape[0], chunk_size):
        chunk = F.normalize(features[start : start + chunk_size].float(), dim=-1)
        yield _log_odds(logit_scale * chunk @ weights.T)


def _log_odds(logits: torch.Tensor) -> torch.Tensor:
    """l_c − logsumexp_{j≠c} l_j, computed without cancellation for the top class."""
    top = logits.max(dim=-1, keepdim=True)
    total = torch.exp(logits - top.values).sum(-1, keepdim=True)  # >= 1
    # Classes below the top: the excluded term is at most 1 of a sum that keeps the top's 1.
    rest = top.values + torch.log(total - torch.exp(logits - top.values))
    # The top class: mask it out and take the log-sum-exp of the others directly.
    others = logits.scatter(-1, top.indices, float("-inf")).logsumexp(-1, keepdim=True)
    rest = rest.scatter(-1, top.indices, others)
    return logits - rest


def select_top_k(score_chunks: Iterable[torch.Tensor], k: int) -> PseudoLabelSelection:
    """Per class, the k images with the highest score (log-odds, see `class_log_odds`) for that class.

    An image chosen by two classes keeps the class with the higher score. Keeps only a
    running [C, k] table of the best candidates, so memory does not grow with N.
    """
    best_scores: torch.Tensor | None = None
    best_rows: torch.Tensor | None = None
    offset = 0
    for chunk in score_chunks:
        chunk = chunk.float()
        rows = torch.arange(offset, offset + chunk.shape[0]).expand(chunk.shape[1], -1)
        scores = chunk.T
        if best_scores is not None:
            scores = torch.cat([best_scores, scores], dim=1)
            rows = torch.cat([best_rows, rows], dim=1)
        keep = min(k, scores.shape[1])
        best_scores, position = scores.topk(keep, dim=1)
        best_rows = rows.gather(1, position)
        offset += chunk.shape[0]
    if best_scores is None:
        raise ValueError("no images to select pseudo-labels from")
    num_classes = best_scores.shape[0]
    flat_rows = best_rows.reshape(-1)
    flat_scores = best_scores.reshape(-1)
    flat_labels = torch.arange(num_classes).repeat_interleave(best_rows.shape[1])
    # Resolve conflicts: in descending score order, the first occurrence of a row wins.
    order = torch.argsort(flat_scores, descending=True, stable=True)
    unique_rows, inverse = torch.unique(flat_rows[order], return_inverse=True)
    first = torch.full((unique_rows.numel(),), order.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(order.numel()), reduce="amin")
    winners = order[first]  # one entry per unique row, already in ascending row order
    return PseudoLabelSelection(
        indices=unique_rows,
        labels=flat_labels[winners],
        scores=flat_scores[winners],
        k=k,
        num_classes=num_classes,
    )


def selection_report(
    selection: PseudoLabelSelection,
    classes: Sequence[str],
    ids: Sequence[str],
    known_labels: Mapping[str, int] | None = None,
) -> dict:
    """Per-class counts; pseudo-label precision where an image's label happens to be known."""
    report: dict = {
        "k": selection.k,
        "selected": int(selection.indices.numel()),
        "per_class": {name: count for name, count in zip(classes, selection.counts)},
        "short_classes": [classes[c] for c in selection.short_classes],
    }
    if known_labels:
        predicted = selection.labels.tolist()
        pairs = [(known_labels[ids[row]], predicted[i]) for i, row in enumerate(selection.indices.tolist())
                 if ids[row] in known_labels]
        if pairs:
            report["labelled_selected"] = len(pairs)
            report["precision"] = sum(truth == guess for truth, guess in pairs) / len(pairs)
    return report


def alignment_network(in_dim: int, num_classes: int, hidden_dim: int = 256) -> nn.Sequential:
    """The DL network head: Linear → ReLU → Linear on frozen DINO features."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_classes))


def train_alignment(
    features: torch.Tensor,
    selection: PseudoLabelSelection,
    config: AlignmentConfig = AlignmentConfig(),
    device: str | torch.device = "auto",
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[nn.Sequential, list[float]]:
    """Fit the DL network on the selected rows of `features`; returns it (CPU, eval) and epoch losses.

    The selected rows sit in memory, so the loader has no workers (they would only pickle
    batches); on the CPU the loop runs within `runtime.cpu_thread_budget`, like every other loop.
    """
    device = resolve_device(device)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    network = alignment_network(features.shape[1], selection.num_classes, config.hidden_dim).to(device)
    inputs = features[selection.indices].float()
    loader = DataLoader(
        TensorDataset(inputs, selection.labels),
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
    )
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
    history: list[float] = []
    network.train()
    with cpu_thread_budget(device):
        for epoch in range(config.epochs):
            total, seen = 0.0, 0
            for batch, labels in loader:
                batch, labels = batch.to(device), labels.to(device)
                loss = F.cross_entropy(network(batch), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(labels)
                seen += len(labels)
            history.append(total / max(seen, 1))
            if progress is not None:
                progress(epoch + 1, config.epochs, history[-1])
    logger.info("DL network: %d epochs, final loss %.4f", config.epochs, history[-1] if history else float("nan"))
    return network.cpu().eval(), history


@torch.inference_mode()
def predict_alignment(network: nn.Module, features: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
    """Class probabilities of the DL network for every row: [N, C] float32, for small feature
    sets (the pipeline keeps only each row's top classes: `pipeline.dl_network_top_classes`)."""
    device = next(network.parameters()).device
    chunks = [torch.softmax(network(features[i : i + chunk_size].float().to(device)), dim=-1).cpu()
              for i in range(0, features.shape[0], chunk_size)]
    return torch.cat(chunks)
