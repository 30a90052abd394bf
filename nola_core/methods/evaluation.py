"""Metrics of every method and stage as one polars table, stored as parquet per dataset.

The metrics are `nola_core.eval.evaluate_stages`' (accuracy on the transductive and the
held-out split, separately, and pseudo-label quality); this module adds which dataset, method
and seed a row belongs to, and stores the table. It takes finished `MethodRun`s and never
returns anything a method could train on or select by.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import polars as pl

from nola_core.eval import STAGE_SCHEMA, EvaluationLabels, evaluate_stages
from nola_core.methods.common import MethodRun

EVALUATION_SCHEMA: dict[str, pl.DataType] = {
    "dataset": pl.String,
    "method": pl.String,
    "seed": pl.Int64,  # null for deterministic methods (zero-shot, CDE)
    **STAGE_SCHEMA,
    "n_unlabeled": pl.Int64,
    "random_models": pl.Boolean,  # tiny/random weights: the numbers say nothing about the method
}


def empty_evaluation() -> pl.DataFrame:
    return pl.DataFrame(schema=EVALUATION_SCHEMA)


def method_rows(
    stages: pl.DataFrame, *, dataset: str, method: str, seed: int | None, n_unlabeled: int, random_models: bool
) -> pl.DataFrame:
    """`evaluate_stages`' table as rows of `EVALUATION_SCHEMA`: whose run each stage belongs to."""
    return stages.with_columns(
        pl.lit(dataset, pl.String).alias("dataset"), pl.lit(method, pl.String).alias("method"),
        pl.lit(seed, pl.Int64).alias("seed"), pl.lit(n_unlabeled, pl.Int64).alias("n_unlabeled"),
        pl.lit(random_models, pl.Boolean).alias("random_models"),
    ).select(list(EVALUATION_SCHEMA))


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
    return method_rows(evaluate_stages(run.stages, classes, labels), dataset=dataset, method=run.method,
                       seed=run.seed, n_unlabeled=len(unlabeled_ids), random_models=random_models)


def evaluate_runs(runs: Iterable[MethodRun], **kwargs) -> pl.DataFrame:
    frames = [evaluate_run(run, **kwargs) for run in runs]
    return pl.concat(frames) if frames else empty_evaluation()


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
