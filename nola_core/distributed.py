"""Several processes (one per GPU, or CPU processes with gloo) inside one run: torchrun or `launch`.

- `init_distributed()` reads what `torchrun` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT) and joins the process group: NCCL on GPUs (one device per local rank), gloo on
  CPU. Without those variables (or WORLD_SIZE=1) it returns a single-process context and
  everything below runs as if there were no `torch.distributed`.
- `launch(fn, nprocs, *args)` starts `nprocs` local processes itself and returns rank 0's
  result: what an orchestrator (the Dagster resource field `nproc_per_node`, env
  `NOLA_NPROC_PER_NODE`) uses when the run is not already under torchrun. The stages it runs
  there are `image_features_stage` and `prompt_tuning_stage`: module-level functions taking
  configs, paths and small tensors; CLIP and DINO are loaded in each rank, never pickled.
- Feature extraction: `extract_features_distributed` gives rank r the records r, r+W, ...;
  each rank writes its rows to a shard file and rank 0 merges them, in record order, into the
  store file, so the table equals one process's (up to float rounding of different batch
  compositions) and no process holds it whole.
- Prompt tuning: `nola_core.tuning.train_prompts(..., distributed=context)` wraps the
  classifier in DDP; the per-step image sets and the per-image augmentation seeds are those of
  one process, so the trained tensors match one process's (see tests/test_distributed.py).

From the shell: `torchrun --nproc-per-node 4 -m nola_core.distributed features DATASET_DIR
--out DIR` writes the CLIP and DINO feature stores of a dataset with 4 processes.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from nola_core.data import ImageRecord, eval_transform
from nola_core.features import FeatureConfig, FeatureTable, extract_features, load_feature_table, write_feature_table
from nola_core.models import ModelConfig, load_clip, load_dino
from nola_core.pipeline import apply_wiseft, evaluation_records, load_dataset, tune_prompts
from nola_core.runtime import resolve_device
from nola_core.tuning import EpochStats, TuningConfig

logger = logging.getLogger(__name__)

NPROC_ENV = "NOLA_NPROC_PER_NODE"
"""The environment variable behind the Dagster resource field `nproc_per_node` (default 1)."""


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def init_distributed(device: str | torch.device = "auto", backend: str | None = None,
                     timeout_s: float = 1800.0) -> DistributedContext:
    """Join the process group described by torchrun's environment (idempotent).

    `device="auto"` gives each local rank its own GPU (`cuda:LOCAL_RANK`) when there are GPUs,
    else the CPU; the backend follows (nccl / gloo) unless given.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device == "auto" and torch.cuda.is_available() and world > 1:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world <= 1:
        return DistributedContext(rank=0, world_size=1, local_rank=0, device=resolved)
    backend = backend or ("nccl" if resolved.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistributedContext(rank=rank, world_size=world, local_rank=local_rank, device=resolved,
                              backend=dist.get_backend())


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard_positions(count: int, context: DistributedContext) -> list[int]:
    """Positions r, r+W, r+2W, ... of `count` items: balanced to within one, no padding."""
    return list(range(context.rank, count, context.world_size))


def extract_features_distributed(
    encode: Callable[[torch.Tensor], torch.Tensor],
    root: Path,
    records: Sequence[ImageRecord],
    transform: Callable,
    config: FeatureConfig,
    context: DistributedContext,
    output: Path,
    dtype: torch.dtype = torch.float16,
    module: nn.Module | None = None,
    progress: Callable[[int, int], None] | None = None,
    decode_min_side: int | None = None,
) -> FeatureTable:
    """`extract_features` with the records sharded over ranks, into the store file `output`;
    every rank returns that table, memory-mapped.

    Each rank writes its share to a shard file next to `output` (so `output` must be on a file
    system every rank reaches, as the artifact store is); rank 0 then merges the shards in record
    order chunk by chunk, so no rank ever holds the whole table in RAM. `progress(done, total)`
    counts this rank's share.
    """
    output = Path(output)
    if not context.enabled:
        return extract_features(encode, root, records, transform, config, context.device, progress, dtype=dtype,
                                module=module, output=output, decode_min_side=decode_min_side)
    shards = [output.with_name(f".{output.name}.rank{rank}-of-{context.world_size}")
              for rank in range(context.world_size)]
    mine = [records[i] for i in shard_positions(len(records), context)]
    extract_features(encode, root, mine, transform, config, context.device, progress, dtype=dtype, module=module,
                     output=shards[context.rank], decode_min_side=decode_min_side)
    dist.barrier()
    if context.is_main:
        tables = [load_feature_table(shard, mmap=True) for shard in shards]
        ordered = [r.image_id for r in records if any(r.image_id in t.row_index for t in tables)]
        failed = {image_id for table in tables for image_id in table.failed}
        write_feature_table(output, ordered, tables, [r.image_id for r in records if r.image_id in failed], dtype)
        for shard in shards:
            shard.unlink()
    dist.barrier()
    return load_feature_table(output, mmap=True)


def image_features_stage(
    context: DistributedContext,
    models: ModelConfig,
    which: str,
    root: Path,
    records: Sequence[ImageRecord],
    config: FeatureConfig,
    output: Path,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write the CLIP (`which="clip"`) or DINO (`"dino"`) feature table of `records` to `output`, for `launch`.

    The model is loaded from `models` on this rank's device; the rank encodes its share (see
    `extract_features_distributed`). With one process it is `pipeline.image_features` written
    to `output`, bit for bit. Nothing is returned: the caller maps the file, no table travels
    between processes.
    """
    if which not in ("clip", "dino"):
        raise ValueError(f"which={which!r}: expected 'clip' or 'dino'")
    model = load_clip(models, context.device) if which == "clip" else load_dino(models, context.device)
    tower = model.visual if which == "clip" else model.model  # what encode_image runs
    if context.enabled:
        logger.info("%s features: %d of %d image(s) on %s", which, len(shard_positions(len(records), context)),
                    len(records), context.device)
    extract_features_distributed(model.encode_image, root, records, eval_transform(model.preprocess), config,
                                 context, output, module=tower, progress=progress,
                                 decode_min_side=model.preprocess.resize_size)


def prompt_tuning_stage(
    context: DistributedContext,
    models: ModelConfig,
    dl_network: nn.Module,
    cde: torch.Tensor,
    root: Path,
    records: Sequence[ImageRecord],
    config: TuningConfig,
    wiseft_alpha: float | None = None,
    resume_dir: Path | None = None,
    fixed_labels: torch.Tensor | None = None,
    progress: Callable[[EpochStats], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[EpochStats]]:
    """NoLA's prompt tuning (`pipeline.tune_prompts`, then WiSE-FT when `wiseft_alpha` is set), for `launch`.

    CLIP and DINO are loaded from `models` on this rank's device; the DL network (a small MLP)
    and the CDE come as they are, and so do `fixed_labels` (one class per record, only with
    `config.fixed_pseudo_labels`: `pipeline.fixed_pseudo_labels`; 8 bytes an image, never the
    features, travel to each process). Returns the trainable tensors on the CPU (the same on
    every rank: DDP keeps them in sync) and the per-epoch statistics.
    """
    clip, dino = load_clip(models, context.device), load_dino(models, context.device)
    classifier, history = tune_prompts(clip, dino, dl_network, cde, root, records, config, context.device, progress,
                                       fixed_labels=fixed_labels, distributed=context, resume_dir=resume_dir)
    if wiseft_alpha is not None:
        apply_wiseft(classifier, clip, cde, config, wiseft_alpha)
    return {name: tensor.detach().cpu() for name, tensor in classifier.trainable_state_dict().items()}, history


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched(rank: int, fn: Callable, nprocs: int, port: int, result_path: str, device: str, backend: str | None,
              args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs))
    # A new process has no logging set up: nola_core's INFO lines (counts per rank, rank 0's epochs)
    # go to stderr, which the caller's log capture (a Dagster step's compute log) inherits.
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank {rank}/{nprocs} %(name)s: %(message)s")
    logging.getLogger("nola_core").setLevel(logging.INFO)
    context = init_distributed(device, backend)
    try:
        result = fn(context, *args)
        if context.is_main:
            torch.save(result, result_path)
    finally:
        shutdown(context)


_PRELOADED = ["nola_core.distributed"]
"""What the fork server imports once (torch, torchvision, open_clip, timm, polars: seconds)."""


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, device: str | torch.device = "auto",
           backend: str | None = None) -> Any:
    """Run `fn(context, *args)` in `nprocs` fresh local processes; return rank 0's result.

    `fn` must be importable (a module-level function), its arguments picklable. The processes
    are never forks of the caller (no CUDA state or threads inherited): they fork from
    multiprocessing's fork server, a clean process started at the first call, which imports
    nola_core once and keeps the environment of that moment, so later calls start in
    milliseconds instead of re-importing torch in every process.
    With `nprocs == 1` it runs here, in a single-process context.
    """
    if nprocs <= 1:
        return fn(DistributedContext(0, 1, 0, resolve_device(device)), *args)
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(_PRELOADED)  # used when the server starts, i.e. once
    with tempfile.TemporaryDirectory(prefix="nola-launch-") as folder:
        result_path = os.path.join(folder, "result.pt")
        mp.start_processes(_launched, args=(fn, nprocs, _free_port(), result_path, device, backend, args),
                           nprocs=nprocs, join=True, start_method="forkserver")
        # Our own file, written a moment ago by rank 0 of this call: trusted, so full unpickling.
        return torch.load(result_path, weights_only=False)


def _features_command(options: argparse.Namespace) -> None:
    context = init_distributed(options.device)
    try:
        spec, manifest, labeled = load_dataset(options.dataset)
        records = evaluation_records(manifest, labeled)
        models = ModelConfig.from_profile(options.profile)
        config = FeatureConfig(batch_size=options.batch_size, num_workers=options.num_workers,
                               precision=options.precision)
        for name in ("clip", "dino"):
            output = Path(options.out) / f"{name}_features.safetensors"
            image_features_stage(context, models, name, spec.root, records, config, output)
            if context.is_main:
                table = load_feature_table(output, mmap=True)
                print(f"{name}: {len(table)} rows, {len(table.failed)} unreadable -> {output}")
    finally:
        shutdown(context)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nola_core.distributed", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    features = commands.add_parser("features", help="CLIP and DINO feature stores of a dataset, sharded over ranks")
    features.add_argument("dataset")
    features.add_argument("--out", required=True)
    features.add_argument("--profile", default="paper", help="model profile: paper | tiny")
    features.add_argument("--device", default="auto")
    features.add_argument("--precision", default="auto")
    features.add_argument("--batch-size", type=int, default=FeatureConfig.batch_size)
    features.add_argument("--num-workers", type=int, default=FeatureConfig.num_workers)
    options = parser.parse_args(argv)
    if options.command == "features":
        _features_command(options)


if __name__ == "__main__":
    main()
