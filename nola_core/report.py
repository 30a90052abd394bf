"""Which method wins where: a DuckDB view over every evaluation table, and the report of it.

Evaluation tables (`nola_core.methods.evaluation.EVALUATION_SCHEMA`) are parquet files under
one root, one or more per dataset (`write_evaluation`). `connect(root)` opens an in-memory
DuckDB with the view `evaluations` over all of them (new files appear in it without any
registration step); `SUMMARY_SQL` is the one query that ranks the methods on every dataset and
split (`nola_core.eval.SPLITS`: transductive and held-out, never blended) by the mean top-1
accuracy of their final stage over seeds (with the standard deviation where several seeds
exist). `write_report` prints the dataset × split × method table and writes it as markdown and
as a PNG bar chart.

`nola report` reads `default_evaluation_root(its environment)` unless told otherwise: the folder where the
`method_comparison` asset writes one table per dataset and method,
`<artifact root>/evaluation/<dataset>/<method>.parquet`.

The root should hold evaluation tables only: rows of other parquet files lack the
dataset/method/stage keys and are filtered out, but their columns would still be unioned in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import polars as pl

from nola_core.artifact_refs import artifact_root
from nola_core.eval import PSEUDO_LABEL_MEANING, SPLIT_MEANINGS, SPLITS, split_column
from nola_core.storage import is_remote, join

VIEW = "evaluations"
EVALUATION_FOLDER = "evaluation"  # under the artifact root: <artifact root>/evaluation/<dataset>/<method>.parquet
METHOD_ORDER = ("zero-shot", "cde", "lafter", "latteclip", "nola")

# Every row of the view once per split: its accuracy on that split, named in `split`.
SPLIT_ROWS_SQL = "\nUNION ALL\n".join(
    f"SELECT dataset, method, stage, seed, final, random_models, '{split}' AS split, "
    f"{split_column(split, 'n')} AS n, {split_column(split, 'top1')} AS top1, "
    f"{split_column(split, 'mean_per_class')} AS mean_per_class FROM {VIEW}"
    for split in SPLITS
)

# One query: per dataset and split, every method's final-stage top-1 accuracy (mean and sample
# standard deviation over seeds), its rank, and its gap to the best method there. rank = 1 wins.
SUMMARY_SQL = f"""
WITH split_rows AS (
{SPLIT_ROWS_SQL}
), per_seed AS (
    SELECT dataset, split, method, seed,
           avg(top1) AS top1, avg(mean_per_class) AS mean_per_class, max(n) AS images,
           bool_or(random_models) AS random_models
    FROM split_rows
    WHERE final AND top1 IS NOT NULL
    GROUP BY dataset, split, method, seed
), per_method AS (
    SELECT dataset, split, method,
           avg(top1) AS top1_mean, stddev_samp(top1) AS top1_std,
           avg(mean_per_class) AS mean_per_class_mean, stddev_samp(mean_per_class) AS mean_per_class_std,
           count(*) AS seeds, max(images) AS images, bool_or(random_models) AS random_models
    FROM per_seed
    GROUP BY dataset, split, method
)
SELECT dataset, split, method, top1_mean, top1_std, mean_per_class_mean, mean_per_class_std, seeds, images,
       rank() OVER (PARTITION BY dataset, split ORDER BY top1_mean DESC) AS rank,
       top1_mean - max(top1_mean) OVER (PARTITION BY dataset, split) AS gap_to_best,
       random_models
FROM per_method
ORDER BY dataset, split, rank, method
"""

WINNERS_SQL = (f"SELECT dataset, split, method, top1_mean, top1_std, seeds FROM ({SUMMARY_SQL}) WHERE rank = 1 "
               "ORDER BY dataset, split, method")

# Every stage of every method: accuracy on each split and pseudo-label quality, mean (and std) over seeds.
_SPLIT_STAGE_COLUMNS = ",\n       ".join(
    f"avg({split_column(split, 'top1')}) AS {split_column(split, 'top1_mean')}, "
    f"avg({split_column(split, 'mean_per_class')}) AS {split_column(split, 'mean_per_class_mean')}, "
    f"max({split_column(split, 'n')}) AS {split_column(split, 'n')}"
    for split in SPLITS
)
STAGES_SQL = f"""
SELECT dataset, method, stage, bool_or(final) AS final, count(*) AS seeds,
       {_SPLIT_STAGE_COLUMNS},
       avg(pseudo_label_precision) AS pseudo_label_precision_mean,
       stddev_samp(pseudo_label_precision) AS pseudo_label_precision_std,
       avg(pseudo_label_coverage) AS pseudo_label_coverage_mean
FROM {VIEW}
GROUP BY dataset, method, stage
ORDER BY dataset, method, stage
"""

SPLIT_LEGEND = "; ".join(f"{split}: {meaning}" for split, meaning in SPLIT_MEANINGS.items())


def default_evaluation_root(environ: Mapping[str, str]) -> str | Path:
    """NOLA_EVALUATION_ROOT if set in `environ` (the CLI passes its environment), else the artifact
    store's evaluation folder: `$NOLA_ARTIFACT_ROOT/evaluation`, `artifacts/evaluation` (relative to
    the working directory) by default, the same folder `nola demo` and `nola run` write to. A URL
    (`s3://…`) is returned as it is: `nola report` reads its copy in the cache (`storage.local_copy`)."""
    explicit = environ.get("NOLA_EVALUATION_ROOT", "").strip()
    if explicit:
        return explicit if is_remote(explicit) else Path(explicit).resolve()
    return join(artifact_root(environ), EVALUATION_FOLDER)


def connect(root: str | Path):
    """An in-memory DuckDB connection with the view `evaluations` over root/**/*.parquet."""
    import duckdb

    root = Path(root)
    if not any(root.rglob("*.parquet")):
        raise FileNotFoundError(
            f"no evaluation tables (*.parquet) under {root}; write them with "
            "nola_core.methods.write_evaluation or the evaluation assets"
        )
    pattern = (root.resolve() / "**" / "*.parquet").as_posix().replace("'", "''")
    connection = duckdb.connect()
    connection.execute(
        f"CREATE VIEW {VIEW} AS SELECT * FROM read_parquet('{pattern}', union_by_name = true) "
        "WHERE dataset IS NOT NULL AND method IS NOT NULL AND stage IS NOT NULL"
    )
    return connection


def query(root: str | Path, sql: str) -> pl.DataFrame:
    """Run any SQL against the `evaluations` view; the result as polars."""
    connection = connect(root)
    try:
        return connection.sql(sql).pl()
    finally:
        connection.close()


def summary(root: str | Path) -> pl.DataFrame:
    return query(root, SUMMARY_SQL)


def winners(root: str | Path) -> pl.DataFrame:
    return query(root, WINNERS_SQL)


def ordered_methods(methods: Sequence[str]) -> list[str]:
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(set(methods) - set(known))


def dataset_splits(frame: pl.DataFrame) -> list[tuple[str, str]]:
    """The (dataset, split) pairs of `SUMMARY_SQL`'s result, datasets sorted, splits in `SPLITS` order."""
    present = set(frame.select("dataset", "split").iter_rows())
    return [(d, s) for d in sorted(frame["dataset"].unique().to_list()) for s in SPLITS if (d, s) in present]


def method_table(frame: pl.DataFrame) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the dataset × split × method table: the split's labelled images, then per
    method "mean ± std (seeds)" in percent, the winner marked *."""
    methods = ordered_methods(frame["method"].unique().to_list())
    lookup = {(r["dataset"], r["split"], r["method"]): r for r in frame.iter_rows(named=True)}
    images = {}
    for r in frame.iter_rows(named=True):
        images[r["dataset"], r["split"]] = max(images.get((r["dataset"], r["split"]), 0), r["images"])
    rows = [[dataset, split, str(images[dataset, split]),
             *(_cell(lookup.get((dataset, split, method))) for method in methods)]
            for dataset, split in dataset_splits(frame)]
    return ["dataset", "split", "images", *methods], rows


def _cell(record: dict | None) -> str:
    if record is None:
        return "-"
    text = f"{100 * record['top1_mean']:.1f}"
    std = record["top1_std"]
    if record["seeds"] > 1 and std is not None and not math.isnan(std):
        text += f" ± {100 * std:.1f}"
    if record["seeds"] > 1:
        text += f" ({record['seeds']})"
    return f"{text} *" if record["rank"] == 1 else text


def format_text_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 2) -> str:
    """Plain-text table; the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def format_markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Markdown table; the first `left` columns are left-aligned text, the others right-aligned numbers."""
    escape = lambda value: str(value).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, header)) + " |",
             "|" + "|".join(["---"] * left + ["---:"] * (len(header) - left)) + "|"]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines)


RANDOM_NOTE = ("Some results come from randomly initialised models (tiny profile or no weights): "
               "they show the pipeline runs and say nothing about the methods.")


@dataclass(frozen=True)
class Report:
    text: str  # what `nola report` prints
    markdown: Path
    chart: Path
    summary: pl.DataFrame  # SUMMARY_SQL's result
    stages: pl.DataFrame  # STAGES_SQL's result


def write_report(root: str | Path, out: str | Path | None = None) -> Report:
    """Query the evaluations under `root`; write report.md and report.png into `out` (default root)."""
    out = Path(out) if out is not None else Path(root)
    connection = connect(root)
    try:
        ranked = connection.sql(SUMMARY_SQL).pl()
        stages = connection.sql(STAGES_SQL).pl()
    finally:
        connection.close()
    if ranked.is_empty():
        raise ValueError(f"the evaluation tables under {root} hold no final-stage accuracy (no labelled images?)")
    header, rows = method_table(ranked)
    random_models = bool(ranked["random_models"].any())
    caption = ("Top-1 accuracy (%) of each method's final stage on each dataset and split: mean ± standard "
               "deviation over seeds (number of seeds) where several exist; * marks the best method on the "
               f"dataset and split. {SPLIT_LEGEND}.")
    text = format_text_table(header, rows) + f"\n{SPLIT_LEGEND}"
    if random_models:
        text += "\n" + RANDOM_NOTE
    out.mkdir(parents=True, exist_ok=True)
    chart = out / "report.png"
    _bar_chart(ranked, chart)
    markdown = out / "report.md"
    markdown.write_text(_markdown(header, rows, caption, ranked, stages, random_models), encoding="utf-8")
    return Report(text=text, markdown=markdown, chart=chart, summary=ranked, stages=stages)


def _markdown(header, rows, caption, ranked: pl.DataFrame, stages: pl.DataFrame, random_models: bool) -> str:
    winners = ranked.filter(pl.col("rank") == 1)
    parts = ["# Which method wins where", "", caption, "", format_markdown_table(header, rows, left=2), ""]
    if random_models:
        parts += [f"**{RANDOM_NOTE}**", ""]
    parts += ["## Winners", ""]
    parts += [f"- **{r['dataset']}**, {r['split']}: {r['method']} ({100 * r['top1_mean']:.1f}%)"
              for r in winners.iter_rows(named=True)]
    stage_rows = [
        [r["dataset"], r["method"], r["stage"] + (" (final)" if r["final"] else "")]
        + [_percent(r[split_column(split, "top1_mean")]) for split in SPLITS]
        + [_percent(r[split_column(split, "mean_per_class_mean")]) for split in SPLITS]
        + [_percent(r["pseudo_label_precision_mean"]), _percent(r["pseudo_label_coverage_mean"]), str(r["seeds"])]
        for r in stages.iter_rows(named=True)
    ]
    stage_header = (["dataset", "method", "stage"] + [f"{split} top-1" for split in SPLITS]
                    + [f"{split} mean per class" for split in SPLITS]
                    + ["pseudo-label precision", "pseudo-label coverage", "seeds"])
    parts += ["", "## Every stage", "", format_markdown_table(stage_header, stage_rows, left=3), "",
              f"{SPLIT_LEGEND}; {PSEUDO_LABEL_MEANING}.", ""]
    return "\n".join(parts)


def _percent(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _bar_chart(ranked: pl.DataFrame, path: Path) -> None:
    """Grouped bars: (dataset, split) on the x axis, one bar per method, std over seeds as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = dataset_splits(ranked)
    methods = ordered_methods(ranked["method"].unique().to_list())
    lookup = {(r["dataset"], r["split"], r["method"]): r for r in ranked.iter_rows(named=True)}
    figure = Figure(figsize=(max(6.0, 0.35 * len(groups) * max(1, len(methods)) + 3), 4.0))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    width = 0.8 / max(1, len(methods))
    for m, method in enumerate(methods):
        positions, heights, errors = [], [], []
        for g, (dataset, split) in enumerate(groups):
            record = lookup.get((dataset, split, method))
            if record is None:
                continue
            positions.append(g - 0.4 + width * (m + 0.5))
            heights.append(100 * record["top1_mean"])
            std = record["top1_std"]
            errors.append(0.0 if std is None or math.isnan(std) else 100 * std)
        axis.bar(positions, heights, width, yerr=errors, capsize=2, label=method)
    rotate = len(groups) > 4
    axis.set_xticks(range(len(groups)), [f"{dataset}\n{split}" for dataset, split in groups],
                    rotation=30 if rotate else 0, ha="right" if rotate else "center")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title("Final-stage top-1 accuracy by dataset, split and method")
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
