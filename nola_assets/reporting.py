"""Metadata for the UI: markdown and Dagster tables, and small PNG plots (matplotlib, Agg backend).

Metadata stays small whatever the number of classes: the class-similarity heatmap shows at most
`HEATMAP_CLASSES` classes, bar charts have a bounded width, per-class tables at most
`TABLE_CLASSES` rows.
"""

from __future__ import annotations

import base64
import io
from typing import Mapping, Sequence

import matplotlib
import numpy as np
import polars as pl
import torch

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema  # noqa: E402

from nola_core.eval import SPLITS, split_column, stage_table_rows  # noqa: E402


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


TABLE_CLASSES = 1000  # rows of a per-class table: above this many classes, the ones the table ranks first


def per_class_table(columns: Mapping[str, Sequence[object]], rank: Sequence[float] | None = None,
                    ranked_by: str = "the first classes", limit: int = TABLE_CLASSES) -> MetadataValue:
    """One row per class as a Dagster table (sortable in the UI, compact in the event log).

    With more than `limit` classes, only the `limit` with the highest `rank` (`ranked_by` says what
    it is; default: the first classes) are kept, in class order, and the first column's description
    says so: the metadata stays bounded whatever the class count, like the heatmap.
    """
    total = len(next(iter(columns.values()), []))
    rows = list(range(total))
    description = None
    if total > limit:
        order = sorted(rows, key=lambda row: -rank[row]) if rank is not None else rows
        rows = sorted(order[:limit])
        description = f"{limit} of {total} classes shown: {ranked_by}"
    kinds = {str: "string", int: "int", float: "float", bool: "bool"}
    schema = TableSchema(columns=[
        TableColumn(name, kinds.get(type(values[0]), "string") if total else "string",
                    description=description if position == 0 else None)
        for position, (name, values) in enumerate(columns.items())])
    return MetadataValue.table([TableRecord({name: values[row] for name, values in columns.items()})
                                for row in rows], schema=schema)


def stage_table_markdown(stages: pl.DataFrame, note: str | None = None) -> str:
    """The stage table of `nola_core.eval.format_stage_table` (`evaluate_stages`' rows), as markdown:
    top-1 and mean per-class accuracy on each named split."""
    header, rows, legend = stage_table_rows(stages)
    table = f"{markdown_table(header, rows)}\n\n{legend}"
    return f"{table}\n\n**{note}**" if note else table


def evaluation_metadata(frame: pl.DataFrame) -> dict:
    """Every stage's accuracy on each named split (where labels exist) and pseudo-label figures,
    for the UI: the stage table of `nola_core.eval.stage_table_rows` with the method in front."""
    header, rows, legend = stage_table_rows(frame)
    table = markdown_table(["method", *header], [[m, *row] for m, row in zip(frame["method"], rows)])
    metadata = {"stages": MetadataValue.md(f"{table}\n\n{legend}")}
    for row in frame.iter_rows(named=True):
        for split in SPLITS:
            if row[split_column(split, "top1")] is not None:
                metadata[f"top1/{split}/{row['method']}/{row['stage']}"] = float(row[split_column(split, "top1")])
    return metadata


HEATMAP_CLASSES = 50  # classes drawn in the class-similarity heatmap: the most confused ones
MAX_TICK_LABELS = 60  # above this many bars or classes, ticks are not labelled (they could not be read)
MAX_FIGURE_INCHES = 24.0


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, ylabel: str) -> bytes:
    figure, axis = plt.subplots(figsize=(min(MAX_FIGURE_INCHES, max(4.0, 0.5 * len(labels) + 2)), 3.2))
    axis.bar(range(len(labels)), values, color="#4c72b0")
    if len(labels) <= MAX_TICK_LABELS:
        axis.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 6 else 0, ha="right")
    axis.set_title(title)
    axis.set_ylabel(ylabel)
    return _png(figure)


def line_chart(series: Mapping[str, Sequence[float]], title: str, xlabel: str) -> bytes:
    figure, axis = plt.subplots(figsize=(5, 3.2))
    for name, values in series.items():
        axis.plot(range(1, len(values) + 1), values, marker="o" if len(values) < 30 else None, label=name)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.legend()
    return _png(figure)


def scatter_2d(points, colours: Sequence[int] | None, title: str) -> bytes:
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.scatter(points[:, 0], points[:, 1], c=colours, s=8, cmap="tab10" if colours is not None else None)
    axis.set_title(title)
    axis.set_xticks([])
    axis.set_yticks([])
    return _png(figure)


def pca_2d(features: torch.Tensor) -> np.ndarray:
    """The rows of `features` projected on their first two principal components, for `scatter_2d`."""
    x = features.float()
    x = x - x.mean(dim=0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return (x @ v[:2].T).numpy()


def most_confused(similarity: np.ndarray, top: int = HEATMAP_CLASSES) -> np.ndarray:
    """Indices of the `top` classes whose nearest other class is most similar, most confused first."""
    others = np.array(similarity, dtype=np.float64, copy=True)
    np.fill_diagonal(others, -np.inf)
    return np.argsort(-others.max(axis=1), kind="stable")[:top]


def class_similarity_heatmap(similarity: np.ndarray, classes: Sequence[str], title: str,
                             top: int = HEATMAP_CLASSES) -> bytes:
    """The heatmap of the `top` most confused classes only: its size does not grow with the class count."""
    keep = most_confused(similarity, top)
    shown = f"{len(keep)} most confused of {len(classes)} classes" if len(keep) < len(classes) else f"{len(classes)} classes"
    return heatmap(np.asarray(similarity)[np.ix_(keep, keep)], [classes[i] for i in keep], f"{title}\n({shown})")


def heatmap(matrix, labels: Sequence[str], title: str) -> bytes:
    figure, axis = plt.subplots(figsize=(min(MAX_FIGURE_INCHES, max(3.5, 0.3 * len(labels) + 2)),) * 2)
    image = axis.imshow(matrix, cmap="viridis")
    if len(labels) <= MAX_TICK_LABELS:
        axis.set_xticks(range(len(labels)), labels, rotation=90)
        axis.set_yticks(range(len(labels)), labels)
    figure.colorbar(image, ax=axis, fraction=0.046)
    axis.set_title(title)
    return _png(figure)


def _png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def png_markdown(png: bytes, alt: str) -> MetadataValue:
    """An inline image the Dagster UI renders in the asset's metadata."""
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})")
