"""The report on two tiny dataset partitions: one DuckDB view, one SQL query, table, markdown, PNG."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch
from PIL import Image

from nola_core.cli import main
from nola_core.methods import (
    EVALUATION_SCHEMA,
    EvaluationLabels,
    MethodRun,
    PseudoLabels,
    StageOutput,
    evaluate_runs,
    evaluation_path,
    write_evaluation,
)
from nola_core.eval import HELD_OUT as HELD_OUT_SPLIT
from nola_core.eval import TRANSDUCTIVE
from nola_core.report import SUMMARY_SQL, WINNERS_SQL, connect, query, write_report

IDS = tuple(f"u{i}" for i in range(4)) + tuple(f"h{i}" for i in range(10))
HELD_OUT = IDS[4:]
TRUTH = {i: n % 2 for n, i in enumerate(IDS)}


def _probabilities(correct_held_out: int) -> torch.Tensor:
    """Two-class probabilities that get the first `correct_held_out` held-out images right."""
    rows = []
    for n, image_id in enumerate(IDS):
        right = image_id in HELD_OUT[:correct_held_out] or image_id.startswith("u")
        label = TRUTH[image_id] if right else 1 - TRUTH[image_id]
        rows.append([0.9, 0.1] if label == 0 else [0.1, 0.9])
    return torch.tensor(rows)


def _run(method: str, seed: int | None, correct: int, labeller_correct: int | None = None) -> MethodRun:
    stages = []
    if labeller_correct is not None:
        labeller = _probabilities(labeller_correct)
        stages.append(StageOutput("labeller", IDS, labeller, PseudoLabels.argmax(IDS, labeller, IDS[:4])))
    stages.append(StageOutput("final", IDS, _probabilities(correct), final=True))
    return MethodRun(method, seed, stages)


def _partition(dataset: str, runs: list[MethodRun]) -> pl.DataFrame:
    return evaluate_runs(runs, dataset=dataset, classes=["even", "odd"], unlabeled_ids=IDS[:4],
                         labels=EvaluationLabels(TRUTH, frozenset(HELD_OUT)), random_models=False)


@pytest.fixture
def evaluations(tmp_path):
    """Held-out: on alpha NoLA wins (8, 10 of 10 over two seeds) over LaFTer (7, 8) and zero-shot
    (5); on beta zero-shot (9) beats LaFTer (6, one seed). Transductive (u0..u3): every method
    right on all 4, so all tie. Written as a dataset writes them."""
    root = tmp_path / "evaluations"
    alpha = _partition("alpha", [_run("zero-shot", None, 5), _run("lafter", 0, 7, 6), _run("lafter", 1, 8, 6),
                                 _run("nola", 0, 8, 9), _run("nola", 1, 10, 9)])
    beta = _partition("beta", [_run("zero-shot", None, 9), _run("lafter", 0, 6, 4)])
    paths = write_evaluation(alpha, root) + write_evaluation(beta, root, name="lafter")
    assert paths == [evaluation_path(root, "alpha"), evaluation_path(root, "beta", "lafter")]
    assert pl.read_parquet(paths[0]).schema == pl.Schema(EVALUATION_SCHEMA)
    return root


def test_one_query_says_which_method_wins_where(evaluations):
    summary = query(evaluations, SUMMARY_SQL)
    assert set(summary["split"]) == {TRANSDUCTIVE, HELD_OUT_SPLIT}
    transductive = summary.filter(pl.col("split") == TRANSDUCTIVE)
    assert (transductive["top1_mean"] == 1.0).all() and (transductive["rank"] == 1).all()
    assert (transductive["images"] == 4).all()
    held_out = summary.filter(pl.col("split") == HELD_OUT_SPLIT)
    assert (held_out["images"] == 10).all()
    rows = {(r["dataset"], r["method"]): r for r in held_out.iter_rows(named=True)}
    nola = rows[("alpha", "nola")]
    assert nola["rank"] == 1 and nola["seeds"] == 2
    assert math.isclose(nola["top1_mean"], 0.9) and math.isclose(nola["top1_std"], math.sqrt(0.02))
    assert rows[("alpha", "lafter")]["rank"] == 2 and math.isclose(rows[("alpha", "lafter")]["gap_to_best"], -0.15)
    assert rows[("alpha", "zero-shot")]["seeds"] == 1 and rows[("alpha", "zero-shot")]["top1_std"] is None
    assert rows[("beta", "zero-shot")]["rank"] == 1
    winners = query(evaluations, WINNERS_SQL).filter(pl.col("split") == HELD_OUT_SPLIT)
    assert winners.select("dataset", "method").rows() == [("alpha", "nola"), ("beta", "zero-shot")]


def test_the_view_sees_new_files_without_registration(evaluations):
    connection = connect(evaluations)
    try:
        before = connection.execute("SELECT count(DISTINCT dataset) FROM evaluations").fetchone()[0]
        write_evaluation(_partition("gamma", [_run("cde", None, 3)]), evaluations)
        after = connection.execute("SELECT count(DISTINCT dataset) FROM evaluations").fetchone()[0]
    finally:
        connection.close()
    assert (before, after) == (2, 3)


def test_report_writes_the_table_the_markdown_and_the_png(evaluations, tmp_path):
    report = write_report(evaluations, tmp_path / "out")
    lines = report.text.splitlines()
    assert lines[0].split() == ["dataset", "split", "images", "zero-shot", "lafter", "nola"]
    assert lines[2].split() == ["alpha", "transductive", "4", "100.0", "*", "100.0", "±", "0.0", "(2)", "*",
                                "100.0", "±", "0.0", "(2)", "*"]
    assert lines[3].split() == ["alpha", "held-out", "10", "50.0", "75.0", "±", "7.1", "(2)", "90.0", "±", "14.1",
                                "(2)", "*"]
    assert lines[5].split() == ["beta", "held-out", "10", "90.0", "*", "60.0", "-"]
    markdown = report.markdown.read_text()
    assert "| alpha | held-out | 10 | 50.0 | 75.0 ± 7.1 (2) | 90.0 ± 14.1 (2) * |" in markdown
    assert "- **alpha**, held-out: nola (90.0%)" in markdown and "- **beta**, held-out: zero-shot (90.0%)" in markdown
    # Every stage: top-1 transductive / held-out, mean per class transductive / held-out, then
    # pseudo-label precision and coverage: the labellers label u0..u3 all right (truth 0,1,0,1).
    assert "| alpha | lafter | labeller | 100.0 | 60.0 | 100.0 | 60.0 | 100.0 | 100.0 | 2 |" in markdown
    with Image.open(report.chart) as image:
        assert image.format == "PNG" and image.size[0] > 400
    assert "randomly initialised" not in report.text


def test_nola_report_command(evaluations, tmp_path, capsys):
    assert main(["report", "--root", str(evaluations), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines()[0].split() == ["dataset", "split", "images", "zero-shot", "lafter", "nola"]
    assert (tmp_path / "cli" / "report.md").is_file() and (tmp_path / "cli" / "report.png").is_file()
    assert main(["report", "--root", str(tmp_path / "empty")]) == 1
    assert "no evaluation tables" in capsys.readouterr().err
