"""The one evaluation: every stage's accuracy on two named splits, and its pseudo-label quality.

Labels reach this module only, and only to report: nothing is selected by them.

Accuracy is never a blend of the two splits:

- `TRANSDUCTIVE`: the labelled copies (same content, so the same image id) of the unlabeled images
  the methods adapt on.
- `HELD_OUT`: labelled images that are not among the unlabeled images, never seen in adaptation.
  The reference code of NoLA, LaFTer and LatteCLIP adapts on a dataset's train split and reports
  accuracy on its test split: this split (docs/fidelity.md, "Evaluation").

`evaluate_stages` scores every stage on both splits into one table (`STAGE_SCHEMA`, the number of
images `n` per split; accuracy is null where a split has no image, never 0). The method table
(`nola_core.methods.evaluation`), NoLA's stage table (`methods.nola.NolaResult`), the Dagster
`evaluation` asset, its checks, the CLI and the report all read this table. Pseudo-label
precision is measured on the adaptation images by nature (only they get pseudo-labels), over
those whose label is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import polars as pl
import torch

from nola_core.data import Manifest
from nola_core.predictions import predicted_classes

if TYPE_CHECKING:  # annotations only: the package nola_core.methods imports this module at import time
    from nola_core.methods.common import PseudoLabels, StageOutput

TRANSDUCTIVE = "transductive"
HELD_OUT = "held-out"
SPLITS = (TRANSDUCTIVE, HELD_OUT)
SPLIT_MEANINGS = {
    TRANSDUCTIVE: "labelled copies of the unlabeled images adapted on",
    HELD_OUT: "labelled images never seen in adaptation",
}
PSEUDO_LABEL_MEANING = "pseudo-label precision: on the adaptation images whose label is known"
RANDOM_MODEL_NOTE = (
    "NOTE: these models are randomly initialised (tiny profile or no weights): the accuracy and "
    "precision figures only show that the pipeline runs; they say nothing about the method."
)

PER_CLASS_TYPE = pl.List(pl.Struct({"class_name": pl.String, "accuracy": pl.Float64, "n": pl.Int64}))
ACCURACY_METRICS: dict[str, pl.DataType] = {
    "n": pl.Int64,  # labelled images of the split the stage scored
    "top1": pl.Float64,  # null when n == 0
    "mean_per_class": pl.Float64,  # over the classes present in the split
    "per_class": PER_CLASS_TYPE,
}


def split_column(split: str, metric: str) -> str:
    """The column of `metric` on `split`: transductive_top1, held_out_n, ..."""
    return f"{split.replace('-', '_')}_{metric}"


STAGE_SCHEMA: dict[str, pl.DataType] = {
    "stage": pl.String,
    "final": pl.Boolean,  # the method's answer; the report ranks these rows
    **{split_column(split, metric): dtype for split in SPLITS for metric, dtype in ACCURACY_METRICS.items()},
    "pseudo_labelled": pl.Int64,  # unlabeled images the stage labelled
    "pseudo_label_coverage": pl.Float64,  # pseudo_labelled / unlabeled candidates
    "pseudo_label_class_coverage": pl.Float64,  # classes with at least one pseudo-label / C
    "pseudo_labels_known": pl.Int64,  # pseudo-labelled images whose true label is known
    "pseudo_label_precision": pl.Float64,
}


@dataclass(frozen=True)
class EvaluationLabels:
    """Ground truth for reporting: image id → class index, and which ids are held out."""

    by_id: Mapping[str, int]
    held_out: frozenset[str]

    @classmethod
    def from_manifests(cls, unlabeled: "Manifest", labeled: "Manifest | None") -> "EvaluationLabels":
        if labeled is None:
            return cls({}, frozenset())
        by_id = {r.image_id: r.label for r in labeled.records if r.label is not None}
        return cls(by_id, frozenset(set(by_id) - set(unlabeled.ids)))

    def split_of(self, image_id: str) -> str | None:
        """`HELD_OUT`, `TRANSDUCTIVE`, or None for an image whose label is unknown."""
        if image_id not in self.by_id:
            return None
        return HELD_OUT if image_id in self.held_out else TRANSDUCTIVE


def evaluate_stages(stages: Iterable["StageOutput"], classes: Sequence[str], labels: EvaluationLabels) -> pl.DataFrame:
    """One row per stage (`STAGE_SCHEMA`): accuracy on each split, pseudo-label quality.

    A stage is a `nola_core.methods.common.StageOutput`: its most probable class per row of
    `ids` (None for a stage that only labels), its pseudo-labels, whether it is final.
    """
    rows = []
    for stage in stages:
        row = {"stage": stage.stage, "final": stage.final}
        predicted = predicted_classes(stage.probabilities) if stage.probabilities is not None else None
        for split in SPLITS:
            row.update(_split_accuracy(split, stage.ids, predicted, labels, classes))
        row.update(_pseudo_label_quality(stage.pseudo_labels, labels, len(classes)))
        rows.append(row)
    return pl.DataFrame(rows, schema=STAGE_SCHEMA)


def _split_accuracy(split: str, ids: Sequence[str], predicted: torch.Tensor | None, labels: EvaluationLabels,
                    classes: Sequence[str]) -> dict:
    rows = [r for r, image_id in enumerate(ids) if labels.split_of(image_id) == split] if predicted is not None else []
    values = {"n": len(rows), "top1": None, "mean_per_class": None, "per_class": None}
    if rows:
        truth = torch.tensor([labels.by_id[ids[r]] for r in rows])
        correct = (predicted[torch.tensor(rows)].long().cpu() == truth).double()
        per_class = []
        for index, name in enumerate(classes):
            mask = truth == index
            n = int(mask.sum())
            per_class.append({"class_name": name, "accuracy": float(correct[mask].mean()) if n else None, "n": n})
        present = [row["accuracy"] for row in per_class if row["n"]]
        values.update(top1=float(correct.mean()), mean_per_class=sum(present) / len(present), per_class=per_class)
    return {split_column(split, metric): value for metric, value in values.items()}


def _pseudo_label_quality(pseudo: "PseudoLabels | None", labels: EvaluationLabels, num_classes: int) -> dict:
    if pseudo is None:
        return dict.fromkeys(("pseudo_labelled", "pseudo_label_coverage", "pseudo_label_class_coverage",
                              "pseudo_labels_known", "pseudo_label_precision"))
    count = len(pseudo.ids)
    pairs = [(labels.by_id[i], int(c)) for i, c in zip(pseudo.ids, pseudo.labels.tolist()) if i in labels.by_id]
    return {
        "pseudo_labelled": count,
        "pseudo_label_coverage": count / pseudo.candidates if pseudo.candidates else None,
        "pseudo_label_class_coverage": (torch.unique(pseudo.labels).numel() if count else 0) / num_classes,
        "pseudo_labels_known": len(pairs),
        "pseudo_label_precision": sum(t == p for t, p in pairs) / len(pairs) if pairs else None,
    }


def comparison_split(frame: pl.DataFrame) -> str | None:
    """The split a tuned-vs-baseline judgement reads: held-out where the table has any, else
    transductive, else None (no labels)."""
    for split in (HELD_OUT, TRANSDUCTIVE):
        if frame.height and (frame[split_column(split, "n")].max() or 0) > 0:
            return split
    return None


def stage_value(frame: pl.DataFrame, stage: str, column: str):
    """The `column` (e.g. `split_column(HELD_OUT, "top1")`) of the row of `stage`; None when absent."""
    rows = frame.filter(pl.col("stage") == stage)
    return rows[column][0] if rows.height else None


def split_counts(frame: pl.DataFrame) -> dict[str, int]:
    """Images of each split the stages scored (the largest count over stages)."""
    return {split: int(frame[split_column(split, "n")].max() or 0) for split in SPLITS}


def stage_table_rows(frame: pl.DataFrame) -> tuple[list[str], list[list[str]], str]:
    """(header, rows, legend) of a stage table: pseudo-label precision and coverage, then top-1 and
    mean per-class accuracy on each split, in percent ("-" where there is none)."""
    header = ["stage", "pseudo-label prec.", "pseudo-label cov."]
    header += [f"{split} top-1" for split in SPLITS] + [f"{split} mean/class" for split in SPLITS]
    rows = [
        [row["stage"] + (" (final)" if row["final"] else ""), percent(row["pseudo_label_precision"]),
         percent(row["pseudo_label_coverage"])]
        + [percent(row[split_column(split, "top1")]) for split in SPLITS]
        + [percent(row[split_column(split, "mean_per_class")]) for split in SPLITS]
        for row in frame.iter_rows(named=True)
    ]
    counts = split_counts(frame)
    legend = "; ".join([f"{split}: {counts[split]} {SPLIT_MEANINGS[split]}" for split in SPLITS]
                       + [PSEUDO_LABEL_MEANING])
    return header, rows, legend


def format_stage_table(frame: pl.DataFrame, note: str | None = None) -> str:
    """A plain-text stage table (`stage_table_rows`), the splits named in its header and legend."""
    header, rows, legend = stage_table_rows(frame)
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [line(header), "-" * len(line(header)), *(line(r) for r in rows), legend]
    if note:
        lines.append(note)
    return "\n".join(lines)


def percent(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}%"
