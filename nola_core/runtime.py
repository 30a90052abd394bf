"""Device, precision and seeding helpers shared by every stage (explicit, never global)."""

from __future__ import annotations

import contextlib
import os
import random
import uuid
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


def autocast_context(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA under `auto`; fp32 on CPU unless reduced precision is asked for."""
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
