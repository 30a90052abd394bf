"""The whole asset graph materialized on tiny random models: artifacts, metadata, checks, and the
same predictions as `run_nola` for the same configuration."""

import shutil

import polars as pl
import pytest
import torch
from dagster import AssetCheckSeverity, AssetSelection, AssetKey, DagsterInstance, TableMetadataValue, materialize
from safetensors.torch import save_file

from assets_helpers import ALIGNMENT_EPOCHS, FAKE_DESCRIPTIONS, TUNING_EPOCHS, copy_demo, resources_for_test, table_rows
from nola_core.alignment import AlignmentConfig
from nola_core.features import load_feature_table, save_feature_table
from nola_core.models import ModelConfig
from nola_core.eval import STAGE_SCHEMA
from nola_core.methods.nola import NolaConfig, nola_tuning_config, run_nola
from nola_core.predictions import tuned_head_probabilities
from nola_core.stage_names import NOLA_TUNED_STAGE, ZERO_SHOT_STAGE
from nola_assets.artifacts import ArtifactRef
from nola_assets.assets import NOLA_ASSETS, dino_features
from nola_assets.common import (
    CLASSIFIERS_FILE,
    METHOD_EVALUATION_FILE,
    PREDICTIONS_FILE,
    TUNED_FEATURES_FILE,
    tuned_classifier_of,
)
from nola_assets import checks
from nola_assets.checks import NOLA_CHECKS, coverage_result, finite_result, tuned_vs_zero_shot_result
from nola_assets.partitions import DATASETS

DATASET = "fashion_mini"


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph")
    copy_demo(root / "data", DATASET)
    resources = resources_for_test(root / "data", root / "artifacts")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASETS, [DATASET])
    result = materialize([*NOLA_ASSETS, *NOLA_CHECKS], instance=instance, partition_key=DATASET,
                         resources=resources)
    return result, resources["artifacts"], root


def _metadata(result, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(asset)]
    return {key: value.value for key, value in event.materialization.metadata.items()}


def test_every_asset_is_materialized_with_its_artifact(graph):
    result, store, _ = graph
    assert result.success
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert materialized == {a.key.path[-1] for a in NOLA_ASSETS}
    for asset in materialized:
        ref = store.require_ref(asset, DATASET)
        assert (store.root() / DATASET / asset / ref.digest / "key.json").is_file()
        assert ref.path.startswith(str(store.root()))
        assert any(p.suffix in (".parquet", ".safetensors", ".json") and p.name != "key.json"
                   for p in store.root().joinpath(DATASET, asset, ref.digest).iterdir())
    # Keys hold what changes the content.
    features = store.require_ref("dino_features", DATASET)
    assert features.key["model_key"]["model"]["dino_name"] == "nola-tiny-dino"
    descriptions = store.require_ref("class_descriptions", DATASET)
    assert store.require_ref("cde_classifier", DATASET).key["descriptions"] == descriptions.facts["content_hash"]


def test_metadata_counts(graph, folder_labels):
    result, store, root = graph
    manifest = _metadata(result, "dataset_manifest")
    assert manifest["images"] == 120 and manifest["held_out_labelled_images"] == 40
    assert manifest["labelled_copies_of_unlabeled"] == 120
    assert _metadata(result, "dino_features")["computed"] == 160
    assert _metadata(result, "class_descriptions")["descriptions"] == sum(map(len, FAKE_DESCRIPTIONS.values()))

    pseudo = _metadata(result, "cde_pseudo_labels")
    assert pseudo["k"] == 16  # max(16, floor(0.2 * 120 / 4))
    per_class = {row[0]: row[1] for row in table_rows(pseudo["per_class"])}  # class, pseudo-labels, fewer than k
    assert sum(per_class.values()) == pseudo["selected"] <= 16 * 4
    frame = store.read_table(store.require_ref("cde_pseudo_labels", DATASET), "pseudo_labels.parquet")
    assert frame.height == 120 and frame["selected"].sum() == pseudo["selected"]
    # Precision against the class folders on disk, from the stored (image id, class) pairs.
    truth = folder_labels(root / "data" / DATASET)
    chosen = frame.filter(pl.col("selected"))
    right = sum(truth[image_id] == name for image_id, name in zip(chosen["image_id"], chosen["class_name"]))
    assert pseudo["precision"] == pytest.approx(right / chosen.height, abs=1e-9)
    assert per_class == {name: chosen.filter(pl.col("class_name") == name).height for name in per_class}

    assert _metadata(result, "alignment_checkpoint")["epochs"] == ALIGNMENT_EPOCHS
    per_class_tables = {"dataset_manifest": "classes", "class_descriptions": "per_class", "cde_classifier": "per_class",
                        "cde_pseudo_labels": "per_class", "predictions": "per_class"}
    for asset, entry in per_class_tables.items():  # tables, capped (tests/test_metadata_scale.py)
        assert isinstance(_metadata(result, asset)[entry], TableMetadataValue), (asset, entry)
    tuned = _metadata(result, "prompt_tuned_encoder")
    assert tuned["epochs"] == TUNING_EPOCHS and tuned["training_images"] == 120
    assert _metadata(result, "predictions")["images"] == 120

    evaluation = _metadata(result, "evaluation")
    assert evaluation["random_models"] is True and evaluation["labelled_split"] is True
    assert "| zero-shot (templates) |" in evaluation["stages"]
    assert "| transductive top-1 | held-out top-1 |" in evaluation["stages"]
    assert "randomly initialised" in evaluation["stages"]
    assert evaluation["accuracy"].startswith("![accuracy per stage](data:image/png;base64,")
    assert evaluation["images/transductive"] == 120 and evaluation["images/held-out"] == 40


def test_evaluation_reports_each_split_against_the_class_folders(graph, folder_labels):
    """The tuned stage's accuracy in the evaluation asset's metadata and table, on each split, against
    a figure computed here: transductive from predictions.parquet, held-out from the tuned head on the
    held-out images' stored tuned embeddings, both checked against the class folders."""
    result, store, root = graph
    truth = folder_labels(root / "data" / DATASET)
    predictions_ref = store.require_ref("predictions", DATASET)
    predictions = store.read_table(predictions_ref, PREDICTIONS_FILE)
    transductive = sum(truth[i] == c for i, c in zip(predictions["image_id"], predictions["predicted_class"])) / 120
    clip = resources_for_test(root / "data", root / "artifacts")["models"].load_clip("cpu")
    cde = store.read_tensors(store.require_ref("cde_classifier", DATASET), CLASSIFIERS_FILE)["cde"]
    classifier = tuned_classifier_of(store.require_ref("prompt_tuned_encoder", DATASET), clip, cde,
                                     torch.device("cpu"))
    tuned_table = load_feature_table(predictions_ref.file(TUNED_FEATURES_FILE))
    held_out = [i for i in tuned_table.ids if i not in set(predictions["image_id"])]
    classes = tuned_head_probabilities(classifier, tuned_table.rows_for(held_out)).argmax(dim=-1).tolist()
    names = store.require_ref("dataset_manifest", DATASET).facts["classes"]
    held_out_top1 = sum(truth[i] == names[c] for i, c in zip(held_out, classes)) / 40
    metadata = _metadata(result, "evaluation")
    assert metadata[f"top1/transductive/{NOLA_TUNED_STAGE}"] == pytest.approx(transductive, abs=1e-9)
    assert metadata[f"top1/held-out/{NOLA_TUNED_STAGE}"] == pytest.approx(held_out_top1, abs=1e-9)
    table = store.read_table(store.require_ref("evaluation", DATASET), METHOD_EVALUATION_FILE)
    row = table.filter(pl.col("stage") == NOLA_TUNED_STAGE).row(0, named=True)
    assert (row["transductive_n"], row["held_out_n"]) == (120, 40) and row["final"]
    assert row["transductive_top1"] == pytest.approx(transductive, abs=1e-9)
    assert row["held_out_top1"] == pytest.approx(held_out_top1, abs=1e-9)


def test_asset_checks_ran_and_artifacts_are_finite(graph):
    result, _, _ = graph
    evaluations = {(e.asset_key.path[-1], e.check_name): e for e in result.get_asset_check_evaluations()}
    assert len(evaluations) == len(NOLA_CHECKS)
    assert all(e.passed for (asset, name), e in evaluations.items() if name == "no_nan_or_inf")
    assert evaluations[("cde_pseudo_labels", "every_class_has_pseudo_labels")].passed
    tuned_check = evaluations[("evaluation", "tuned_not_worse_than_zero_shot")]
    assert tuned_check.severity == AssetCheckSeverity.WARN
    assert tuned_check.metadata["split"].value == "held-out" and tuned_check.metadata["images"].value == 40


def test_tuned_predictions_equal_run_nola(graph):
    result, store, root = graph
    config = NolaConfig(
        models=ModelConfig.from_profile("tiny"),
        alignment=AlignmentConfig(epochs=ALIGNMENT_EPOCHS),
        tuning=nola_tuning_config(epochs=TUNING_EPOCHS),
        device="cpu",
    )
    reference = run_nola(root / "data" / DATASET, config, descriptions=FAKE_DESCRIPTIONS)
    ours = store.read_table(store.require_ref("predictions", DATASET), PREDICTIONS_FILE)
    assert ours.equals(reference.predictions)
    evaluation = store.read_table(store.require_ref("evaluation", DATASET), METHOD_EVALUATION_FILE)
    assert evaluation.select(list(STAGE_SCHEMA)).equals(reference.stages)


def test_nan_in_a_reused_feature_table_fails_the_blocking_check(graph, tmp_path):
    _, store, root = graph
    shutil.copytree(store.root(), tmp_path / "artifacts")  # the store is relocatable
    resources = resources_for_test(root / "data", tmp_path / "artifacts")
    path = resources["artifacts"].require_ref("dino_features", DATASET).file("features.safetensors")
    table = load_feature_table(path)
    table.features[5, 0] = float("nan")  # a corrupted cached row: reused as is, since no image changed
    save_feature_table(table, path)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASETS, [DATASET])
    rerun = materialize([*NOLA_ASSETS, *NOLA_CHECKS], selection=AssetSelection.assets(dino_features),
                        instance=instance, partition_key=DATASET, resources=resources, raise_on_error=False)
    assert not rerun.success  # a failed blocking ERROR check fails the run
    [check] = rerun.get_asset_check_evaluations()
    assert not check.passed and check.severity == AssetCheckSeverity.ERROR
    assert check.metadata["nonfinite"].value == {"features.safetensors:features": 1}


def test_check_judgements_on_crafted_input(tmp_path, monkeypatch):
    ref_dir = tmp_path / "artifact"
    ref_dir.mkdir()
    table = torch.randn(1000, 7).to(torch.float16)
    table[3, 2], table[998, 6] = float("nan"), float("-inf")  # in the first and the last slice
    save_file({"w": torch.tensor([1.0, float("inf")]), "ids": torch.tensor([1, 2]), "table": table,
               "scalar": torch.tensor(float("nan"))}, str(ref_dir / "t.safetensors"))
    pl.DataFrame({"score": [0.5, float("nan")], "n": [1, 2]}).write_parquet(ref_dir / "p.parquet")
    monkeypatch.setattr(checks, "CHECK_CHUNK_ELEMENTS", 50)  # the table is read in 143 slices of 7 rows
    bad = finite_result(ArtifactRef("x", "d", "0", str(ref_dir)))
    assert not bad.passed and bad.severity == AssetCheckSeverity.ERROR
    assert bad.metadata["nonfinite"].value == {"t.safetensors:w": 1, "t.safetensors:table": 2,
                                               "t.safetensors:scalar": 1, "p.parquet:score": 1}

    report = {"k": 16, "per_class": {"cat": 16, "dog": 0}, "short_classes": ["dog"]}
    coverage = coverage_result(report)
    assert not coverage.passed and coverage.severity == AssetCheckSeverity.WARN and "dog" in coverage.description

    def evaluation(held_out_n: int, zero_shot: float | None, tuned: float | None) -> pl.DataFrame:
        return pl.DataFrame({"stage": [ZERO_SHOT_STAGE, NOLA_TUNED_STAGE], "transductive_n": [0, 0],
                             "transductive_top1": [None, None], "held_out_n": [held_out_n] * 2,
                             "held_out_top1": [zero_shot, tuned], "random_models": [False, False]})

    worse = tuned_vs_zero_shot_result(evaluation(10, 0.5, 0.4))
    assert not worse.passed and worse.severity == AssetCheckSeverity.WARN and worse.metadata["split"].value == "held-out"
    unlabelled = tuned_vs_zero_shot_result(evaluation(0, None, None))
    assert unlabelled.passed and unlabelled.metadata["split"].value == "none"
