"""Metadata for the UI: markdown tables and small PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import base64
import io
from typing import Mapping, Sequence

import matplotlib
import polars as pl

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from dagster import MetadataValue  # noqa: E402

from nola_core.eval import stage_table_rows  # noqa: E402


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


def stage_table_markdown(stages: pl.DataFrame, note: str | None = None) -> str:
    """The stage table of `nola_core.eval.format_stage_table` (`evaluate_stages`' rows), as markdown:
    top-1 and mean per-class accuracy on each named split."""
    header, rows, legend = stage_table_rows(stages)
    table = f"{markdown_table(header, rows)}\n\n{legend}"
    return f"{table}\n\n**{note}**" if note else table


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, ylabel: str) -> bytes:
    figure, axis = plt.subplots(figsize=(max(4.0, 0.5 * len(labels) + 2), 3.2))
    axis.bar(range(len(labels)), values, color="#4c72b0")
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


def heatmap(matrix, labels: Sequence[str], title: str) -> bytes:
    figure, axis = plt.subplots(figsize=(max(3.5, 0.4 * len(labels) + 2),) * 2)
    image = axis.imshow(matrix, cmap="viridis")
    if len(labels) <= 30:
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
