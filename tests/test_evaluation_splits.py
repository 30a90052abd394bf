"""Accuracy on two named splits, never blended: transductive (labelled copies of the images adapted
on) and held-out (labelled images never adapted on), computed once by `nola_core.eval.evaluate_stages`
and read by every table: NoLA's stage table, the methods' evaluation frame, the UI markdown and the
tuned-vs-zero-shot judgements (held-out where it exists, else transductive, named).

The controlled dataset: three classes, adaptation images u0..u6 (u6's label unknown) and held-out
images h0..h3. The tuned stage is right on 5 of the 6 known adaptation images and on 1 of the 4
held-out ones; zero-shot the other way round. The expected figures are counted here by hand from
the predictions, independently of the code under test.
"""

from __future__ import annotations

import re

import polars as pl
import pytest
import torch

from nola_core.eval import HELD_OUT, TRANSDUCTIVE, EvaluationLabels, evaluate_stages, split_column
from nola_core.methods import EVALUATION_SCHEMA, MethodRun, PseudoLabels, StageOutput, evaluate_run
from nola_core.methods.nola import NolaResult, nola_stage_outputs
from nola_core.stage_names import (
    CDE_STAGE,
    NOLA_DL_STAGE,
    NOLA_SELECTION_STAGE,
    NOLA_TEMPLATES_STAGE,
    NOLA_TUNED_STAGE,
    ZERO_SHOT_STAGE,
)
from nola_core.predictions import TopClasses

CLASSES = ["a", "b", "c"]
ADAPTED = ("u0", "u1", "u2", "u3", "u4", "u5", "u6")
HELD = ("h0", "h1", "h2", "h3")
IDS = ADAPTED + HELD
TRUTH = {"u0": 0, "u1": 1, "u2": 2, "u3": 0, "u4": 1, "u5": 2, "h0": 0, "h1": 1, "h2": 2, "h3": 0}
# Tuned: right on u0..u4, wrong on u5 (says 0); right on h0 only. u6 (unknown label) says 1.
TUNED = {"u0": 0, "u1": 1, "u2": 2, "u3": 0, "u4": 1, "u5": 0, "u6": 1, "h0": 0, "h1": 2, "h2": 0, "h3": 1}
# Zero-shot: wrong on every adaptation image, right on every held-out one.
ZERO_SHOT = {i: (TRUTH[i] + 1) % 3 if i in TRUTH and i.startswith("u") else TRUTH.get(i, 0) for i in IDS}


def _probabilities(predicted: dict[str, int]) -> torch.Tensor:
    """[len(IDS), 3] rows whose argmax is `predicted[id]`."""
    rows = torch.full((len(IDS), 3), 0.1)
    rows[torch.arange(len(IDS)), torch.tensor([predicted[i] for i in IDS])] = 0.8
    return rows


def _accuracy(predicted: dict[str, int], ids) -> float:
    """Counted by hand: the share of `ids` whose prediction equals the truth."""
    return sum(predicted[i] == TRUTH[i] for i in ids) / len(ids)


def _mean_per_class(predicted: dict[str, int], ids) -> float:
    present = sorted({TRUTH[i] for i in ids})
    return sum(_accuracy(predicted, [i for i in ids if TRUTH[i] == c]) for c in present) / len(present)


KNOWN_ADAPTED = [i for i in ADAPTED if i in TRUTH]
ALL_LABELS = EvaluationLabels(TRUTH, frozenset(HELD))
NO_HELD_OUT = EvaluationLabels({i: TRUTH[i] for i in KNOWN_ADAPTED}, frozenset())
NO_LABELS = EvaluationLabels({}, frozenset())
SELECTION = PseudoLabels(("u0", "u1", "u6"), torch.tensor([0, 2, 1]), len(ADAPTED))  # u1 wrong, u6 unknown


def _stages(probabilities=_probabilities) -> list[StageOutput]:
    return [
        StageOutput("selection", IDS, None, SELECTION),
        StageOutput("zero-shot", IDS, probabilities(ZERO_SHOT)),
        StageOutput("tuned", IDS, probabilities(TUNED), final=True),
    ]


def test_the_splits_are_scored_apart_and_differ_where_they_must():
    frame = evaluate_stages(_stages(), CLASSES, ALL_LABELS)
    tuned = frame.filter(pl.col("stage") == "tuned").row(0, named=True)
    assert tuned["transductive_n"] == 6 and tuned["held_out_n"] == 4
    assert tuned["transductive_top1"] == pytest.approx(_accuracy(TUNED, KNOWN_ADAPTED)) == pytest.approx(5 / 6)
    assert tuned["held_out_top1"] == pytest.approx(_accuracy(TUNED, HELD)) == pytest.approx(1 / 4)
    blend = _accuracy(TUNED, KNOWN_ADAPTED + list(HELD))  # what scoring every labelled image gives: 0.6
    assert blend not in (pytest.approx(tuned["transductive_top1"]), pytest.approx(tuned["held_out_top1"]))
    assert tuned["transductive_mean_per_class"] == pytest.approx(_mean_per_class(TUNED, KNOWN_ADAPTED))
    assert tuned["held_out_mean_per_class"] == pytest.approx(_mean_per_class(TUNED, HELD))
    assert tuned["held_out_per_class"] == [{"class_name": "a", "accuracy": 0.5, "n": 2},
                                           {"class_name": "b", "accuracy": 0.0, "n": 1},
                                           {"class_name": "c", "accuracy": 0.0, "n": 1}]
    zero_shot = frame.filter(pl.col("stage") == "zero-shot").row(0, named=True)
    assert (zero_shot["transductive_top1"], zero_shot["held_out_top1"]) == (0.0, 1.0)
    # Pseudo-label precision is on the adaptation images whose label is known: u0 right, u1 wrong.
    selection = frame.filter(pl.col("stage") == "selection").row(0, named=True)
    assert selection["pseudo_labels_known"] == 2 and selection["pseudo_label_precision"] == 0.5
    assert selection["transductive_top1"] is None and selection["held_out_top1"] is None
    # Only each row's top class is read: TopClasses give the same table as full probabilities.
    assert evaluate_stages(_stages(lambda p: TopClasses.of(_probabilities(p))), CLASSES, ALL_LABELS).equals(frame)


def test_without_held_out_images_held_out_is_absent_not_zero():
    tuned = evaluate_stages(_stages(), CLASSES, NO_HELD_OUT).filter(pl.col("stage") == "tuned").row(0, named=True)
    assert tuned["held_out_n"] == 0
    assert tuned["held_out_top1"] is None and tuned["held_out_mean_per_class"] is None
    assert tuned["held_out_per_class"] is None
    assert tuned["transductive_n"] == 6 and tuned["transductive_top1"] == pytest.approx(5 / 6)


def test_without_labels_neither_split_is_reported():
    frame = evaluate_stages(_stages(), CLASSES, NO_LABELS)
    for split in (TRANSDUCTIVE, HELD_OUT):
        assert frame[split_column(split, "n")].to_list() == [0, 0, 0]
        assert frame[split_column(split, "top1")].null_count() == 3
        assert frame[split_column(split, "mean_per_class")].null_count() == 3
    assert frame["pseudo_label_precision"].null_count() == 3


def test_the_methods_frame_carries_both_splits():
    run = MethodRun("toy", 7, _stages())
    frame = evaluate_run(run, dataset="d", classes=CLASSES, unlabeled_ids=ADAPTED, labels=ALL_LABELS)
    assert frame.schema == pl.Schema(EVALUATION_SCHEMA)
    assert {"transductive_top1", "held_out_top1", "transductive_n", "held_out_n"} <= set(frame.columns)
    final = frame.filter(pl.col("final")).row(0, named=True)
    assert (final["dataset"], final["method"], final["seed"], final["n_unlabeled"]) == ("d", "toy", 7, 7)
    assert final["transductive_top1"] == pytest.approx(_accuracy(TUNED, KNOWN_ADAPTED))
    assert final["held_out_top1"] == pytest.approx(_accuracy(TUNED, HELD))


def _nola_result(labels: EvaluationLabels) -> NolaResult:
    """A `NolaResult` whose stages come from NoLA's stage outputs on the controlled predictions."""
    predictions = {ZERO_SHOT_STAGE: ZERO_SHOT, CDE_STAGE: ZERO_SHOT, NOLA_DL_STAGE: TUNED, NOLA_TUNED_STAGE: TUNED,
                   NOLA_TEMPLATES_STAGE: ZERO_SHOT}
    top = {stage: TopClasses.of(_probabilities(predicted)) for stage, predicted in predictions.items()}
    stages = evaluate_stages(nola_stage_outputs(top, IDS, SELECTION, ADAPTED), CLASSES, labels)
    empty = dict.fromkeys(["spec", "manifest", "zero_shot", "cde", "selection", "selection_report", "dl_network",
                           "classifier", "history", "predictions"])
    return NolaResult(**empty, stages=stages, random_models=False, text_checks={})


def _table_cells(text: str) -> dict[str, dict[str, str]]:
    """stage → column header → cell, from the plain-text stage table (columns apart by 2+ spaces)."""
    lines = text.splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[2:] if len(re.split(r"\s{2,}", line.strip())) == len(header)]
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_nola_stage_table_shows_both_splits_named():
    result = _nola_result(ALL_LABELS)
    assert result.stages["stage"].to_list() == [NOLA_SELECTION_STAGE, ZERO_SHOT_STAGE, CDE_STAGE, NOLA_DL_STAGE,
                                                NOLA_TUNED_STAGE, NOLA_TEMPLATES_STAGE]
    text = result.stage_table()
    cells = _table_cells(text)
    tuned = cells[f"{NOLA_TUNED_STAGE} (final)"]
    assert tuned["transductive top-1"] == f"{100 * _accuracy(TUNED, KNOWN_ADAPTED):.1f}%" == "83.3%"
    assert tuned["held-out top-1"] == f"{100 * _accuracy(TUNED, HELD):.1f}%" == "25.0%"
    assert cells[ZERO_SHOT_STAGE]["transductive top-1"] == "0.0%"
    assert cells[ZERO_SHOT_STAGE]["held-out top-1"] == "100.0%"
    assert cells[NOLA_SELECTION_STAGE]["pseudo-label prec."] == "50.0%"
    assert "transductive: 6 labelled copies of the unlabeled images adapted on" in text
    assert "held-out: 4 labelled images never seen in adaptation" in text
    assert "pseudo-label precision: on the adaptation images" in text
    # Without held-out images the held-out column says "-", not 0.
    cells = _table_cells(_nola_result(NO_HELD_OUT).stage_table())
    assert cells[f"{NOLA_TUNED_STAGE} (final)"]["held-out top-1"] == "-"


def test_markdown_stage_table_names_both_splits():
    from nola_assets.reporting import stage_table_markdown

    markdown = stage_table_markdown(_nola_result(ALL_LABELS).stages)
    assert markdown.splitlines()[0] == ("| stage | pseudo-label prec. | pseudo-label cov. | transductive top-1 | "
                                        "held-out top-1 | transductive mean/class | held-out mean/class |")
    tuned = [line for line in markdown.splitlines() if line.startswith(f"| {NOLA_TUNED_STAGE} (final) |")]
    assert tuned and tuned[0].split(" | ")[3:5] == ["83.3%", "25.0%"]


def _nola_evaluation(labels: EvaluationLabels) -> pl.DataFrame:
    """The `evaluation` asset's table (EVALUATION_SCHEMA rows) for the controlled predictions."""
    from nola_core.methods.evaluation import method_rows

    return method_rows(_nola_result(labels).stages, dataset="d", method="nola", seed=0, n_unlabeled=len(ADAPTED),
                       random_models=False)


def test_tuned_vs_zero_shot_uses_held_out_else_transductive_and_says_which():
    from nola_assets.checks import tuned_vs_zero_shot_result
    from nola_assets.export_assets import forgetting_guard

    # Held-out exists: tuned 25 % < zero-shot 100 % there (although tuned wins transductively).
    held_out = tuned_vs_zero_shot_result(_nola_evaluation(ALL_LABELS))
    assert not held_out.passed and held_out.metadata["split"].value == HELD_OUT
    assert held_out.metadata["tuned_top1"].value == pytest.approx(_accuracy(TUNED, HELD))
    assert held_out.metadata["zero_shot_top1"].value == pytest.approx(_accuracy(ZERO_SHOT, HELD))
    assert held_out.metadata["images"].value == 4 and "held-out split (4 images)" in held_out.description
    # No held-out images: the transductive split, where tuned (5/6) beats zero-shot (0).
    transductive = tuned_vs_zero_shot_result(_nola_evaluation(NO_HELD_OUT))
    assert transductive.passed and transductive.metadata["split"].value == TRANSDUCTIVE
    assert transductive.metadata["tuned_top1"].value == pytest.approx(_accuracy(TUNED, KNOWN_ADAPTED))
    unlabelled = tuned_vs_zero_shot_result(_nola_evaluation(NO_LABELS))
    assert unlabelled.passed and unlabelled.metadata["split"].value == "none"

    # The export's forgetting guard (tuned encoder + templates vs zero-shot) reads the same rule.
    guard = forgetting_guard(_nola_evaluation(ALL_LABELS))
    assert guard["split"] == HELD_OUT and guard["delta"] == pytest.approx(0.0)  # both follow ZERO_SHOT
    assert forgetting_guard(_nola_evaluation(NO_LABELS))["delta"] is None
