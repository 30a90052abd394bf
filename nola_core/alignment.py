"""NoLA's alignment stage: top-k CDE pseudo-labels, and the DINO-based labelling (DL) network.

The DL network is a small MLP on frozen DINO CLS features, trained with cross-entropy on the
k most confident images per class under the CDE classifier, where class c ranks only the images
whose first CDE choice is c (NoLA's reference `top_k_indices_per_class2`; see `select_top_k`).
Selection streams over chunks of scores, so the score matrix of a million-image dataset never
has to sit in memory at once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import polars as pl
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
    """NoLA's `find_k` (utils/utils.py), in its float order: max(k_min, floor(N / C · fraction))."""
    return max(k_min, math.floor((num_images / num_classes) * k_fraction))


@dataclass(frozen=True)
class PseudoLabelSelection:
    """Images chosen as confident examples of a class: `indices` are rows of the scored table.

    `fallback_choice` maps each class that was no image's first choice to the choice (2 or 3) it
    was filled from, or 0 when it was not even a third choice (it then has no image).
    """

    indices: torch.Tensor  # [M] long, ascending
    labels: torch.Tensor  # [M] long
    scores: torch.Tensor  # [M] float, the log-odds that won the image (sigmoid → probability)
    k: int
    num_classes: int
    fallback_choice: dict[int, int] = field(default_factory=dict)

    @property
    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    @property
    def short_classes(self) -> list[int]:
        """Classes with fewer than k images: fewer than k candidates of their own, or (fallback
        classes only) images that stayed with their first choice."""
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


def select_top_k(score_chunks: Iterable[torch.Tensor], k: int, choices: int = 3) -> PseudoLabelSelection:
    """Per class c, the k images with the highest score for c among the images whose first
    choice (highest score) is c, as NoLA's reference (`utils/model_utils.py`,
    `top_k_indices_per_class2`). Only a class that is no image's first choice falls back to the
    images whose second choice it is, then third (`choices`); a class with fewer than k
    candidates keeps what it has (`short_classes`). Scores are log-odds (`class_log_odds`), which
    rank like the reference's softmax probabilities without saturating.

    An image picked twice (its own class and a fallback class) keeps the higher score, i.e. its
    first choice; the reference keeps whichever class comes first in index order. Streams: per
    choice only the best k candidates of each class are kept, so memory does not grow with N.
    """
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per choice: (classes, scores, rows)
    num_classes, offset = 0, 0
    for chunk in score_chunks:
        chunk = chunk.float()
        num_classes = chunk.shape[1]
        ranked_scores, ranked_classes = chunk.topk(min(choices, num_classes), dim=1)
        rows = torch.arange(offset, offset + chunk.shape[0])
        for choice in range(ranked_classes.shape[1]):
            candidates = (ranked_classes[:, choice], ranked_scores[:, choice], rows)
            if choice < len(kept):
                # Only what beats a full class's k-th kept score can enter (a tie goes to the earlier row).
                better = candidates[1] > _kth_score(kept[choice], k, num_classes)[candidates[0]]
                candidates = tuple(torch.cat([old, new[better]]) for old, new in zip(kept[choice], candidates))
                kept[choice] = _best_per_class(*candidates, k, num_classes)
            else:
                kept.append(_best_per_class(*candidates, k, num_classes))
        offset += chunk.shape[0]
    if not kept:
        raise ValueError("no images to select pseudo-labels from")
    classes, scores, rows = kept[0]
    fallback: dict[int, int] = {}
    picked = [kept[0]]
    for c in sorted(set(range(num_classes)) - set(classes.tolist())):
        fallback[c] = 0
        for choice, (choice_classes, choice_scores, choice_rows) in enumerate(kept[1:], start=2):
            mine = choice_classes == c
            if mine.any():
                picked.append((choice_classes[mine], choice_scores[mine], choice_rows[mine]))
                fallback[c] = choice
                break
    classes, scores, rows = (torch.cat(parts) for parts in zip(*picked))
    # An image picked twice: in descending score order, its first occurrence wins.
    order = torch.argsort(scores, descending=True, stable=True)
    unique_rows, inverse = torch.unique(rows[order], return_inverse=True)
    first = torch.full((unique_rows.numel(),), order.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(order.numel()), reduce="amin")
    winners = order[first]  # one entry per unique row, already in ascending row order
    return PseudoLabelSelection(
        indices=unique_rows,
        labels=classes[winners],
        scores=scores[winners],
        k=k,
        num_classes=num_classes,
        fallback_choice=fallback,
    )


def _best_per_class(classes: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor, k: int,
                    num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k highest-scoring (class, score, row) candidates of each class; ties go to the
    candidate listed first (the lower row, since earlier chunks are listed first)."""
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(classes[order], stable=True)]  # grouped by class, best first
    grouped = classes[order]
    counts = torch.bincount(grouped, minlength=num_classes)
    position = torch.arange(order.numel()) - (torch.cumsum(counts, 0) - counts)[grouped]
    keep = order[position < k]
    return classes[keep], scores[keep], rows[keep]


def _kth_score(kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: int, num_classes: int) -> torch.Tensor:
    """[C] the k-th best kept score of each class (`_best_per_class` order), -inf below k kept."""
    classes, scores, _ = kept
    counts = torch.bincount(classes, minlength=num_classes)
    threshold = torch.full((num_classes,), float("-inf"))
    full = counts >= k
    threshold[full] = scores[(torch.cumsum(counts, 0) - counts + k - 1)[full]]
    return threshold


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
        # Classes that were no image's first choice: the choice they were filled from (0: none).
        "fallback_classes": {classes[c]: choice for c, choice in selection.fallback_choice.items()},
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
    *,
    processes: int = 1,
    cpu_threads: int | None = None,
) -> tuple[nn.Sequential, list[float]]:
    """Fit the DL network on the selected rows of `features`; returns it (CPU, eval) and epoch losses.

    The selected rows sit in memory, so the loader has no workers (they would only pickle
    batches); on the CPU the loop runs within `runtime.cpu_thread_budget(device, 0, processes,
    cpu_threads)`, like every other loop (`ComputeSettings.cpu_threads` for an explicit count).
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
    with cpu_thread_budget(device, 0, processes, cpu_threads):
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
    sets (the pipeline keeps only each row's top classes: `predictions.dl_network_top_classes`)."""
    device = next(network.parameters()).device
    chunks = [torch.softmax(network(features[i : i + chunk_size].float().to(device)), dim=-1).cpu()
              for i in range(0, features.shape[0], chunk_size)]
    return torch.cat(chunks)


SELECTION_SCHEMA = {"image_id": pl.String, "path": pl.String, "selected": pl.Boolean, "pseudo_label": pl.Int64,
                    "class_name": pl.String, "score": pl.Float32}


def selection_frame(train_ids: Sequence[str], paths: Mapping[str, str], selection: PseudoLabelSelection,
                    classes: Sequence[str]) -> pl.DataFrame:
    """The selection as a table: one row per candidate image (row order = selection indices), label
    columns null unless selected; `selection_from_frame` reads it back."""
    chosen = {row: (label, score) for row, label, score in
              zip(selection.indices.tolist(), selection.labels.tolist(), selection.scores.tolist())}
    return pl.DataFrame({
        "image_id": list(train_ids),
        "path": [paths[i] for i in train_ids],
        "selected": [row in chosen for row in range(len(train_ids))],
        "pseudo_label": [chosen[row][0] if row in chosen else None for row in range(len(train_ids))],
        "class_name": [classes[chosen[row][0]] if row in chosen else None for row in range(len(train_ids))],
        "score": [chosen[row][1] if row in chosen else None for row in range(len(train_ids))],
    }, schema=SELECTION_SCHEMA)


def selection_from_frame(frame: pl.DataFrame, k: int, num_classes: int) -> PseudoLabelSelection:
    """The `PseudoLabelSelection` a `selection_frame` was written from (fallback choices are not stored)."""
    rows = frame.with_row_index("row").filter(pl.col("selected"))
    return PseudoLabelSelection(
        indices=torch.tensor(rows["row"].to_list(), dtype=torch.long),
        labels=torch.tensor(rows["pseudo_label"].to_list(), dtype=torch.long),
        scores=torch.tensor(rows["score"].to_list(), dtype=torch.float32),
        k=k,
        num_classes=num_classes,
    )
