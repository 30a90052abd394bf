"""Streamed stage predictions: the same answers as the full probability matrices, in bounded memory.

`methods.nola.stage_predictions` scores every stage chunk by chunk and keeps each image's top
classes. On a small controlled case (tables in different row orders, ids missing from the
DINO and tuned tables, chunks that do not divide N) it must give what the whole-table code
gives: the argmax and its probability of `[N, C]` matrices built at once, and so the same
prediction table and stage accuracies.

Memory, in a fresh process as in tests/test_feature_store.py (RssAnon sampled every
millisecond, glibc's mmap threshold at 128 KiB): 65,536 images × 64 dims (memory-mapped
float16 CLIP and DINO tables, float32 tuned table) × 256 classes. One float32 N × C matrix is
64 MiB and the whole-table path built five (plus float32 copies of the tables: ~900 MiB at
twice these rows); streaming the five stages in chunks of 2,048 rows must grow anonymous
memory by less than 16 MiB, a quarter of one matrix. The control scores one stage the old way.
"""

import sys
from pathlib import Path

import pytest
import torch

from nola_core.alignment import alignment_network, predict_alignment
from nola_core.data import ImageRecord, Manifest
from nola_core.features import FeatureTable, load_feature_table, save_feature_table
from nola_core.eval import EvaluationLabels, evaluate_stages
from nola_core.methods import PseudoLabels
from nola_core.methods.nola import nola_stage_outputs, stage_predictions
from nola_core.predictions import cosine_probabilities, prediction_table, tuned_head_probabilities
from nola_core.stage_names import CDE_STAGE, NOLA_DL_STAGE, NOLA_TEMPLATES_STAGE, NOLA_TUNED_STAGE, ZERO_SHOT_STAGE
from nola_core.predictions import TopClasses

ROWS, DIM, CLASSES, CHUNK = 65_536, 64, 256, 2048
MEMORY_BOUND = 16 * 2**20
LOGIT_SCALE = 100.0


class Head(torch.nn.Module):
    """What `tuned_head_probabilities` uses of a `PromptTunedClassifier`: head and logit scale."""

    def __init__(self, dim: int, classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.head = torch.nn.Linear(dim, classes, bias=False)
        self.logit_scale = 10.0

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.head(features)


def reindex_rows(table: FeatureTable, ids) -> torch.Tensor:
    """The whole-table reference: a float32 [len(ids), D] copy of `table`'s rows in the order of
    `ids`, zeros for ids it lacks (what the streamed code must reproduce chunk by chunk)."""
    out = torch.zeros(len(ids), table.features.shape[1])
    row = {image_id: i for i, image_id in enumerate(table.ids)}
    for position, image_id in enumerate(ids):
        if image_id in row:
            out[position] = table.features[row[image_id]]
    return out


def full_matrix_probabilities(clip, dino, zero_shot, cde, dl_network, classifier, tuned, logit_scale):
    """The whole-table computation the streamed one replaces: five [N, C] matrices at once."""
    tuned_features = reindex_rows(tuned, clip.ids)
    dl = FeatureTable(dino.ids, predict_alignment(dl_network, dino.features))
    return {
        ZERO_SHOT_STAGE: cosine_probabilities(clip.features, zero_shot, logit_scale),
        CDE_STAGE: cosine_probabilities(clip.features, cde, logit_scale),
        NOLA_DL_STAGE: reindex_rows(dl, clip.ids),
        NOLA_TUNED_STAGE: tuned_head_probabilities(classifier, tuned_features),
        NOLA_TEMPLATES_STAGE: cosine_probabilities(tuned_features, zero_shot, logit_scale),
    }


def _inputs(rows: int, dim: int, classes: int, seed: int = 0, shuffle: bool = True):
    """CLIP, DINO and tuned tables (the last two reordered, each lacking some ids) and models."""
    generator = torch.Generator().manual_seed(seed)
    ids = tuple(f"img{i:06d}" for i in range(rows))
    clip = FeatureTable(ids, torch.randn(rows, dim, generator=generator).to(torch.float16))
    dino_order = torch.randperm(rows, generator=generator)[: rows - 3] if shuffle else torch.arange(rows)
    tuned_order = torch.randperm(rows, generator=generator)[: rows - 2] if shuffle else torch.arange(rows)
    dino = FeatureTable(tuple(ids[i] for i in dino_order.tolist()),
                        torch.randn(len(dino_order), dim + 8, generator=generator).to(torch.float16))
    tuned = FeatureTable(tuple(ids[i] for i in tuned_order.tolist()),
                         torch.nn.functional.normalize(torch.randn(len(tuned_order), dim, generator=generator), dim=-1))
    zero_shot = torch.randn(classes, dim, generator=generator)
    cde = torch.randn(classes, dim, generator=generator)
    torch.manual_seed(seed)
    dl_network = alignment_network(dim + 8, classes, hidden_dim=32).eval()
    return clip, dino, zero_shot, cde, dl_network, Head(dim, classes, seed), tuned


@pytest.mark.parametrize("chunk_size", [37, 65536])
def test_streamed_stages_match_the_full_probability_matrices(chunk_size):
    inputs = _inputs(300, 32, 7)
    clip, dino, tuned = inputs[0], inputs[1], inputs[6]
    full = full_matrix_probabilities(*inputs, LOGIT_SCALE)
    streamed = stage_predictions(*inputs, LOGIT_SCALE, chunk_size=chunk_size)
    top5 = stage_predictions(*inputs, LOGIT_SCALE, k=5, chunk_size=chunk_size)
    assert list(streamed) == list(full)
    missing_dino = torch.tensor([i not in dino.row_index for i in clip.ids])
    assert missing_dino.sum() == 3 and sum(i not in tuned.row_index for i in clip.ids) == 2
    for name, probabilities in full.items():
        confidence, predicted = probabilities.max(dim=-1)
        assert streamed[name].k == 1 and len(streamed[name]) == len(clip.ids)
        assert torch.equal(streamed[name].predicted, probabilities.argmax(dim=-1)), name
        assert torch.equal(streamed[name].predicted, predicted), name
        torch.testing.assert_close(streamed[name].confidence, confidence, rtol=1e-6, atol=0)
        # Top 5, where no class ties (rows the DINO table lacks are all zeros: every class ties).
        values, indices = probabilities.topk(5, dim=-1)
        keep = ~missing_dino if name == NOLA_DL_STAGE else torch.ones(len(clip.ids), dtype=torch.bool)
        assert torch.equal(top5[name].indices[keep], indices[keep]), name
        torch.testing.assert_close(top5[name].probabilities, values, rtol=1e-6, atol=0)
    # Rows the DINO table lacks: probability 0 everywhere, so class 0 at confidence 0, as before.
    assert (streamed[NOLA_DL_STAGE].confidence[missing_dino] == 0).all()

    records = [ImageRecord(i, f"{i}.png", label=int(n) % 7) for n, i in enumerate(clip.ids[::-1])]
    manifest = Manifest(tuple(records[:200]))  # unlabeled; the labelled images are all 300
    labeled = Manifest(tuple(records))
    assert prediction_table(manifest, clip.ids, streamed[NOLA_TUNED_STAGE], list("abcdefg")).equals(
        prediction_table(manifest, clip.ids, full[NOLA_TUNED_STAGE], list("abcdefg")))
    labels, train_ids = EvaluationLabels.from_manifests(manifest, labeled), list(manifest.ids)
    selection = PseudoLabels(tuple(train_ids[:5]), torch.arange(5), len(train_ids))
    streamed_metrics = evaluate_stages(nola_stage_outputs(streamed, clip.ids, selection, train_ids), list("abcdefg"), labels)
    assert streamed_metrics["held_out_n"].to_list() == [0] + [100] * 5  # the top-k selection scores no image
    assert streamed_metrics.equals(evaluate_stages(nola_stage_outputs(full, clip.ids, selection, train_ids),
                                                   list("abcdefg"), labels))


def test_top_classes_cap_k_at_the_number_of_classes_and_keep_the_first_of_ties():
    top = TopClasses.of(torch.tensor([[0.25, 0.5, 0.25], [0.4, 0.2, 0.4]]), k=1)
    assert top.predicted.tolist() == [1, 0] and top.confidence.tolist() == pytest.approx([0.5, 0.4])
    assert TopClasses.of(torch.rand(4, 3), k=5).k == 3


def measure(directory: str) -> dict:
    """In a fresh process: memory growth of the streamed stages, then of the whole-table path."""
    from test_feature_store import PeakAnonymousMemory

    torch.set_num_threads(1)  # small per-chunk kernels: no thread fan-out on a shared 2-core machine
    folder = Path(directory)
    _, _, zero_shot, cde, dl_network, classifier, _ = _inputs(8, DIM, CLASSES, shuffle=False)
    dl_network = alignment_network(DIM, CLASSES, hidden_dim=32).eval()
    clip, dino, tuned = (load_feature_table(folder / f"{name}.safetensors", mmap=True) for name in ("clip", "dino", "tuned"))
    models = (zero_shot, cde, dl_network, classifier)
    head = [FeatureTable(t.ids[: 2 * CHUNK], t.features[: 2 * CHUNK]) for t in (clip, dino, tuned)]
    stage_predictions(head[0], head[1], *models, head[2], LOGIT_SCALE, chunk_size=CHUNK)  # warm-up: kernel buffers
    with PeakAnonymousMemory() as streaming:
        streamed = stage_predictions(clip, dino, *models, tuned, LOGIT_SCALE, chunk_size=CHUNK)
    with PeakAnonymousMemory() as whole:  # the control: one stage as the code did it before
        full = cosine_probabilities(clip.features, zero_shot, LOGIT_SCALE)
    return {
        "streamed": streaming.growth, "full": whole.growth,
        "agree": torch.equal(streamed[ZERO_SHOT_STAGE].predicted, full.argmax(dim=-1)),
        "rows": [len(top) for top in streamed.values()],
    }


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage_stores")
    generator = torch.Generator().manual_seed(0)
    ids = tuple(f"{i:064x}" for i in range(ROWS))  # content hashes are 64 hex characters
    for name, dtype in (("clip", torch.float16), ("dino", torch.float16), ("tuned", torch.float32)):
        features = torch.randn(ROWS, DIM, generator=generator).to(dtype)
        save_feature_table(FeatureTable(ids, features), folder / f"{name}.safetensors")
    return folder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streamed_stages_stay_in_bounded_memory_on_memory_mapped_tables(stores):
    from test_feature_store import measure_in_fresh_process

    result = measure_in_fresh_process("test_stage_predictions", stores)
    one_matrix = ROWS * CLASSES * 4
    assert result["streamed"] < MEMORY_BOUND, f"streamed stages grew anonymous memory by {result['streamed'] / 2**20:.0f} MiB"
    assert result["full"] > one_matrix  # the measurement does see one full matrix
    assert result["agree"] and result["rows"] == [ROWS] * 5
