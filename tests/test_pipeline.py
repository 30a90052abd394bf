"""NoLA end to end from Python alone, tiny random models, on the real demo images."""

import json
import shutil
import time

import polars as pl
import pytest

from nola_core.alignment import AlignmentConfig
from nola_core.demo import demo_dataset_path
from nola_core.models import ModelConfig, load_clip
from nola_core.data.loading import evaluation_records, load_dataset, tuned_image_features
from nola_core.methods.nola import NolaConfig, run_nola
from nola_core.predictions import tuned_head_probabilities
from nola_core.stage_names import NOLA_SELECTION_STAGE, NOLA_TUNED_STAGE
from nola_core.tuning import TuningConfig

FAST = NolaConfig(
    models=ModelConfig.from_profile("tiny"),
    alignment=AlignmentConfig(epochs=10),
    tuning=TuningConfig(epochs=3, micro_batch_size=32),
    device="cpu",
)


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "fashion_mini"
    shutil.copytree(demo_dataset_path(), root)
    descriptions = {
        "t-shirt": ["a short-sleeved cotton top laid flat.", "a plain t-shirt with a round neck."],
        "trouser": ["a pair of long trousers with two legs.", "straight-cut pants seen from the front."],
        "sneaker": ["a low sports shoe with laces, seen from the side.", "a canvas sneaker with a rubber sole."],
        "bag": ["a handbag with a strap or handles.", "a rectangular leather bag."],
    }
    (root / "descriptions.json").write_text(json.dumps(descriptions))
    spec_file = root / "dataset.yaml"
    spec_file.write_text(spec_file.read_text() + "\ndescriptions: descriptions.json\n")
    return root


def test_nola_end_to_end_on_real_images(demo_copy, folder_labels):
    started = time.perf_counter()
    result = run_nola(demo_copy, FAST)
    elapsed = time.perf_counter() - started
    assert elapsed < 120

    assert result.predictions.height == len(result.manifest) == 120
    assert set(result.predictions["predicted_class"]) <= set(result.spec.classes)
    assert result.predictions["confidence"].min() >= 0.25 - 1e-6  # argmax of 4 classes

    assert result.selection.k == 16  # max(16, floor(0.2 * 120 / 4) = 6)
    assert sum(result.selection_report["per_class"].values()) == result.selection.indices.numel()
    assert result.selection_report["labelled_selected"] == result.selection.indices.numel()
    # Precision against the class folders on disk, pairing each selected row with its image id.
    truth = folder_labels(demo_copy)
    ids = result.manifest.ids  # every demo image is readable: the rows of the selection
    picked = [(ids[row], result.spec.classes[label])
              for row, label in zip(result.selection.indices.tolist(), result.selection.labels.tolist())]
    precision = sum(truth[image_id] == name for image_id, name in picked) / len(picked)
    assert result.selection_report["precision"] == pytest.approx(precision, abs=1e-9)

    stages = result.stages
    assert stages["stage"].to_list() == ["top-k pseudo-labels", "zero-shot (templates)", "CDE (descriptions)",
                                         "DL network (DINO)", "NoLA prompt-tuned", "tuned encoder + templates"]
    scored = stages.filter(pl.col("stage") != NOLA_SELECTION_STAGE)
    assert scored["transductive_n"].to_list() == [120] * 5  # the labelled copies of the unlabeled images
    assert scored["held_out_n"].to_list() == [40] * 5  # labelled images never adapted on
    assert stages["pseudo_label_precision"][0] == pytest.approx(result.selection_report["precision"], abs=1e-9)
    # The tuned stage on each split against the class folders: transductive from the prediction
    # table, held-out from the tuned head on the held-out images (same records, so same batches).
    tuned = stages.filter(pl.col("stage") == NOLA_TUNED_STAGE).row(0, named=True)
    predicted = dict(zip(result.predictions["image_id"], result.predictions["predicted_class"]))
    right = sum(truth[image_id] == name for image_id, name in predicted.items())
    assert tuned["transductive_top1"] == pytest.approx(right / 120, abs=1e-9)
    records = evaluation_records(result.manifest, load_dataset(demo_copy)[2])
    table = tuned_image_features(result.classifier, load_clip(FAST.models, "cpu"), demo_copy, records,
                                 FAST.features, "cpu")
    held_out = [r.image_id for r in records if r.image_id not in predicted]
    classes = tuned_head_probabilities(result.classifier, table.rows_for(held_out)).argmax(dim=-1).tolist()
    right = sum(truth[image_id] == result.spec.classes[c] for image_id, c in zip(held_out, classes))
    assert tuned["held_out_top1"] == pytest.approx(right / 40, abs=1e-9)
    assert "transductive top-1" in result.stage_table() and "held-out top-1" in result.stage_table()
    # The descriptions really reached the CDE classifier.
    assert not (result.cde - result.zero_shot).abs().max() < 1e-6
    assert len(result.history) == 3
    assert result.random_models and "randomly initialised" in result.stage_table()
    assert result.text_checks["collisions"] == [] and result.text_checks["truncated"] == {}


def test_same_config_gives_the_same_predictions(demo_copy):
    first = run_nola(demo_copy, FAST)
    second = run_nola(demo_copy, FAST)
    assert first.predictions.equals(second.predictions)
