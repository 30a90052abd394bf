"""Which method wins where: a DuckDB view over every evaluation table, and the report of it.

Evaluation tables (`nola_core.methods.evaluation.EVALUATION_SCHEMA`) are parquet files under
one root, one or more per dataset (`write_evaluation`). `connect(root)` opens an in-memory
DuckDB with the view `evaluations` over all of them (new files appear in it without any
registration step); `SUMMARY_SQL` is the one query that ranks the methods on every dataset
by the mean top-1 accuracy of their final stage over seeds (with the standard deviation
where several seeds exist). `write_report` prints the dataset × method table and writes it as
markdown and as a PNG bar chart.

The root should hold evaluation tables only: rows of other parquet files lack the
dataset/method/stage keys and are filtered out, but their columns would still be unioned in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import polars as pl

VIEW = "evaluations"
METHOD_ORDER = ("zero-shot", "cde", "lafter", "latteclip", "nola")

# One query: per dataset, every method's final-stage top-1 accuracy (mean and sample standard
# deviation over seeds), its rank, and its gap to the best method there. rank = 1 wins.
SUMMARY_SQL = f"""
WITH per_seed AS (
    SELECT dataset, method, seed,
           avg(top1) AS top1, avg(mean_per_class) AS mean_per_class,
           bool_or(random_models) AS random_models
    FROM {VIEW}
    WHERE final AND top1 IS NOT NULL
    GROUP BY dataset, method, seed
), per_method AS (
    SELECT dataset, method,
           avg(top1) AS top1_mean, stddev_samp(top1) AS top1_std,
           avg(mean_per_class) AS mean_per_class_mean, stddev_samp(mean_per_class) AS mean_per_class_std,
           count(*) AS seeds, bool_or(random_models) AS random_models
    FROM per_seed
    GROUP BY dataset, method
)
SELECT dataset, method, top1_mean, top1_std, mean_per_class_mean, mean_per_class_std, seeds,
       rank() OVER (PARTITION BY dataset ORDER BY top1_mean DESC) AS rank,
       top1_mean - max(top1_mean) OVER (PARTITION BY dataset) AS gap_to_best,
       random_models
FROM per_method
ORDER BY dataset, rank, method
"""

WINNERS_SQL = f"SELECT dataset, method, top1_mean, top1_std, seeds FROM ({SUMMARY_SQL}) WHERE rank = 1 ORDER BY dataset, method"

# Every stage of every method: accuracy and pseudo-label quality, mean and std over seeds.
STAGES_SQL = f"""
SELECT dataset, method, stage, bool_or(final) AS final, count(*) AS seeds,
       avg(top1) AS top1_mean, stddev_samp(top1) AS top1_std,
       avg(mean_per_class) AS mean_per_class_mean,
       avg(pseudo_label_precision) AS pseudo_label_precision_mean,
       stddev_samp(pseudo_label_precision) AS pseudo_label_precision_std,
       avg(pseudo_label_coverage) AS pseudo_label_coverage_mean,
       any_value(eval_split) AS eval_split
FROM {VIEW}
GROUP BY dataset, method, stage
ORDER BY dataset, method, stage
"""


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


def method_table(frame: pl.DataFrame) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the dataset × method table: "mean ± std (n)" in percent, winner marked *."""
    methods = ordered_methods(frame["method"].unique().to_list())
    rows = []
    for dataset in sorted(frame["dataset"].unique().to_list()):
        part = {r["method"]: r for r in frame.filter(pl.col("dataset") == dataset).iter_rows(named=True)}
        row = [dataset]
        for method in methods:
            row.append(_cell(part.get(method)))
        rows.append(row)
    return ["dataset", *methods], rows


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


def format_text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
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
    caption = ("Top-1 accuracy (%) of each method's final stage on each dataset: mean ± standard deviation "
               "over seeds (number of seeds) where several exist; * marks the best method on the dataset.")
    text = format_text_table(header, rows)
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
    parts = ["# Which method wins where", "", caption, "", format_markdown_table(header, rows), ""]
    if random_models:
        parts += [f"**{RANDOM_NOTE}**", ""]
    parts += ["## Winners", ""]
    parts += [f"- **{r['dataset']}**: {r['method']} ({100 * r['top1_mean']:.1f}%)" for r in winners.iter_rows(named=True)]
    stage_rows = [
        [r["dataset"], r["method"], r["stage"] + (" (final)" if r["final"] else ""), _percent(r["top1_mean"]),
         _percent(r["mean_per_class_mean"]), _percent(r["pseudo_label_precision_mean"]),
         _percent(r["pseudo_label_coverage_mean"]), str(r["seeds"])]
        for r in stages.iter_rows(named=True)
    ]
    parts += ["", "## Every stage", "",
              format_markdown_table(["dataset", "method", "stage", "top-1", "mean per class",
                                     "pseudo-label precision", "pseudo-label coverage", "seeds"], stage_rows, left=3), ""]
    return "\n".join(parts)


def _percent(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _bar_chart(ranked: pl.DataFrame, path: Path) -> None:
    """Grouped bars: datasets on the x axis, one bar per method, std over seeds as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = sorted(ranked["dataset"].unique().to_list())
    methods = ordered_methods(ranked["method"].unique().to_list())
    lookup = {(r["dataset"], r["method"]): r for r in ranked.iter_rows(named=True)}
    figure = Figure(figsize=(max(6.0, 0.35 * len(datasets) * max(1, len(methods)) + 3), 4.0))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    width = 0.8 / max(1, len(methods))
    for m, method in enumerate(methods):
        positions, heights, errors = [], [], []
        for d, dataset in enumerate(datasets):
            record = lookup.get((dataset, method))
            if record is None:
                continue
            positions.append(d - 0.4 + width * (m + 0.5))
            heights.append(100 * record["top1_mean"])
            std = record["top1_std"]
            errors.append(0.0 if std is None or math.isnan(std) else 100 * std)
        axis.bar(positions, heights, width, yerr=errors, capsize=2, label=method)
    rotate = len(datasets) > 4
    axis.set_xticks(range(len(datasets)), datasets, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title("Final-stage top-1 accuracy by dataset and method")
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
