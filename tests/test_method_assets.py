"""The method assets (zero-shot/CDE, LaFTer, LatteCLIP) and `method_comparison` materialized with the
whole NoLA graph on tiny random models: checkpoints, per-method evaluation parquet under the
stable folder, and the report markdown + PNG in the comparison's metadata."""

import polars as pl
import pytest
from dagster import AssetKey, DagsterInstance, materialize

from assets_helpers import copy_demo, resources_for_test
from nola_core.methods import EVALUATION_SCHEMA
from nola_core.report import connect
from nola_assets.assets import GPU_POOL, METHOD_EVALUATION_FILE, NOLA_ASSETS, TUNED_FEATURES_FILE
from nola_assets.checks import NOLA_CHECKS
from nola_assets.method_assets import (
    LAFTER_FILE,
    LATTE_TEXTS_FILE,
    LATTECLIP_FILE,
    METHOD_ASSETS,
    ZERO_SHOT_FILE,
    evaluation_root,
)
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


def test_method_metadata_has_timings_counts_and_accuracy(graph):
    result, _ = graph
    lafter = _metadata(result, "lafter_encoder")
    assert lafter["seconds"] > 0 and lafter["training_images"] > 0 and lafter["epochs"] == 2
    assert 0.0 <= lafter["top1/lafter/LaFTer prompt-tuned"] <= 1.0
    latte = _metadata(result, "latteclip_encoder")
    assert latte["epochs"] == 2 and 0.0 <= latte["top1/latteclip/LatteCLIP prototypes"] <= 1.0
    texts = _metadata(result, "latteclip_texts")
    assert texts["lmm"] is False and "T_class-only" in texts["fallback"] and texts["image_texts"] == 0
    zero_shot = _metadata(result, "zero_shot_classifier")
    assert {"top1/zero-shot/zero-shot (templates)", "top1/cde/CDE (descriptions)"} <= set(zero_shot)


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
        assert final["eval_split"] in ("held-out", "transductive") and final["n_eval"] > 0
        assert 0.0 <= final["top1"] <= 1.0 and 0.0 <= final["mean_per_class"] <= 1.0
        assert final["random_models"] is True
        precision = frame["pseudo_label_precision"].drop_nulls()
        assert ((precision >= 0) & (precision <= 1)).all()
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
    assert metadata["winner"] in METHODS
    assert set(metadata["methods"]) == METHODS
