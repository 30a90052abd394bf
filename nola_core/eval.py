"""Metrics. Labels reach this module only, and only to report: nothing is selected by them."""

from __future__ import annotations

from typing import Sequence

import torch


def accuracy_report(predicted: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict:
    """Top-1 accuracy, mean per-class accuracy and per-class accuracy (classes absent from labels are None)."""
    predicted, labels = predicted.long().cpu(), labels.long().cpu()
    if predicted.shape != labels.shape:
        raise ValueError(f"{predicted.numel()} predictions for {labels.numel()} labels")
    per_class: dict[str, float | None] = {}
    for index, name in enumerate(classes):
        mask = labels == index
        per_class[name] = float((predicted[mask] == index).float().mean()) if mask.any() else None
    present = [value for value in per_class.values() if value is not None]
    return {
        "n": int(labels.numel()),
        "top1": float((predicted == labels).float().mean()) if labels.numel() else float("nan"),
        "mean_per_class": sum(present) / len(present) if present else float("nan"),
        "per_class": per_class,
    }


def format_stage_table(stages: dict[str, dict], note: str | None = None) -> str:
    """A plain-text table: one row per stage with whatever of precision / top-1 / mean per class exists."""
    header = f"{'stage':<24}{'pseudo-label prec.':>20}{'top-1 acc.':>12}{'mean/class':>12}"
    lines = [header, "-" * len(header)]
    for stage, values in stages.items():
        lines.append(
            f"{stage:<24}{_percent(values.get('precision')):>20}"
            f"{_percent(values.get('top1')):>12}{_percent(values.get('mean_per_class')):>12}"
        )
    if note:
        lines.append(note)
    return "\n".join(lines)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
