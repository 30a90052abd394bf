"""Device, precision and seeding helpers shared by every stage (explicit, never global)."""

from __future__ import annotations

import contextlib
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` → first CUDA device if there is one, else CPU; `cuda:N` is checked to exist."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return resolved


@dataclass(frozen=True)
class ComputeSettings:
    """How a loop loads images and runs its forwards, shared by feature extraction
    (`FeatureConfig.compute`), prompt tuning (`TuningConfig.compute`) and LatteCLIP
    (`LatteCLIPConfig.compute`, which reads `num_workers` and `precision` only). None of these
    changes which images are used or what is trained, only speed and float rounding.

    `precision`: auto | fp32 | bf16 | fp16 (`acceleration.resolve_precision`); `fused_attention`
    and `precast_weights`: the autocast-equivalent speed-ups of `nola_core.acceleration`.
    """

    num_workers: int = 2  # on the CPU at most a quarter of the cores (`loader_workers`)
    precision: str = "auto"
    fused_attention: bool = True
    precast_weights: bool = True
    cpu_threads: int | None = None  # torch threads on the CPU; None: `cpu_thread_budget`'s share


def cpu_threads_setting(value: str | None) -> int | None:
    """`NOLA_CPU_THREADS` as `ComputeSettings.cpu_threads`: None when unset or empty, else at
    least 1. The edges (the CLI, the Dagster resource) read the variable and call this."""
    text = (value or "").strip()
    if not text:
        return None
    try:
        return max(1, int(text))
    except ValueError:
        raise ValueError(f"{CPU_THREADS_ENV}={text!r}: expected a number of threads") from None


CPU_THREADS_ENV = "NOLA_CPU_THREADS"


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a container's
    `--cpus`, a pod's CPU limit), which torch's default thread count does not look at."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota(cgroup_root)
    return max(1, min(count, int(quota))) if quota is not None else count


def _cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs' worth of time per period from cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`; None if unlimited."""
    try:
        if (root / "cpu.max").is_file():
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu"
        if (v1 / "cpu.cfs_quota_us").is_file():
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            return None if quota <= 0 else quota / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        pass
    return None


def loader_workers(device: torch.device, requested: int) -> int:
    """Data-loader workers to use: `requested` on a GPU; on the CPU at most a quarter of the
    available CPUs (none on 2-3 cores), since every worker takes a core from the compute threads
    (`cpu_thread_budget`) while decoding costs ~5 % of a ViT-B/16 forward (BENCHMARKS.md)."""
    return requested if device.type != "cpu" else max(0, min(requested, available_cpus() // 4))


@contextlib.contextmanager
def cpu_thread_budget(device: torch.device, loader_workers: int = 0, processes: int = 1,
                      threads: int | None = None) -> Iterator[int]:
    """On the CPU, run the block with at most `available_cpus() / processes - loader_workers`
    (at least 1) torch threads, then restore the count; yields the count used. `processes`: how
    many processes share this machine's CPUs (under torch.distributed the ranks on this node,
    `DistributedContext.local_world_size`).

    OpenMP threads wait for each other at every parallel region, so compute threads whose cores
    loader workers, other ranks or a container's CPU quota take run no faster than fewer threads,
    and small operations much slower: measured on 2 cores with one other busy process, a tiny-model
    NoLA run took 6.9 s with 2 threads against 3.1 s with 1, and a ViT-B/16 fp32 forward ran at
    2.2 images/s either way (4.5 with 2 threads on idle cores). The budget only ever lowers the
    count; `threads` (`ComputeSettings.cpu_threads`, env `NOLA_CPU_THREADS` at the edges) sets it
    explicitly instead. GPUs are left alone.
    """
    before = torch.get_num_threads()
    if device.type != "cpu":
        yield before
        return
    if threads is not None:
        wanted = max(1, threads)
    else:
        wanted = min(before, max(1, available_cpus() // max(1, processes) - loader_workers))
    if wanted == before:
        yield before
        return
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(before)


def autocast_context(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA under `auto`; fp32 on CPU unless reduced precision is asked for
    (feature extraction resolves `auto` itself first: `acceleration.resolve_precision`)."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in dtypes:
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    return torch.autocast(device_type=device.type, dtype=dtypes[precision])


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for samplers."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path`, unique per process and call: renamed onto `path` when the
    block succeeds, deleted when it fails (full disk, crash in the writer), so readers only ever
    see the previous complete file or the new complete file, and no half-written temporary stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
