"""Class predictions streamed over feature tables: each row's top classes, chunk by chunk.

At 1.3 M images × 1000 classes one float32 probability matrix is 5.2 GB, and the evaluation
scores five stages. Yet every consumer reads only each row's most probable class and its
probability (the prediction table, accuracy, argmax pseudo-labels). So a stage here scores one
chunk of rows at a time (features read from a float16, possibly memory-mapped table and cast to
float32 chunk by chunk), keeps the chunk's `TopClasses` and drops the rest: memory is
O(N·k + chunk·(C + D)), never N × C, never a float32 copy of a whole table.

Row for row, the result is what the full [N, C] matrix gives: the same probabilities, and for
k = 1 the same index (`max`, like `argmax`, keeps the first of tied classes).

The scorers every method shares are here too: `cosine_probabilities` (a [C, D] classifier at a
logit scale), `tuned_head_probabilities` (a prompt-tuned model's head on its stored
embeddings) and `dl_network_probabilities` score one chunk of rows; `cosine_top_classes`,
`tuned_head_top_classes` and `dl_network_top_classes` stream them over a table, and
`prediction_table` turns a stage's top classes into one row per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import polars as pl
import torch

from nola_core.data import Manifest
from nola_core.features import FeatureTable, table_rows
from nola_core.models import PromptTunedClassifier

PREDICTION_CHUNK_SIZE = 65536
"""Rows scored at once: at 1000 classes and 768 dims, ~0.5 GB of float32 temporaries."""


@dataclass(frozen=True)
class TopClasses:
    """The k most probable classes of every row, most probable first (rows follow some ids)."""

    indices: torch.Tensor  # [N, k] long
    probabilities: torch.Tensor  # [N, k] float32

    def __post_init__(self) -> None:
        if self.indices.ndim != 2 or self.indices.shape != self.probabilities.shape:
            raise ValueError(f"indices {tuple(self.indices.shape)} and probabilities "
                             f"{tuple(self.probabilities.shape)} must both be [N, k]")

    def __len__(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @property
    def predicted(self) -> torch.Tensor:
        """[N] the most probable class of each row."""
        return self.indices[:, 0]

    @property
    def confidence(self) -> torch.Tensor:
        """[N] its probability."""
        return self.probabilities[:, 0]

    @classmethod
    def of(cls, probabilities: torch.Tensor, k: int = 1) -> "TopClasses":
        """The top k of a [N, C] probability matrix (k is capped at C)."""
        if k == 1:  # `max` returns the first of tied classes, as `argmax` does
            values, indices = probabilities.max(dim=-1, keepdim=True)
        else:
            values, indices = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
        return cls(indices.long().cpu(), values.float().cpu())


def predicted_classes(probabilities: torch.Tensor | TopClasses) -> torch.Tensor:
    """[N] most probable class per row, from full [N, C] probabilities or their `TopClasses`."""
    if isinstance(probabilities, TopClasses):
        return probabilities.predicted
    return probabilities.argmax(dim=-1)


def aligned_chunks(
    table: FeatureTable, ids: Sequence[str], chunk_size: int = PREDICTION_CHUNK_SIZE
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """float32 rows of `table` for `ids`, `chunk_size` ids at a time, with the mask of ids the
    table holds (None when it holds all of them); rows of missing ids are zeros.

    When the table's own ids are `ids` (or a chunk is an ascending run of rows), a chunk is read
    as a slice, so a memory-mapped table is paged in only chunk by chunk.
    """
    ids = tuple(ids)
    aligned = table.ids == ids
    for start in range(0, len(ids), chunk_size):
        if aligned:
            yield table.features[start : start + chunk_size].float(), None
            continue
        rows = table_rows(table, ids[start : start + chunk_size])
        present = rows >= 0
        if bool(present.all()) and bool((rows.diff() == 1).all()):
            yield table.features[int(rows[0]) : int(rows[-1]) + 1].float(), None
            continue
        out = torch.zeros(len(rows), table.features.shape[1])
        if bool(present.any()):
            out[present] = table.features[rows[present]].float()
        yield out, None if bool(present.all()) else present


def top_classes_over_chunks(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    num_rows: int,
    probabilities: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    k: int = 1,
) -> TopClasses:
    """`TopClasses` of `probabilities(features, present)` ([n, C]) for each (features, present)
    chunk, in order, `num_rows` rows in all; only [num_rows, k] is kept (k capped at C)."""
    indices = values = None
    start = 0
    for features, present in chunks:
        with torch.inference_mode():
            top = TopClasses.of(probabilities(features, present), k)
        if indices is None:
            indices = torch.empty(num_rows, top.k, dtype=torch.long)
            values = torch.empty(num_rows, top.k, dtype=torch.float32)
        indices[start : start + len(top)] = top.indices
        values[start : start + len(top)] = top.probabilities
        start += len(top)
    if start != num_rows:
        raise ValueError(f"{start} rows scored, {num_rows} expected")
    if indices is None:
        return TopClasses(torch.empty(0, k, dtype=torch.long), torch.empty(0, k))
    return TopClasses(indices, values)


def streamed_top_classes(
    table: FeatureTable,
    ids: Sequence[str],
    probabilities: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    k: int = 1,
    chunk_size: int = PREDICTION_CHUNK_SIZE,
) -> TopClasses:
    """`TopClasses` for every id of `ids` over `aligned_chunks` of `table`, one chunk at a time."""
    return top_classes_over_chunks(aligned_chunks(table, ids, chunk_size), len(ids), probabilities, k)


def cosine_probabilities(features: torch.Tensor, classifier: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Softmax of scaled cosine logits of a chunk of rows, [n, C] float32 (`cosine_top_classes`
    streams it over a table)."""
    weights = torch.nn.functional.normalize(classifier.float(), dim=-1)
    return torch.softmax(logit_scale * torch.nn.functional.normalize(features.float(), dim=-1) @ weights.T, dim=-1)


def tuned_head_probabilities(classifier: PromptTunedClassifier, features: torch.Tensor) -> torch.Tensor:
    """Softmax of the tuned head on a chunk of `tuned_image_features` embeddings, [n, C] on the
    CPU (`tuned_head_top_classes` streams it over a table): the same logits as the forward."""
    with torch.no_grad():
        return torch.softmax(classifier.logits_from_features(features.to(classifier.head.weight.device)),
                             dim=-1).cpu()


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
