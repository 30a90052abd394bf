"""Class predictions streamed over feature tables: each row's top classes, chunk by chunk.

At 1.3 M images × 1000 classes one float32 probability matrix is 5.2 GB, and the evaluation
scores five stages. Yet every consumer reads only each row's most probable class and its
probability (the prediction table, accuracy, argmax pseudo-labels). So a stage here scores one
chunk of rows at a time (features read from a float16, possibly memory-mapped table and cast to
float32 chunk by chunk), keeps the chunk's `TopClasses` and drops the rest: memory is
O(N·k + chunk·(C + D)), never N × C, never a float32 copy of a whole table.

Row for row, the result is what the full [N, C] matrix gives: the same probabilities, and for
k = 1 the same index (`max`, like `argmax`, keeps the first of tied classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from nola_core.features import FeatureTable, table_rows

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
