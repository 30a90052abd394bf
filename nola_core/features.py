"""Batched, mixed-precision image feature extraction into float16 tables keyed by image id.

The store is one safetensors file per table: `features` [N, D] (float16), `ids` [N, W] (the
UTF-8 bytes of each image id, zero-padded), and the unreadable ids in the metadata. Loaded
with `mmap=True`, `features` is a torch tensor over a copy-on-write `numpy.memmap` of the
file's data section, so a 1.3 M × 768 table (2 GB) is paged in only where it is read: chunked
consumers (`alignment.class_log_odds`, `alignment.predict_alignment`,
`predictions.aligned_chunks` under `pipeline.stage_predictions`) stream over it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from nola_core.acceleration import reduced_precision
from nola_core.data import ImageRecord, ManifestImageDataset, collate_skipping_failures
from nola_core.runtime import atomic_output, cpu_thread_budget, loader_workers, resolve_device

logger = logging.getLogger(__name__)

STORE_FORMAT = "nola-features/2"
"""Version 2 keeps the ids in a uint8 tensor; version 1 (ids as JSON metadata) still loads.
safetensors caps its header at 100 MB, which 1.3 M JSON ids would nearly fill."""

_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "U8": np.uint8}


@dataclass(frozen=True)
class FeatureConfig:
    """How features are computed; none of these fields changes which images get features.

    `precision`: auto = bf16 autocast on CUDA, fp32 on CPU; "bf16" on a CPU with AVX-512 BF16 /
    AMX is 3-4x faster and matches fp32 to cosine >= 0.99 per image (tests/test_perf_precision.py),
    but is opt-in on CPU (see BENCHMARKS.md). `fused_attention` and `precast_weights` are the
    autocast-equivalent speed-ups of `nola_core.acceleration`, used when the module is known.
    """

    batch_size: int = 128
    num_workers: int = 2  # on the CPU at most a quarter of the cores (`runtime.loader_workers`)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    fused_attention: bool = True
    precast_weights: bool = True
    compile: bool = False
    """`torch.compile` the encoder with inductor's weight freezing (prepacked weights, fused
    GELU/casts): 1.4x for the ViT-B/16 forward on the 2-core CPU in bf16, for a one-time ~25 s
    per model (about 700 images' worth) and a C++ compiler. Only for frozen modules (no
    trainable parameter); the last batch is padded so one graph serves all batches."""
    compile_min_images: int = 2048
    """Calls with fewer images run eagerly even with `compile` (an incremental update of a few
    images must not pay a compilation)."""


@dataclass(frozen=True)
class FeatureTable:
    """Row i of `features` belongs to `ids[i]`; rows are in manifest order."""

    ids: tuple[str, ...]
    features: torch.Tensor  # [N, D], float16 unless asked otherwise; may be memory-mapped
    failed: tuple[str, ...] = ()  # image ids that could not be read at extraction time

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def row_index(self) -> dict[str, int]:
        return {image_id: row for row, image_id in enumerate(self.ids)}

    def rows_for(self, ids: Sequence[str]) -> torch.Tensor:
        """Rows of `ids`, in that order. A contiguous ascending run of rows (e.g. every id, or
        the unlabeled prefix) comes back as a view, so a memory-mapped table stays on disk."""
        rows = [self.row_index[image_id] for image_id in ids]
        if rows and rows[-1] - rows[0] == len(rows) - 1 and rows == list(range(rows[0], rows[-1] + 1)):
            return self.features[rows[0] : rows[-1] + 1]
        return self.features[rows]


def _loader_workers(config: FeatureConfig, num_records: int, device: torch.device) -> int:
    """Workers only pay when one batch can be decoded while another is encoded (and, on the CPU,
    when there are cores to spare: `runtime.loader_workers`)."""
    batches = -(-num_records // max(config.batch_size, 1))
    return max(0, min(loader_workers(device, config.num_workers), batches - 1))


@torch.inference_mode()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    root: Path,
    records: Sequence[ImageRecord],
    transform: Callable,
    config: FeatureConfig = FeatureConfig(),
    device: str | torch.device = "auto",
    progress: Callable[[int, int], None] | None = None,
    dtype: torch.dtype = torch.float16,
    module: nn.Module | None = None,
) -> FeatureTable:
    """Run `encode` over every record's image, in record order, under `torch.inference_mode`.

    `module`, when given, is the frozen network `encode` runs (e.g. `clip.visual`): under
    reduced precision its attention is fused and its weights pre-cast for the duration (see
    `nola_core.acceleration`; the module is restored after). Output rows go straight into one
    preallocated tensor. Unreadable images are dropped and reported in `failed`, never fatal.
    """
    device = resolve_device(device)
    dataset = ManifestImageDataset(Path(root), records, transform)
    workers = _loader_workers(config, len(records), device)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_skipping_failures,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    out: torch.Tensor | None = None
    kept: list[int] = []
    failed: list[int] = []
    done, started = 0, time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(cpu_thread_budget(device, workers))
        stack.enter_context(reduced_precision(module, device, config.precision, config.fused_attention,
                                              config.precast_weights))
        wanted = config.compile and len(records) >= config.compile_min_images
        run = _compiled(encode, module, stack) if wanted else encode
        for images, indices, batch_failed in loader:
            failed.extend(batch_failed)
            done += len(indices) + len(batch_failed)
            if images is not None and len(indices):
                images = images.to(device, non_blocking=True)
                if run is not encode and len(images) < config.batch_size:  # one graph, one batch shape
                    pad = images[:1].expand(config.batch_size - len(images), *images.shape[1:])
                    features = run(torch.cat([images, pad]))[: len(indices)]
                else:
                    features = run(images)
                if out is None:
                    out = torch.empty(len(records), *features.shape[1:], dtype=dtype)
                out[len(kept) : len(kept) + len(indices)] = features.float().cpu().to(dtype)
                kept.extend(indices.tolist())
            if progress is not None:
                progress(done, len(records))
    elapsed = time.perf_counter() - started
    logger.info("extracted %d features in %.1fs (%.1f images/s, %d workers), %d unreadable",
                len(kept), elapsed, len(kept) / max(elapsed, 1e-9), workers, len(failed))
    features = out[: len(kept)] if out is not None else torch.empty(0, 0, dtype=dtype)
    if out is not None and len(kept) < len(records):
        features = features.clone()  # do not keep the unused tail alive
    return FeatureTable(
        ids=tuple(records[i].image_id for i in kept),
        features=features,
        failed=tuple(records[i].image_id for i in failed),
    )


def _compiled(encode: Callable, module: nn.Module | None, stack: contextlib.ExitStack) -> Callable:
    """`encode` compiled by inductor with frozen weights, or `encode` itself where that is unsafe."""
    if module is None or any(p.requires_grad for p in module.parameters()):
        logger.warning("FeatureConfig.compile ignored: it needs the frozen module `encode` runs (module=...)")
        return encode
    import torch._inductor.config as inductor_config

    stack.enter_context(inductor_config.patch(freezing=True))
    return torch.compile(encode, dynamic=False)


def update_feature_table(
    previous: FeatureTable | None,
    records: Sequence[ImageRecord],
    extract: Callable[[Sequence[ImageRecord]], FeatureTable],
) -> tuple[FeatureTable, int]:
    """Features for `records` (in record order), computing only images `previous` lacks.

    Images are matched by content id, so renamed or moved files are reused; images no longer
    in `records` drop out; images that failed before are tried again. `previous` must come from
    the same model and preprocessing (it may be memory-mapped: only its kept rows are read).
    Returns the table and how many images were computed.
    """
    known = previous.row_index if previous is not None else {}
    todo = [r for r in records if r.image_id not in known]
    fresh = extract(todo) if todo else None
    if (fresh is None or not len(fresh)) and previous is None:
        raise ValueError("no features: nothing to reuse and no image could be read")
    fresh_rows = fresh.row_index if fresh is not None else {}
    kept = [r.image_id for r in records if r.image_id in known or r.image_id in fresh_rows]
    template = previous.features if previous is not None else fresh.features
    features = torch.empty(len(kept), *template.shape[1:], dtype=template.dtype)
    from_previous = [(i, known[image_id]) for i, image_id in enumerate(kept) if image_id in known]
    from_fresh = [(i, fresh_rows[image_id]) for i, image_id in enumerate(kept) if image_id not in known]
    for source, pairs in ((previous, from_previous), (fresh, from_fresh)):
        if pairs:
            target, rows = (torch.tensor(column) for column in zip(*pairs))
            features[target] = source.features[rows].to(features.dtype)
    table = FeatureTable(ids=tuple(kept), features=features, failed=fresh.failed if fresh is not None else ())
    logger.info("features: %d reused, %d computed, %d dropped", len(records) - len(todo), len(todo),
                len(known) - (len(records) - len(todo)))
    return table, len(todo)


def save_feature_table(table: FeatureTable, path: Path) -> None:
    """Safetensors (features, ids as bytes, failed ids in metadata); temp file, then renamed."""
    metadata = {"format": STORE_FORMAT, "failed": json.dumps(list(table.failed))}
    tensors = {"features": table.features.contiguous(), "ids": _encode_ids(table.ids)}
    with atomic_output(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def load_feature_table(path: Path, mmap: bool = False) -> FeatureTable:
    """Read a table; with `mmap`, `features` is backed by the file and paged in on access.

    The mapping is copy-on-write: writing to the tensor never changes the file.
    """
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        names = set(handle.keys())
        ids = _decode_ids(handle.get_tensor("ids")) if "ids" in names else tuple(json.loads(metadata["ids"]))
        features = None if mmap else handle.get_tensor("features")
    if mmap:
        features = _memmap_tensor(Path(path), "features")
    return FeatureTable(ids=ids, features=features, failed=tuple(json.loads(metadata.get("failed", "[]"))))


def _encode_ids(ids: Sequence[str]) -> torch.Tensor:
    encoded = [image_id.encode("utf-8") for image_id in ids]
    width = max((len(b) for b in encoded), default=1)
    if any(b.endswith(b"\0") for b in encoded):
        raise ValueError("image ids must not end in NUL bytes")
    array = np.frombuffer(b"".join(b.ljust(width, b"\0") for b in encoded), dtype=np.uint8)
    return torch.from_numpy(array.reshape(len(encoded), width).copy())


def _decode_ids(tensor: torch.Tensor) -> tuple[str, ...]:
    array = np.ascontiguousarray(tensor.numpy())
    if array.shape[0] == 0:
        return ()
    return tuple(b.decode("utf-8") for b in array.view(f"S{array.shape[1]}").ravel().tolist())


def _memmap_tensor(path: Path, name: str) -> torch.Tensor:
    """A torch view of one tensor of a safetensors file through `numpy.memmap` (mode "c")."""
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    entry = header[name]
    if entry["dtype"] not in _NUMPY_DTYPES:
        raise ValueError(f"{path}: {name} is {entry['dtype']}, which cannot be memory-mapped; load without mmap")
    start, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    dtype = _NUMPY_DTYPES[entry["dtype"]]
    if end == start:
        return torch.from_numpy(np.zeros(shape, dtype=dtype))
    array = np.memmap(path, dtype=dtype, mode="c", offset=8 + header_size + start, shape=shape)
    return torch.from_numpy(array)
