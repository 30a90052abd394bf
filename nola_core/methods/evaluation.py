"""Metrics of every method and stage as one polars table, stored as parquet per dataset.

This is the only module of `nola_core.methods` that reads ground-truth labels, and it only
reads them to report: it takes finished `MethodRun`s and never returns anything a method
could train on or select by.

Where accuracy is measured: on the labelled images that are not among the unlabeled training
images ("held-out") when there are any, else on the labelled copies of training images
("transductive"); `eval_split` says which. Pseudo-label precision is measured on the unlabeled
images whose label is known (a labelled copy with the same content).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import polars as pl
import torch

from nola_core.data import Manifest
from nola_core.methods.common import MethodRun, StageOutput
from nola_core.predictions import predicted_classes

PER_CLASS_TYPE = pl.List(pl.Struct({"class_name": pl.String, "accuracy": pl.Float64, "n": pl.Int64}))

EVALUATION_SCHEMA: dict[str, pl.DataType] = {
    "dataset": pl.String,
    "method": pl.String,
    "stage": pl.String,
    "seed": pl.Int64,  # null for deterministic methods (zero-shot, CDE)
    "final": pl.Boolean,  # the method's answer; the report ranks these rows
    "eval_split": pl.String,  # held-out | transductive | none
    "n_eval": pl.Int64,
    "top1": pl.Float64,
    "mean_per_class": pl.Float64,
    "per_class": PER_CLASS_TYPE,
    "pseudo_labelled": pl.Int64,  # unlabeled images the stage labelled
    "pseudo_label_coverage": pl.Float64,  # pseudo_labelled / unlabeled candidates
    "pseudo_label_class_coverage": pl.Float64,  # classes with at least one pseudo-label / C
    "pseudo_labels_known": pl.Int64,  # pseudo-labelled images whose true label is known
    "pseudo_label_precision": pl.Float64,
    "n_unlabeled": pl.Int64,
    "random_models": pl.Boolean,  # tiny/random weights: the numbers say nothing about the method
}


@dataclass(frozen=True)
class EvaluationLabels:
    """Ground truth for reporting: image id → class index, and which ids are held out."""

    by_id: Mapping[str, int]
    held_out: frozenset[str]

    @classmethod
    def from_manifests(cls, unlabeled: Manifest, labeled: Manifest | None) -> "EvaluationLabels":
        if labeled is None:
            return cls({}, frozenset())
        by_id = {r.image_id: r.label for r in labeled.records if r.label is not None}
        return cls(by_id, frozenset(set(by_id) - set(unlabeled.ids)))


def empty_evaluation() -> pl.DataFrame:
    return pl.DataFrame(schema=EVALUATION_SCHEMA)


def evaluate_run(
    run: MethodRun,
    *,
    dataset: str,
    classes: Sequence[str],
    unlabeled_ids: Sequence[str],
    labels: EvaluationLabels,
    random_models: bool = False,
) -> pl.DataFrame:
    """One row per stage of `run`, in the order of `EVALUATION_SCHEMA`."""
    rows = [
        _stage_row(stage, run, dataset, classes, unlabeled_ids, labels, random_models) for stage in run.stages
    ]
    return pl.DataFrame(rows, schema=EVALUATION_SCHEMA, orient="row") if rows else empty_evaluation()


def evaluate_runs(runs: Iterable[MethodRun], **kwargs) -> pl.DataFrame:
    frames = [evaluate_run(run, **kwargs) for run in runs]
    return pl.concat(frames) if frames else empty_evaluation()


def _stage_row(
    stage: StageOutput,
    run: MethodRun,
    dataset: str,
    classes: Sequence[str],
    unlabeled_ids: Sequence[str],
    labels: EvaluationLabels,
    random_models: bool,
) -> tuple:
    eval_split, n_eval, top1, mean_per_class, per_class = "none", 0, None, None, None
    if stage.probabilities is not None and labels.by_id:
        in_stage = set(stage.ids)
        held_out = [i for i in stage.ids if i in labels.held_out]
        transductive = [i for i in stage.ids if i in labels.by_id and i not in labels.held_out]
        eval_ids, eval_split = (held_out, "held-out") if held_out else (transductive, "transductive")
        eval_ids = [i for i in eval_ids if i in in_stage]
        if eval_ids:
            row = {image_id: r for r, image_id in enumerate(stage.ids)}
            predicted = predicted_classes(stage.probabilities)[[row[i] for i in eval_ids]]
            truth = torch.tensor([labels.by_id[i] for i in eval_ids])
            n_eval, top1, mean_per_class, per_class = len(eval_ids), *_accuracies(predicted, truth, classes)
        else:
            eval_split = "none"
    pseudo = stage.pseudo_labels
    pl_count = pl_coverage = pl_class_coverage = pl_known = pl_precision = None
    if pseudo is not None:
        pl_count = len(pseudo.ids)
        pl_coverage = pl_count / pseudo.candidates if pseudo.candidates else None
        present = torch.unique(pseudo.labels).numel() if pl_count else 0
        pl_class_coverage = present / len(classes)
        pairs = [(labels.by_id[i], int(c)) for i, c in zip(pseudo.ids, pseudo.labels.tolist()) if i in labels.by_id]
        pl_known = len(pairs)
        pl_precision = sum(t == p for t, p in pairs) / len(pairs) if pairs else None
    return (
        dataset, run.method, stage.stage, run.seed, stage.final, eval_split, n_eval, top1, mean_per_class,
        per_class, pl_count, pl_coverage, pl_class_coverage, pl_known, pl_precision, len(unlabeled_ids),
        random_models,
    )


def _accuracies(predicted: torch.Tensor, truth: torch.Tensor, classes: Sequence[str]):
    """(top-1, mean per-class accuracy over classes present, per-class rows)."""
    correct = (predicted == truth).double()
    per_class = []
    for index, name in enumerate(classes):
        mask = truth == index
        n = int(mask.sum())
        per_class.append({"class_name": name, "accuracy": float(correct[mask].mean()) if n else None, "n": n})
    present = [row["accuracy"] for row in per_class if row["n"]]
    return float(correct.mean()), sum(present) / len(present), per_class


def evaluation_path(root: str | Path, dataset: str, name: str = "evaluation") -> Path:
    """Where one dataset's evaluation table lives: <root>/<dataset>/<name>.parquet."""
    return Path(root) / _safe(dataset) / f"{_safe(name)}.parquet"


def write_evaluation(frame: pl.DataFrame, root: str | Path, name: str = "evaluation") -> list[Path]:
    """One parquet file per dataset in `frame` (atomically replaced); returns the paths.

    Several writers (one Dagster asset per method) use distinct `name`s under the same
    dataset folder; the report reads every parquet file under `root`.
    """
    missing = set(EVALUATION_SCHEMA) - set(frame.columns)
    if missing:
        raise ValueError(f"evaluation table lacks columns {sorted(missing)}")
    paths = []
    for (dataset,), part in frame.group_by(["dataset"], maintain_order=True):
        path = evaluation_path(root, dataset, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        part.select(list(EVALUATION_SCHEMA)).write_parquet(temporary)
        os.replace(temporary, path)
        paths.append(path)
    return paths


def _safe(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._")
    if not cleaned:
        raise ValueError(f"{name!r} gives no usable file name")
    return cleaned
