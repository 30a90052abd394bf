"""Process plumbing: several processes (one per GPU, or CPU processes with gloo) inside one run.

- `init_distributed()` reads what `torchrun` sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT) and joins the process group: NCCL on GPUs (one device per local rank), gloo on
  CPU. Without those variables (or WORLD_SIZE=1) it returns a single-process context and
  everything below runs as if there were no `torch.distributed`. This module is the one place
  that reads (and, in `launch`'s children, sets) torchrun's variables.
- `launch(fn, nprocs, *args)` starts `nprocs` local processes itself and returns rank 0's
  result: what an orchestrator (the Dagster resource field `nproc_per_node`) uses when the run
  is not already under torchrun. The stages it runs there are in `nola_core.jobs`: one frozen,
  picklable job object per stage; CLIP and DINO are loaded in each rank, never pickled.
- Feature extraction: `extract_features_distributed` gives rank r the records r, r+W, ...;
  each rank writes its rows to a shard file and rank 0 merges them, in record order, into the
  store file (`merge_shards`), so the table equals one process's (up to float rounding of
  different batch compositions) and no process holds it whole. Ranks that share no folder
  (nodes on an object-storage root) upload their shards instead, and the caller merges them.
- Prompt tuning: `nola_core.tuning.train_prompts(..., distributed=context)` wraps the
  classifier in DDP; the per-step image sets and the per-image augmentation seeds are those of
  one process, so the trained tensors match one process's (see tests/test_distributed.py).
"""

from __future__ import annotations

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

from nola_core.data import ImageRecord
from nola_core.features import FeatureConfig, FeatureTable, extract_features, load_feature_table, write_feature_table
from nola_core.runtime import resolve_device
from nola_core.storage import open_storage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None
    local_world_size: int = 1  # the ranks on this node, which share its CPUs (`runtime.cpu_thread_budget`)

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
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "") or world)
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
                              backend=dist.get_backend(), local_world_size=local_world)


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
    shard_store: str | None = None,
) -> FeatureTable | None:
    """`extract_features` with the records sharded over ranks, into the store file `output`;
    every rank returns that table, memory-mapped.

    Each rank writes its share to a shard file next to `output` (`shard_path`: so `output` must
    be on a file system every rank reaches, as the artifact store is); rank 0 then merges the
    shards in record order chunk by chunk (`merge_shards`), so no rank ever holds the whole
    table in RAM. `progress(done, total)` counts this rank's share.

    `shard_store`: the URL of a prefix in object storage, for ranks that share no folder: each
    rank uploads its shard there under the shard's file name and deletes its copy, nobody
    merges and every rank returns None; the caller downloads the shards next to `output` and
    merges them (`merge_shards`).
    """
    output = Path(output)
    if not context.enabled:
        return extract_features(encode, root, records, transform, config, context.device, progress, dtype=dtype,
                                module=module, output=output, decode_min_side=decode_min_side,
                                processes=context.local_world_size)
    shard = shard_path(output, context.rank, context.world_size)
    mine = [records[i] for i in shard_positions(len(records), context)]
    extract_features(encode, root, mine, transform, config, context.device, progress, dtype=dtype, module=module,
                     output=shard, decode_min_side=decode_min_side, processes=context.local_world_size)
    if shard_store is not None:
        open_storage(shard_store).put(shard.name, shard)
        shard.unlink()
        return None
    dist.barrier()
    if context.is_main:
        merge_shards(output, records, context.world_size)
    dist.barrier()
    return load_feature_table(output, mmap=True)


def shard_path(output: Path, rank: int, world_size: int) -> Path:
    """Where rank `rank` of `world_size` writes its share of the table `output`: a hidden file next to it."""
    return output.with_name(f".{output.name}.rank{rank}-of-{world_size}")


def merge_shards(output: Path, records: Sequence[ImageRecord], world_size: int) -> FeatureTable:
    """The `world_size` ranks' shards of `output` (`shard_path`) merged into the table `output`,
    rows in the order of `records`, chunk by chunk and atomically (`write_feature_table`); the
    shards are deleted. Returns the table, memory-mapped."""
    shards = [shard_path(output, rank, world_size) for rank in range(world_size)]
    tables = [load_feature_table(shard, mmap=True) for shard in shards]
    written = {image_id for table in tables for image_id in table.ids}
    failed = {image_id for table in tables for image_id in table.failed}
    merged = write_feature_table(output, [r.image_id for r in records if r.image_id in written], tables,
                                 [r.image_id for r in records if r.image_id in failed])
    for shard in shards:
        shard.unlink()
    return merged


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


_PRELOADED = ["nola_core.distributed", "nola_core.jobs"]
"""What the fork server imports once (torch, torchvision, open_clip, timm, polars and the stage
recipes: seconds)."""


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
