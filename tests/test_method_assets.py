"""The method assets (zero-shot/CDE, LaFTer, LatteCLIP) and `method_comparison` materialized with the
whole NoLA graph on tiny random models: checkpoints, per-method evaluation parquet under the
stable folder, and the report markdown + PNG in the comparison's metadata."""

import polars as pl
import pytest
from dagster import AssetKey, DagsterInstance, materialize

from assets_helpers import copy_demo, resources_for_test
from nola_core.eval import SPLITS, split_column
from nola_core.features import load_feature_table
from nola_core.methods import EVALUATION_SCHEMA
from nola_core.predictions import cosine_top_classes
from nola_core.report import connect
from nola_assets.assets import NOLA_ASSETS
from nola_assets.common import FEATURES_FILE, GPU_POOL, METHOD_EVALUATION_FILE, TUNED_FEATURES_FILE
from nola_assets.checks import NOLA_CHECKS
from nola_assets.method_assets import (
    LAFTER_FILE,
    LATTE_TEXTS_FILE,
    LATTECLIP_FILE,
    METHOD_ASSETS,
    ZERO_SHOT_FILE,
)
from nola_assets.result_assets import evaluation_root
from nola_assets.partitions import DATASETS

DATASET = "fashion_mini"
METHODS = {"zero-shot", "cde", "lafter", "latteclip", "nola"}


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    copy_demo(root / "data", DATASET)
    resources = resources_for_test(root / "data", root / "artifacts")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASETS, [DATASET])
    result = materialize([*NOLA_ASSETS, *METHOD_ASSETS, *NOLA_CHECKS], instance=instance, partition_key=DATASET,
                         resources=resources)
    return result, resources["artifacts"]


def _metadata(result, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(asset)]
    return {key: value.value for key, value in event.materialization.metadata.items()}


def test_method_assets_store_their_artifacts(graph):
    result, store = graph
    assert result.success
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert materialized == {a.key.path[-1] for a in [*NOLA_ASSETS, *METHOD_ASSETS]}
    files = {"zero_shot_classifier": ZERO_SHOT_FILE, "lafter_encoder": LAFTER_FILE,
             "latteclip_texts": LATTE_TEXTS_FILE, "latteclip_encoder": LATTECLIP_FILE}
    for asset, name in files.items():
        ref = store.require_ref(asset, DATASET)
        assert ref.file(name).is_file() and ref.file("key.json").is_file()
    for asset in ("zero_shot_classifier", "lafter_encoder", "latteclip_encoder", "evaluation"):
        assert store.require_ref(asset, DATASET).file(METHOD_EVALUATION_FILE).is_file()
    for asset in ("lafter_encoder", "latteclip_encoder"):  # tuned embeddings: written as computed, scored from disk
        assert store.require_ref(asset, DATASET).file(TUNED_FEATURES_FILE).is_file()
    # Upstream assets are shared, not recomputed: the method keys name their digests.
    clip = store.require_ref("clip_features", DATASET)
    assert store.require_ref("lafter_encoder", DATASET).key["clip_features"] == clip.digest
    assert store.require_ref("latteclip_encoder", DATASET).key["clip_features"] == clip.digest
    assert (store.require_ref("zero_shot_classifier", DATASET).key["classifiers"]
            == store.require_ref("cde_classifier", DATASET).digest)
    pools = {a.key.path[-1] for a in METHOD_ASSETS if a.op.pool == GPU_POOL}
    assert pools == {"lafter_encoder", "latteclip_encoder"}


def _final_accuracy_metadata(metadata: dict, table: pl.DataFrame) -> None:
    """The metadata's top-1 of every final stage, per split, is the asset's evaluation table's."""
    for row in table.filter(pl.col("final")).iter_rows(named=True):
        for split in SPLITS:
            assert metadata[f"top1/{split}/{row['method']}/{row['stage']}"] == row[split_column(split, "top1")]


def test_method_metadata_has_timings_counts_and_accuracy(graph, folder_labels):
    result, store = graph
    lafter = _metadata(result, "lafter_encoder")
    assert lafter["seconds"] > 0 and lafter["training_images"] == 120 and lafter["epochs"] == 2
    latte = _metadata(result, "latteclip_encoder")
    assert latte["epochs"] == 2
    for asset, metadata in (("lafter_encoder", lafter), ("latteclip_encoder", latte)):
        table = store.read_table(store.require_ref(asset, DATASET), METHOD_EVALUATION_FILE)
        assert table.filter(pl.col("final"))["held_out_n"].to_list() == [40]
        assert table.filter(pl.col("final"))["transductive_n"].to_list() == [120]
        _final_accuracy_metadata(metadata, table)
    texts = _metadata(result, "latteclip_texts")
    assert texts["lmm"] is False and "T_class-only" in texts["fallback"] and texts["image_texts"] == 0

    # Zero-shot on each split, recomputed here from its stored classifier and the CLIP features,
    # against the class folders on disk.
    zero_shot = _metadata(result, "zero_shot_classifier")
    ref = store.require_ref("zero_shot_classifier", DATASET)
    weights = store.read_tensors(ref, ZERO_SHOT_FILE)["zero_shot"]
    clip_table = load_feature_table(store.require_ref("clip_features", DATASET).file(FEATURES_FILE))
    predicted = cosine_top_classes(clip_table, clip_table.ids, weights, 100.0).predicted.tolist()
    classes = store.require_ref("dataset_manifest", DATASET).facts["classes"]
    truth = folder_labels(store.root().parent / "data" / DATASET)
    adapted = set(store.read_table(store.require_ref("predictions", DATASET), "predictions.parquet")["image_id"])
    right = {True: 0, False: 0}
    for image_id, c in zip(clip_table.ids, predicted):
        right[image_id in adapted] += truth[image_id] == classes[c]
    assert zero_shot["top1/transductive/zero-shot/zero-shot (templates)"] == pytest.approx(right[True] / 120, abs=1e-9)
    assert zero_shot["top1/held-out/zero-shot/zero-shot (templates)"] == pytest.approx(right[False] / 40, abs=1e-9)
    assert {f"top1/{split}/cde/CDE (descriptions)" for split in SPLITS} <= set(zero_shot)


def test_evaluation_parquet_per_method_and_report_in_metadata(graph):
    result, store = graph
    folder = evaluation_root(store) / DATASET
    assert {p.stem for p in folder.glob("*.parquet")} == METHODS
    for method in METHODS:
        frame = pl.read_parquet(folder / f"{method}.parquet")
        assert frame.columns == list(EVALUATION_SCHEMA)
        assert set(frame["method"]) == {method} and set(frame["dataset"]) == {DATASET}
        assert frame["final"].sum() == 1
        final = frame.filter(pl.col("final")).row(0, named=True)
        assert (final["transductive_n"], final["held_out_n"]) == (120, 40)  # both splits, never blended
        assert final["random_models"] is True
        # Every unlabeled demo image has a labelled copy: every pseudo-label's truth is known.
        labellers = frame.filter(pl.col("pseudo_labelled").is_not_null())
        assert labellers.height and labellers["pseudo_labels_known"].equals(labellers["pseudo_labelled"])
    # The comparison's NoLA rows are the evaluation asset's table, its metadata's figures.
    nola = pl.read_parquet(folder / "nola.parquet")
    assert nola.equals(store.read_table(store.require_ref("evaluation", DATASET), METHOD_EVALUATION_FILE))
    for row in nola.iter_rows(named=True):
        for split in SPLITS:
            if row[split_column(split, "top1")] is not None:
                assert _metadata(result, "evaluation")[f"top1/{split}/{row['stage']}"] == row[split_column(split, "top1")]
    # The DuckDB view sees every method of the partition.
    connection = connect(evaluation_root(store))
    try:
        methods = {row[0] for row in connection.sql("SELECT DISTINCT method FROM evaluations").fetchall()}
    finally:
        connection.close()
    assert methods == METHODS

    metadata = _metadata(result, "method_comparison")
    markdown, png = folder / "report" / "report.md", folder / "report" / "report.png"
    assert markdown.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metadata["report_markdown"] == str(markdown) and metadata["report_png"] == str(png)
    assert metadata["report"] == markdown.read_text(encoding="utf-8")
    assert metadata["report_chart"].startswith("![") and "data:image/png;base64," in metadata["report_chart"]
    assert metadata["winner/held-out"] in METHODS and metadata["winner/transductive"] in METHODS
    assert set(metadata["methods"]) == METHODS
