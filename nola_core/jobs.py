"""What one process of a distributed stage runs: one frozen, picklable job object per stage.

A job holds a stage's config and inputs (configs, paths, records and small tensors; never a
model: CLIP and DINO are loaded in each rank from `ModelConfig`). A stage function takes
`(context, job, progress)`, so the same job runs here (one process), under
`nola_core.distributed.launch` (N local processes) or under torchrun (each process one rank):

    launch(prompt_tuning_stage, nprocs, PromptTuningJob(...), progress)

From the shell: `torchrun --nproc-per-node 4 -m nola_core.jobs features DATASET_DIR --out DIR`
writes the CLIP and DINO feature stores of a dataset with 4 processes.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from nola_core.data import ImageRecord, eval_transform
from nola_core.data.loading import evaluation_records, load_dataset
from nola_core.distributed import (
    DistributedContext,
    extract_features_distributed,
    init_distributed,
    shard_positions,
    shutdown,
)
from nola_core.features import FeatureConfig, load_feature_table
from nola_core.methods.nola import apply_wiseft, tune_prompts
from nola_core.models import ModelConfig, load_clip, load_dino
from nola_core.models.weights import WEIGHTS_DIR_ENV
from nola_core.runtime import CPU_THREADS_ENV, ComputeSettings, cpu_threads_setting
from nola_core.tuning import EpochStats, TuningConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageFeaturesJob:
    """The CLIP (`which="clip"`) or DINO (`"dino"`) feature table of `records`, written to `output`.

    `shard_store`: for ranks that share no folder with `output`, the URL prefix each rank uploads
    its shard to; the caller merges them into `output` (`extract_features_distributed`).
    """

    models: ModelConfig
    which: str
    root: Path
    records: tuple[ImageRecord, ...]
    config: FeatureConfig
    output: Path
    shard_store: str | None = None

    def __post_init__(self) -> None:
        if self.which not in ("clip", "dino"):
            raise ValueError(f"which={self.which!r}: expected 'clip' or 'dino'")
        object.__setattr__(self, "records", tuple(self.records))


def image_features_stage(
    context: DistributedContext, job: ImageFeaturesJob, progress: Callable[[int, int], None] | None = None
) -> None:
    """Write `job`'s feature table, for `launch`.

    The model is loaded from `job.models` on this rank's device; the rank encodes its share (see
    `extract_features_distributed`). With one process it is `data.loading.image_features` written
    to `job.output`, bit for bit. Nothing is returned: the caller maps the file, no table travels
    between processes.
    """
    model = load_clip(job.models, context.device) if job.which == "clip" else load_dino(job.models, context.device)
    tower = model.visual if job.which == "clip" else model.model  # what encode_image runs
    if context.enabled:
        logger.info("%s features: %d of %d image(s) on %s", job.which,
                    len(shard_positions(len(job.records), context)), len(job.records), context.device)
    extract_features_distributed(model.encode_image, job.root, job.records, eval_transform(model.preprocess),
                                 job.config, context, job.output, module=tower, progress=progress,
                                 decode_min_side=model.preprocess.resize_size, shard_store=job.shard_store)


@dataclass(frozen=True)
class PromptTuningJob:
    """NoLA's prompt tuning of `records` (then WiSE-FT when `config.wiseft_alpha` is set).

    The DL network (a small MLP) and the CDE travel as they are, and so do `fixed_labels` (one
    class per record, only with `config.fixed_pseudo_labels`: `methods.nola.fixed_pseudo_labels`;
    8 bytes an image, never the features). `resume_dir`: per-epoch resumable state
    (`tuning.train_prompts`).
    """

    models: ModelConfig
    dl_network: nn.Module
    cde: torch.Tensor
    root: Path
    records: tuple[ImageRecord, ...]
    config: TuningConfig
    resume_dir: Path | None = None
    fixed_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", tuple(self.records))


def prompt_tuning_stage(
    context: DistributedContext, job: PromptTuningJob, progress: Callable[[EpochStats], None] | None = None
) -> tuple[dict[str, torch.Tensor], list[EpochStats]]:
    """`methods.nola.tune_prompts`, then `apply_wiseft` when `job.config.wiseft_alpha` is set, for `launch`.

    CLIP and DINO are loaded from `job.models` on this rank's device. Returns the trainable
    tensors on the CPU (the same on every rank: DDP keeps them in sync) and the per-epoch
    statistics.
    """
    clip, dino = load_clip(job.models, context.device), load_dino(job.models, context.device)
    classifier, history = tune_prompts(clip, dino, job.dl_network, job.cde, job.root, job.records, job.config,
                                       context.device, progress, fixed_labels=job.fixed_labels, distributed=context,
                                       resume_dir=job.resume_dir)
    if job.config.wiseft_alpha is not None:
        apply_wiseft(classifier, clip, job.cde, job.config, job.config.wiseft_alpha)
    return {name: tensor.detach().cpu() for name, tensor in classifier.trainable_state_dict().items()}, history


def _features_command(options: argparse.Namespace) -> None:
    context = init_distributed(options.device)
    try:
        spec, manifest, labeled = load_dataset(options.dataset)
        records = evaluation_records(manifest, labeled)
        weights_dir = os.environ.get(WEIGHTS_DIR_ENV) or None  # an edge, as below
        models = ModelConfig.from_profile(options.profile, weights_dir=weights_dir)
        threads = cpu_threads_setting(os.environ.get(CPU_THREADS_ENV))  # this command is an edge: it reads the variable
        config = FeatureConfig(batch_size=options.batch_size, compute=ComputeSettings(
            num_workers=options.num_workers, precision=options.precision, cpu_threads=threads))
        for name in ("clip", "dino"):
            output = Path(options.out) / f"{name}_features.safetensors"
            image_features_stage(context, ImageFeaturesJob(models, name, spec.root, records, config, output))
            if context.is_main:
                table = load_feature_table(output, mmap=True)
                print(f"{name}: {len(table)} rows, {len(table.failed)} unreadable -> {output}")
    finally:
        shutdown(context)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nola_core.jobs", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    features = commands.add_parser("features", help="CLIP and DINO feature stores of a dataset, sharded over ranks")
    features.add_argument("dataset")
    features.add_argument("--out", required=True)
    features.add_argument("--profile", default="paper", help="model profile: paper | tiny")
    features.add_argument("--device", default="auto")
    features.add_argument("--precision", default="auto")
    features.add_argument("--batch-size", type=int, default=FeatureConfig.batch_size)
    features.add_argument("--num-workers", type=int, default=ComputeSettings.num_workers)
    options = parser.parse_args(argv)
    if options.command == "features":
        _features_command(options)


if __name__ == "__main__":
    main()
