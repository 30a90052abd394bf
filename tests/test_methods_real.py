"""Every method through the tiny random CLIP (and DINO) on the real demo images, and the proof
that ground-truth labels never reach training: shuffling every evaluation label on disk leaves
every checkpoint bit-identical, while the reported metrics change."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from nola_core.alignment import AlignmentConfig
from nola_core.demo import demo_dataset_path
from nola_core.features import FeatureConfig
from nola_core.methods import (
    EVALUATION_SCHEMA,
    ComparisonConfig,
    LaFTerConfig,
    LatteCLIPConfig,
    TextClassifierConfig,
    compare_methods,
    generate_latteclip_texts,
)
from nola_core.models import ModelConfig
from nola_core.methods.nola import NolaConfig
from nola_core.runtime import ComputeSettings
from nola_core.tuning import TuningConfig

FAST = ComparisonConfig(
    models=ModelConfig.from_profile("tiny"),
    features=FeatureConfig(compute=ComputeSettings(num_workers=0)),
    lafter=LaFTerConfig(text=TextClassifierConfig(iterations=50),
                        tuning=TuningConfig(num_prompts=50, epochs=1, micro_batch_size=32,
                                            compute=ComputeSettings(num_workers=0))),
    latteclip=LatteCLIPConfig(batch_size=32, max_iterations=3, lr=1e-5, compute=ComputeSettings(num_workers=0)),
    nola=NolaConfig(alignment=AlignmentConfig(epochs=3), tuning=TuningConfig(epochs=1,
                                                                             compute=ComputeSettings(num_workers=0))),
    device="cpu",
)


class FakeLMM:
    """A chat provider that 'sees' images: its answer names the images' content hashes."""

    name, model, base_url, supports_temperature = "fake-lmm", "fake-1", None, True

    def __init__(self, fail_on: int | None = None):
        self.calls = 0
        self.fail_on = fail_on

    def complete(self, prompt, *, system=None, images=(), temperature=None, max_tokens=1024):
        from nola_core.llm import LLMError

        self.calls += 1
        if self.calls == self.fail_on:
            raise LLMError("fake outage")
        digests = " ".join(hashlib.sha256(bytes(image)).hexdigest()[:6] for image in images)
        kind = "group" if len(images) > 1 else "image"
        return f"A grey {kind} showing {digests}."


def shuffled_label_copies(root, dataset=None):
    """A dataset (the demo one by default), and a copy whose every labelled image sits in a
    shuffled class folder."""
    dataset = dataset or demo_dataset_path()
    original = root / "original"
    shutil.copytree(dataset, original)
    shuffled = root / "shuffled"
    shutil.copytree(dataset, shuffled)
    files = sorted(p for p in (shuffled / "labeled").rglob("*.png"))
    classes = sorted(p.name for p in (shuffled / "labeled").iterdir())
    permutation = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    staged = []
    for path in files:
        moved = shuffled / f"{path.parent.name}_{path.name}"
        path.rename(moved)
        staged.append(moved)
    for position, path in zip(permutation, staged):
        path.rename(shuffled / "labeled" / classes[position % len(classes)] / path.name)
    return original, shuffled


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return shuffled_label_copies(tmp_path_factory.mktemp("methods"))


def check_checkpoints_do_not_depend_on_the_labels(first, second):
    """Every method's tensors are bit-identical whether the labelled folders are right or shuffled."""
    for a, b in zip(first.runs, second.runs):
        assert (a.method, a.seed) == (b.method, b.seed)
        assert a.tensors and sorted(a.tensors) == sorted(b.tensors)
        for name in a.tensors:
            assert torch.equal(a.tensors[name], b.tensors[name]), f"{a.method}: {name} depends on the labels"
            assert torch.isfinite(a.tensors[name]).all(), f"{a.method}: {name}"


def test_every_method_runs_and_shuffled_labels_leave_every_checkpoint_bit_identical(datasets, tmp_path):
    original, shuffled = datasets
    first = compare_methods(original, FAST, lmm=FakeLMM(), lmm_cache_dir=tmp_path / "lmm")
    second = compare_methods(shuffled, FAST, lmm=FakeLMM(), lmm_cache_dir=tmp_path / "lmm2")

    assert [r.method for r in first.runs] == ["zero-shot", "cde", "lafter", "latteclip", "nola"]
    check_checkpoints_do_not_depend_on_the_labels(first, second)
    for a, b in zip(first.runs, second.runs):
        for stage_a, stage_b in zip(a.stages, b.stages):
            if stage_a.probabilities is not None:  # rows follow ids, which include held-out images
                assert set(stage_a.ids) == set(stage_b.ids)
    # The labels did change, and the metric code did read them.
    assert not first.evaluation["held_out_top1"].equals(second.evaluation["held_out_top1"])

    frame = first.evaluation
    assert frame.schema == __import__("polars").Schema(EVALUATION_SCHEMA)
    assert frame.filter(frame["final"])["method"].to_list() == ["zero-shot", "cde", "lafter", "latteclip", "nola"]
    final = frame.filter(frame["final"])
    assert (final["held_out_n"] == 40).all()  # the demo's 40 held-out images
    assert (final["transductive_n"] == 120).all()  # and the labelled copies of its 120 unlabeled ones
    assert final["random_models"].all()
    latte = first.runs[3]
    assert latte.tensors["prototypes"].shape == (4, 32)
    assert any(name.startswith("model.visual.") for name in latte.tensors)
    assert any(name.startswith("model.transformer.") for name in latte.tensors)  # text encoder trained too


def test_latteclip_texts_from_an_lmm_with_groups_and_a_failed_call(datasets, tmp_path):
    from nola_core.data import build_manifest, load_dataset_spec

    original, _ = datasets
    spec = load_dataset_spec(original)
    records = build_manifest(spec, "unlabeled").records[:10]
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    provider = FakeLMM(fail_on=2)
    texts = generate_latteclip_texts(provider, spec.root, records, labels, domain=spec.domain, group_size=4,
                                     cache_dir=tmp_path)
    assert provider.calls == 10 + 3  # one per image, one per group (5 → one group of 5, 3, 2)
    assert len(texts.image) == 9 and texts.failed == (records[1].image_id,)
    assert all(text.startswith("A grey image showing") for text in texts.image.values())
    assert len(texts.group) == 10 and len(set(texts.group.values())) == 3
    assert texts.group[records[0].image_id] == texts.group[records[4].image_id]  # same pseudo-class
    again = generate_latteclip_texts(FakeLMM(), spec.root, records, labels, domain=spec.domain, cache_dir=tmp_path)
    assert again.image == {**texts.image, **again.image} and not again.failed  # cached answers reused


def test_two_seeds_give_a_report_with_a_spread(datasets, tmp_path):
    """Issue 10: a run asks for several seeds; the report shows mean and a non-zero std."""
    from dataclasses import replace

    from nola_core.methods import write_evaluation
    from nola_core.report import write_report

    config = replace(FAST, methods=("cde", "nola"), seeds=(0, 1))
    comparison = compare_methods(datasets[0], config)
    nola_runs = [run for run in comparison.runs if run.method == "nola"]
    assert sorted(run.seed for run in nola_runs) == [0, 1]
    assert not torch.equal(nola_runs[0].tensors["tuned.encoder.prompts"], nola_runs[1].tensors["tuned.encoder.prompts"])
    write_evaluation(comparison.evaluation, tmp_path / "evaluations", name="comparison")
    report = write_report(tmp_path / "evaluations", tmp_path / "out")
    rows = {row["method"]: row for row in report.summary.to_dicts()}
    assert rows["nola"]["seeds"] == 2
    assert rows["nola"]["top1_std"] > 0  # seeded: these two seeds reach 22.5 % and 20.0 % here
    assert rows["cde"]["seeds"] == 1  # deterministic: run once
    assert "±" in report.text and "nola" in (tmp_path / "out" / "report.md").read_text()


def test_nola_in_a_comparison_trains_on_fixed_pseudo_labels_when_asked(datasets):
    """`TuningConfig.fixed_pseudo_labels` reaches the comparison's NoLA: labels from the stored
    DINO features, once per image; the tuned tensors differ from per-view labels'."""
    from dataclasses import replace

    per_view = compare_methods(datasets[0], replace(FAST, methods=("nola",)))
    fixed_tuning = replace(FAST.nola.tuning, fixed_pseudo_labels=True)
    fixed = compare_methods(datasets[0], replace(FAST, methods=("nola",), nola=replace(FAST.nola, tuning=fixed_tuning)))
    [per_view_run], [fixed_run] = per_view.runs, fixed.runs
    assert len(fixed_run.history["epochs"]) == 1 and fixed_run.history["epochs"][0]["images"] > 0
    assert not torch.equal(per_view_run.tensors["tuned.encoder.prompts"], fixed_run.tensors["tuned.encoder.prompts"])
