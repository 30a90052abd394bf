"""Prompt tuning's data loading and resume across epochs and process counts.

One loader serves the whole run, so its workers start once, not at every epoch; the tensors do
not depend on the worker count. A state saved under one process resumes under two (gloo) and
ends within the float rounding of test_distributed.py (1e-5) of an uninterrupted run.
"""

import copy
import logging
import os
from typing import NamedTuple

import pytest
import torch

from nola_core import runtime
from nola_core.data import MultiView, build_manifest, load_dataset_spec, strong_transform, weak_transform
from nola_core.demo import demo_dataset_path
from nola_core.distributed import SINGLE_PROCESS, launch
from nola_core.models import ModelConfig, PromptTunedClassifier, load_clip
from nola_core.runtime import ComputeSettings
from nola_core.tuning import TuningConfig, train_prompts

TRAINED_TOLERANCE = 1e-5  # two processes sum gradients in another order (test_distributed.py)


class Stop(Exception):
    """Stands in for a kill right after an epoch's resume state was saved."""


class _RecordPid:
    """A transform that appends the pid of the process running it to a file, then transforms."""

    def __init__(self, transform, log):
        self.transform, self.log = transform, log

    def __call__(self, image):
        with open(self.log, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()}\n")
        return self.transform(image)


class Run(NamedTuple):
    trained: dict[str, torch.Tensor]
    history: list
    ran: list[int]  # the epochs this call trained
    log: list[str]  # rank 0's nola_core.tuning lines
    rng_kept: bool  # train_prompts left the global torch RNG as it found it


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _labels(weak: torch.Tensor) -> torch.Tensor:
    """A deterministic pseudo-labeller standing in for the DL network (4 classes)."""
    return (weak[:, 0, 0, 0] * 1000).long().remainder(4)


def _tune(context, root, records, cde, config, resume=None, stop_after=None, pid_log=None) -> Run:
    clip = load_clip(ModelConfig.from_profile("tiny"))
    classifier = PromptTunedClassifier(copy.deepcopy(clip.visual), cde, num_prompts=4)
    weak = weak_transform(clip.preprocess)
    views = MultiView((_RecordPid(weak, pid_log) if pid_log else weak, strong_transform(clip.preprocess)))
    ran = []

    def progress(stats):
        ran.append(stats.epoch)
        if stats.epoch == stop_after:
            raise Stop

    tuning_log = logging.getLogger("nola_core.tuning")
    messages, level = _Messages(), tuning_log.level
    tuning_log.addHandler(messages)
    tuning_log.setLevel(logging.INFO)
    rng = torch.get_rng_state()
    try:
        history = train_prompts(classifier, root, records, views, _labels, config, context.device, progress,
                                distributed=context, resume_dir=resume)
    finally:
        tuning_log.removeHandler(messages)
        tuning_log.setLevel(level)
    return Run(classifier.trainable_state_dict(), history, ran, messages.lines, torch.equal(rng, torch.get_rng_state()))


@pytest.fixture(scope="module")
def inputs():
    spec = load_dataset_spec(demo_dataset_path())
    records = list(build_manifest(spec, "unlabeled").records[:12])
    cde = torch.nn.functional.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    return spec.root, records, cde


@pytest.fixture
def eight_cpus(monkeypatch):
    """`loader_workers` allows a quarter of the CPUs on the CPU, none on this 2-core machine."""
    monkeypatch.setattr(runtime, "available_cpus", lambda cgroup_root=None: 8)


def _config(num_workers: int, epochs: int = 3) -> TuningConfig:
    # 12 images, steps of 8 in micro-batches of 4: 3 micro-batches per epoch, one step uneven.
    return TuningConfig(epochs=epochs, batch_size=8, micro_batch_size=4, lr=1e-2, seed=7,
                        compute=ComputeSettings(num_workers=num_workers))


def _assert_same_run(run: Run, reference: Run):
    assert run.trained.keys() == reference.trained.keys()
    for name in reference.trained:
        assert torch.equal(run.trained[name], reference.trained[name]), name
    assert run.history == reference.history  # every epoch's statistics, exactly


def test_loader_workers_start_once_for_all_epochs_and_change_nothing(inputs, eight_cpus, tmp_path):
    root, records, cde = inputs
    with_worker = _tune(SINGLE_PROCESS, root, records, cde, _config(1), pid_log=tmp_path / "pids")
    pids = set((tmp_path / "pids").read_text().split())
    assert len(pids) == 1 and pids != {str(os.getpid())}  # one worker process served all 3 epochs
    assert with_worker.rng_kept  # the workers' seed comes from the loader's own generator

    in_process = _tune(SINGLE_PROCESS, root, records, cde, _config(0))
    assert [s.epoch for s in with_worker.history] == [1, 2, 3] and all(s.images == 12 for s in with_worker.history)
    _assert_same_run(with_worker, in_process)


def test_a_run_stopped_after_epoch_1_resumes_with_a_worker_to_the_uninterrupted_result(inputs, eight_cpus,
                                                                                       tmp_path):
    root, records, cde = inputs
    with pytest.raises(Stop):
        _tune(SINGLE_PROCESS, root, records, cde, _config(1), resume=tmp_path, stop_after=1)
    resumed = _tune(SINGLE_PROCESS, root, records, cde, _config(1), resume=tmp_path, pid_log=tmp_path / "pids")
    assert resumed.ran == [2, 3]  # resumed, not restarted
    assert len(set((tmp_path / "pids").read_text().split())) == 1
    _assert_same_run(resumed, _tune(SINGLE_PROCESS, root, records, cde, _config(1)))


def test_a_run_stopped_under_one_process_resumes_under_two(inputs, tmp_path):
    """The resume state holds nothing that depends on the process count (see _resume_fingerprint)."""
    root, records, cde = inputs
    config = _config(0, epochs=2)
    with pytest.raises(Stop):
        launch(_tune, 1, root, records, cde, config, tmp_path, 1, device="cpu")
    resumed = launch(_tune, 2, root, records, cde, config, tmp_path, device="cpu", backend="gloo")
    reference = launch(_tune, 1, root, records, cde, config, device="cpu")

    assert resumed.ran == [2] and any("resuming after epoch 1/2" in line for line in resumed.log)  # not restarted
    assert [s.epoch for s in resumed.history] == [1, 2] and [s.images for s in resumed.history] == [12, 12]
    assert [s.loss for s in resumed.history] == pytest.approx([s.loss for s in reference.history], rel=1e-4)
    assert resumed.trained.keys() == reference.trained.keys()
    for name, tensor in reference.trained.items():
        assert (resumed.trained[name] - tensor).abs().max() <= TRAINED_TOLERANCE, name
