"""The method recipes stream: every stage keeps each image's top class, never an [N, C] matrix.

Small cases (chunks that do not divide N, a memory-mapped float16 CLIP table, a tuned table
that lacks an id): every stage of zero-shot, CDE, LaFTer and LatteCLIP must give, row for row,
the argmax and its probability of the full matrix the recipes built before, and the same
pseudo-labels.

Memory, in a fresh process as in test_stage_predictions.py (RssAnon sampled every millisecond,
glibc's mmap threshold at 128 KiB): a memory-mapped 65,536 × 64 float16 CLIP table, 256 classes.
One float32 N × C matrix is 64 MiB; the zero-shot, CDE, LaFTer text and LatteCLIP zero-shot
stages, streamed in chunks of 2,048 rows, must grow anonymous memory by less than 16 MiB. The
control scores one stage the old way (the whole table at once).

The CPU budget: LatteCLIP's loader takes `runtime.loader_workers` workers and its training
loop runs within `runtime.cpu_thread_budget`, checked with the CPU count monkeypatched.
"""

import sys
from pathlib import Path

import pytest
import torch

from nola_core import runtime
from nola_core.data import build_manifest, load_dataset_spec
from nola_core.demo import demo_dataset_path
from nola_core.features import FeatureConfig, FeatureTable, load_feature_table, save_feature_table
from nola_core.methods import (
    LaFTerConfig,
    LatteCLIPConfig,
    LatteTexts,
    TextClassifierConfig,
    class_text_weights,
    lafter_text_set,
    latteclip_zero_shot,
    run_cde,
    run_lafter,
    run_latteclip,
    run_zero_shot,
    text_classifier_probabilities,
    text_classifier_top_classes,
    tune_latteclip,
)
from nola_core.models import ModelConfig, load_clip
from nola_core.data.loading import image_features
from nola_core.predictions import cosine_probabilities, tuned_head_probabilities
from nola_core.runtime import ComputeSettings
from nola_core.tuning import TuningConfig
from test_stage_predictions import reindex_rows

ROWS, DIM, CLASSES, CHUNK = 65_536, 64, 256, 2048
MEMORY_BOUND = 16 * 2**20
TEMPLATE = "a photo of a {}."


class FakeClip:
    """A text encoder for `class_text_weights`: a fixed random vector per string."""

    def __init__(self, dim: int):
        self.dim = dim

    def encode_text(self, texts, device="cpu"):
        seeds = [sum(map(ord, text)) * 7919 + len(text) for text in texts]
        return torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(s)) for s in seeds])


def assert_same_top_classes(streamed, full: torch.Tensor, name: str):
    """The stage's `TopClasses` equal the full matrix's argmax and its probability, row for row."""
    confidence, predicted = full.max(dim=-1)
    assert streamed.k == 1 and len(streamed) == full.shape[0], name
    assert torch.equal(streamed.predicted, full.argmax(dim=-1)) and torch.equal(streamed.predicted, predicted), name
    assert torch.equal(streamed.confidence, confidence), name


def assert_argmax_pseudo_labels(stage, full: torch.Tensor, unlabeled_ids):
    row = {image_id: i for i, image_id in enumerate(stage.ids)}
    assert stage.pseudo_labels.ids == tuple(unlabeled_ids)
    assert torch.equal(stage.pseudo_labels.labels, full.argmax(dim=-1)[[row[i] for i in unlabeled_ids]])


def _mapped_table(folder: Path, rows: int, dim: int, seed: int = 0) -> FeatureTable:
    ids = tuple(f"{i:064x}" for i in range(rows))  # content hashes are 64 hex characters
    features = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)).to(torch.float16)
    save_feature_table(FeatureTable(ids, features), folder / "clip.safetensors")
    return load_feature_table(folder / "clip.safetensors", mmap=True)


def _classifiers(classes: int, dim: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(classes, dim, generator=generator) for _ in range(3)]  # zero-shot, CDE, LaFTer text


@pytest.mark.parametrize("chunk_size", [37, 65536])
def test_training_free_stages_match_the_full_probability_matrices(tmp_path, chunk_size):
    table = _mapped_table(tmp_path, 300, 32)
    zero_shot, cde, text_weight = _classifiers(7, 32)
    unlabeled = list(table.ids[250::-2])  # a subset, not in table order
    classes = [f"c{i}" for i in range(7)]

    for run, weights in ((run_zero_shot, zero_shot), (run_cde, cde)):
        stage = run(table, weights, unlabeled, chunk_size=chunk_size).final
        full = cosine_probabilities(table.features, weights, 100.0)  # what the recipes computed before
        assert_same_top_classes(stage.probabilities, full, stage.stage)
        assert_argmax_pseudo_labels(stage, full, unlabeled)

    text = text_classifier_top_classes(table, text_weight, chunk_size)
    assert_same_top_classes(text, text_classifier_probabilities(table.features, text_weight), "LaFTer text")

    weights, top, labels = latteclip_zero_shot(FakeClip(32), classes, table, unlabeled, chunk_size=chunk_size)
    full = cosine_probabilities(table.features, class_text_weights(FakeClip(32), classes, TEMPLATE), 100.0)
    assert torch.equal(weights, class_text_weights(FakeClip(32), classes, TEMPLATE))
    assert_same_top_classes(top, full, "LatteCLIP zero-shot")
    row = {image_id: i for i, image_id in enumerate(table.ids)}
    assert labels.ids == tuple(unlabeled)  # c_zs, what LatteCLIP trains on: the argmax of the full matrix
    assert torch.equal(labels.labels, full.argmax(dim=-1)[[row[i] for i in unlabeled]])


def test_lafter_and_latteclip_stages_match_the_full_probability_matrices(tmp_path):
    """Both recipes end to end through the tiny random CLIP on demo images, scored in chunks of 7
    over a memory-mapped CLIP table; the tuned embeddings go to files, one image short of the
    CLIP table (its row scores a zero embedding: every class ties, as before)."""
    spec = load_dataset_spec(demo_dataset_path())
    records = list(build_manifest(spec, "unlabeled").records[:24])
    features = FeatureConfig(batch_size=8, compute=ComputeSettings(num_workers=0))
    clip = load_clip(ModelConfig.from_profile("tiny"), "cpu")
    clip_table = image_features(clip, spec.root, records, features, "cpu", output=tmp_path / "clip.safetensors")
    assert clip_table.features.dtype == torch.float16 and clip_table.ids == tuple(r.image_id for r in records)
    train, evaluated = records[:16], records[:-1]
    unlabeled = [r.image_id for r in train]
    classes = len(spec.classes)

    config = LaFTerConfig(text=TextClassifierConfig(iterations=20),
                          tuning=TuningConfig(num_prompts=2, epochs=1, batch_size=8, micro_batch_size=8,
                                              compute=ComputeSettings(num_workers=0)))
    text_set = lafter_text_set(clip, spec.classes, spec.templates, dict.fromkeys(spec.classes, ()), "cpu")
    lafter = run_lafter(clip, text_set, classes, spec.root, train, evaluated, clip_table, config, features, "cpu",
                        chunk_size=7, tuned_output=tmp_path / "lafter.safetensors")
    text, tuned = lafter.stages
    full_text = text_classifier_probabilities(clip_table.features, lafter.tensors["text_classifier"])
    assert_same_top_classes(text.probabilities, full_text, text.stage)
    assert_argmax_pseudo_labels(text, full_text, unlabeled)
    tuned_table = load_feature_table(tmp_path / "lafter.safetensors")
    assert tuned_table.ids == clip_table.ids[:-1]
    full_tuned = tuned_head_probabilities(lafter.artifacts["classifier"], reindex_rows(tuned_table, clip_table.ids))
    assert_same_top_classes(tuned.probabilities, full_tuned, tuned.stage)
    assert tuned.probabilities.confidence[-1] == pytest.approx(1 / classes)

    latte = run_latteclip(clip, spec.classes, spec.root, train, evaluated, clip_table, LatteTexts(),
                          LatteCLIPConfig(batch_size=8, max_iterations=2, lr=1e-5,
                                          compute=ComputeSettings(num_workers=0)), features, "cpu",
                          chunk_size=7, tuned_output=tmp_path / "latteclip.safetensors")
    zero_shot, final = latte.stages
    full_zero_shot = cosine_probabilities(clip_table.features,
                                          class_text_weights(clip, spec.classes, TEMPLATE, "cpu"), 100.0)
    assert_same_top_classes(zero_shot.probabilities, full_zero_shot, zero_shot.stage)
    assert_argmax_pseudo_labels(zero_shot, full_zero_shot, unlabeled)
    final_table = load_feature_table(tmp_path / "latteclip.safetensors")
    full_final = cosine_probabilities(reindex_rows(final_table, clip_table.ids), latte.tensors["prototypes"], 100.0)
    assert_same_top_classes(final.probabilities, full_final, final.stage)
    assert final.probabilities.confidence[-1] == pytest.approx(1 / classes)


def test_latteclip_loader_workers_and_threads_follow_the_cpu_budget(monkeypatch):
    """8 CPUs: 2 workers (a quarter at most) and 8 - 2 compute threads while training; 2 CPUs:
    no worker and 2 threads; the caller's thread count is restored after."""
    import nola_core.methods.latteclip as latteclip

    spec = load_dataset_spec(demo_dataset_path())
    records = list(build_manifest(spec, "unlabeled").records[:8])
    clip = load_clip(ModelConfig.from_profile("tiny"), "cpu")
    prototypes = class_text_weights(clip, spec.classes, TEMPLATE, "cpu")
    workers, threads = [], []

    class RecordingLoader(latteclip.DataLoader):
        def __init__(self, *args, **kwargs):
            workers.append(kwargs["num_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(latteclip, "DataLoader", RecordingLoader)
    config = LatteCLIPConfig(batch_size=4, max_iterations=1, compute=ComputeSettings(num_workers=2))
    labels = torch.zeros(len(records), dtype=torch.long)
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        for cpus in (8, 2):
            monkeypatch.setattr(runtime, "available_cpus", lambda cpus=cpus: cpus)
            tune_latteclip(clip, spec.root, records, LatteTexts(), labels, prototypes, spec.classes, config, "cpu",
                           progress=lambda _: threads.append(torch.get_num_threads()))
            assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)
    assert workers == [2, 0] and threads == [6, 2]


def measure(directory: str) -> dict:
    """In a fresh process: memory growth of the four training-free stages streamed over the
    memory-mapped table, then of one stage scored the old way (the whole table at once)."""
    from test_feature_store import PeakAnonymousMemory

    torch.set_num_threads(1)  # small per-chunk kernels: no thread fan-out on a shared 2-core machine
    table = load_feature_table(Path(directory) / "clip.safetensors", mmap=True)
    zero_shot, cde, text_weight = _classifiers(CLASSES, DIM)
    classes = [f"c{i}" for i in range(CLASSES)]
    clip = FakeClip(DIM)
    unlabeled = list(table.ids)
    head = FeatureTable(table.ids[: 2 * CHUNK], table.features[: 2 * CHUNK])
    run_zero_shot(head, zero_shot, list(head.ids), chunk_size=CHUNK)  # warm-up: kernel buffers
    latteclip_zero_shot(clip, classes, head, list(head.ids), chunk_size=CHUNK)
    with PeakAnonymousMemory() as streaming:
        runs = [run_zero_shot(table, zero_shot, unlabeled, chunk_size=CHUNK),
                run_cde(table, cde, unlabeled, chunk_size=CHUNK)]
        top = [run.final.probabilities for run in runs]
        top.append(text_classifier_top_classes(table, text_weight, CHUNK))
        top.append(latteclip_zero_shot(clip, classes, table, unlabeled, chunk_size=CHUNK)[1])
    with PeakAnonymousMemory() as whole:  # the control: the zero-shot stage as the recipe did it before
        full = cosine_probabilities(table.features, zero_shot, 100.0)
    return {
        "streamed": streaming.growth, "full": whole.growth,
        "agree": torch.equal(top[0].predicted, full.argmax(dim=-1)),
        "rows": [len(t) for t in top],
        "pseudo_labels": [len(run.final.pseudo_labels.ids) for run in runs],
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_method_stages_stay_in_bounded_memory_on_a_memory_mapped_table(tmp_path):
    from test_feature_store import measure_in_fresh_process

    _mapped_table(tmp_path, ROWS, DIM)
    result = measure_in_fresh_process("test_methods_streamed", tmp_path)
    one_matrix = ROWS * CLASSES * 4
    assert result["streamed"] < MEMORY_BOUND, \
        f"streamed method stages grew anonymous memory by {result['streamed'] / 2**20:.1f} MiB"
    assert result["full"] > one_matrix  # the measurement does see one full matrix
    assert result["agree"] and result["rows"] == [ROWS] * 4 and result["pseudo_labels"] == [ROWS] * 2
