"""What every method recipe hands back, and the few helpers they share beyond the core.

A method run is a list of stages. Each stage gives class probabilities for the evaluation
images (rows follow `ids`: each row's top classes, `nola_core.predictions.TopClasses`, as every
recipe streams them, or a full [N, C] matrix) and, when it is a labeller, the hard
pseudo-labels it hands to the next stage. Nothing here sees a ground-truth
label: `nola_core.eval.evaluate_stages` is the only consumer of labels, and it takes these
objects as they are.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

from nola_core.predictions import TopClasses, predicted_classes


@dataclass(frozen=True)
class PseudoLabels:
    """Hard labels a stage gave to unlabeled images (training targets), by image id.

    `candidates` is how many unlabeled images the stage could have labelled: coverage is
    len(ids) / candidates (1.0 for an argmax labeller, the top-k share for NoLA's selection).
    """

    ids: tuple[str, ...]
    labels: torch.Tensor  # [M] long
    candidates: int

    def __post_init__(self) -> None:
        if self.labels.ndim != 1 or self.labels.numel() != len(self.ids):
            raise ValueError(f"{len(self.ids)} ids for labels of shape {tuple(self.labels.shape)}")

    @classmethod
    def argmax(
        cls, ids: Sequence[str], probabilities: torch.Tensor | TopClasses, unlabeled_ids: Sequence[str]
    ) -> "PseudoLabels":
        """The argmax class of every unlabeled image among `ids` (rows of `probabilities`)."""
        row = {image_id: i for i, image_id in enumerate(ids)}
        chosen = [image_id for image_id in unlabeled_ids if image_id in row]
        rows = torch.tensor([row[i] for i in chosen], dtype=torch.long)
        labels = predicted_classes(probabilities)[rows] if len(chosen) else torch.zeros(0, dtype=torch.long)
        return cls(tuple(chosen), labels.long(), len(unlabeled_ids))


@dataclass(frozen=True)
class StageOutput:
    """One stage of a method.

    `probabilities` is [len(ids), C], or the rows' `TopClasses` (None for a stage that only
    selects pseudo-labels, like NoLA's top-k); `final` marks the stage that is the method's
    answer (what the report ranks). Evaluation reads only each row's most probable class.
    """

    stage: str
    ids: tuple[str, ...]
    probabilities: torch.Tensor | TopClasses | None
    pseudo_labels: PseudoLabels | None = None
    final: bool = False

    def __post_init__(self) -> None:
        if self.probabilities is not None and len(self.probabilities) != len(self.ids):
            raise ValueError(f"stage {self.stage!r}: {len(self.probabilities)} rows for {len(self.ids)} ids")


@dataclass
class MethodRun:
    """Everything one method produced on one dataset for one seed.

    `tensors` is the method's checkpoint as flat named tensors (what an artifact store writes
    as safetensors); `history` holds label-free training signals for people to read.
    """

    method: str
    seed: int | None
    stages: list[StageOutput]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    history: dict[str, list] = field(default_factory=dict)
    artifacts: dict[str, object] = field(default_factory=dict)

    @property
    def final(self) -> StageOutput:
        finals = [stage for stage in self.stages if stage.final]
        if len(finals) != 1:
            raise ValueError(f"method {self.method!r} marks {len(finals)} final stages; exactly one expected")
        return finals[0]


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's CPU generator seeded, then restore the caller's RNG state.

    Data-loading transforms in the main process (num_workers=0) draw from the global
    generator; this makes such runs repeatable without leaving global state changed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
