"""Batched, mixed-precision image feature extraction into float16 tables keyed by image id.

The store is one safetensors file per table: `features` [N, D] (float16), `ids` [N, W] and
`failed` [F, W'] (the UTF-8 bytes of each image id, zero-padded; `failed` are the unreadable
ones). A table never has to sit in RAM whole, neither when written nor when read:

- `FeatureTableWriter` appends rows to the file as they come: `extract_features(output=...)`
  writes each batch's rows there, and `update_feature_table(output=...)` / `write_feature_table`
  merge tables chunk by chunk (safetensors' `save_file` takes whole in-memory tensors).
- Loaded with `mmap=True`, `features` is a torch tensor over a copy-on-write `numpy.memmap` of
  the file's data section, so a 1.3 M × 768 table (2 GB) is paged in only where it is read:
  chunked consumers (`alignment.class_log_odds`, `alignment.predict_alignment`,
  `predictions.aligned_chunks` under `methods.nola.stage_predictions`) stream over it.
- A table in object storage (`load_feature_table("s3://…")`) is copied once, in ranged reads,
  into the local cache by its write-once key, and memory-mapped from there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import struct
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader

from nola_core.acceleration import reduced_precision, resolve_precision
from nola_core.data import ImageRecord, ManifestImageDataset, collate_skipping_failures
from nola_core.runtime import ComputeSettings, atomic_output, cpu_thread_budget, loader_workers, resolve_device
from nola_core.storage import DEFAULT_CACHE_DIR, fetch_cached, is_remote

logger = logging.getLogger(__name__)

STORE_FORMAT = "nola-features/3"
"""Version 3 keeps the failed ids in a uint8 tensor too, so the header has a fixed size and can
be written after the rows; version 2 (failed ids as JSON metadata) and version 1 (all ids as
JSON metadata) still load. safetensors caps its header at 100 MB, which 1.3 M JSON ids would
nearly fill."""

_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "U8": np.uint8,
                 "BF16": np.int16}  # numpy has no bfloat16: mapped as int16, viewed as bfloat16
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.float64: "F64"}
_HEADER_BYTES = 1016
"""Space reserved for the JSON header, padded with spaces as the format allows; 8 + 1016 puts
the rows at an 8-byte-aligned offset. The header holds only dtypes, shapes and offsets."""
ID_CHUNK = 65536
"""Ids encoded at once when a table's ids are written."""
MERGE_CHUNK_BYTES = 4 * 2**20
"""Bytes of rows copied at once when tables are merged (2,730 rows at 768 float16 dims)."""


@dataclass(frozen=True)
class FeatureConfig:
    """How features are computed; none of these fields changes which images get features.

    `compute` (`runtime.ComputeSettings`, shared with prompt tuning): loader workers, precision
    and speed-ups. Its `precision` auto = bf16 autocast on CUDA and on a CPU with native bf16
    (AVX-512 BF16 / AMX: 3-6x faster, features within the measured agreement bound of fp32,
    `acceleration.resolve_precision`), fp32 on other CPUs; "fp32" forces fp32 everywhere
    (env NOLA_PRECISION=fp32). `fused_attention` and `precast_weights` apply when the module is known.
    """

    batch_size: int = 128
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    compile: bool = False
    """`torch.compile` the encoder with inductor's weight freezing (prepacked weights, fused
    GELU/casts): 1.4x for the ViT-B/16 forward on the 2-core CPU in bf16, for a one-time ~25 s
    per model (about 700 images' worth) and a C++ compiler. Only for frozen modules (no
    trainable parameter); the last batch is padded so one graph serves all batches."""
    compile_min_images: int = 2048
    """Calls with fewer images run eagerly even with `compile` (an incremental update of a few
    images must not pay a compilation)."""
    backend: str = "torch"
    """torch | openvino | onnxruntime (CPU only, opt-in; `pip install 'nola[peers]'`): `encode`
    is exported to ONNX (fp32) once per call and run by that runtime, OpenVINO with its inference
    precision set to the resolved `precision` (onnxruntime: fp32 only). Features stay within the
    bf16 bound of torch fp32 (tests/test_precision_auto.py); speeds: BENCHMARKS.md, "Peers"."""

    def resolved_precision(self, device: torch.device) -> str:
        """The precision extraction runs at on `device` (`auto` resolved): what artifact keys hold
        (with the backend named when it is not torch, since its numbers differ)."""
        precision = resolve_precision(device, self.compute.precision, extraction=True)
        return precision if self.backend == "torch" else f"{self.backend}-{precision}"


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
    return max(0, min(loader_workers(device, config.compute.num_workers), batches - 1))


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
    output: Path | None = None,
    decode_min_side: int | None = None,
    processes: int = 1,
) -> FeatureTable:
    """Run `encode` over every record's image, in record order, under `torch.inference_mode`.

    `module`, when given, is the frozen network `encode` runs (e.g. `clip.visual`): under
    reduced precision its attention is fused and its weights pre-cast for the duration (see
    `nola_core.acceleration`; the module is restored after). Output rows go straight into one
    preallocated tensor, or with `output` batch by batch into that store file (written
    atomically; the table comes back memory-mapped), so RAM holds a batch, not the table.
    Unreadable images are dropped and reported in `failed`, never fatal. `decode_min_side`:
    the size `transform` resizes the shorter side to, so large JPEGs decode reduced
    (`data.load_rgb`'s `min_side`). `processes`: how many processes on this machine extract at
    once (`distributed.extract_features_distributed`'s ranks), which share its CPU threads.
    """
    device = resolve_device(device)
    dataset = ManifestImageDataset(Path(root), records, transform, decode_min_side=decode_min_side)
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
        writer = stack.enter_context(FeatureTableWriter(output, dtype)) if output is not None else None
        stack.enter_context(cpu_thread_budget(device, workers, processes, config.compute.cpu_threads))
        precision = resolve_precision(device, config.compute.precision, extraction=True)
        if config.backend != "torch":
            run = _RuntimeEncoder(encode, module, config.backend, precision, device)
        else:
            stack.enter_context(reduced_precision(module, device, precision, config.compute.fused_attention,
                                                  config.compute.precast_weights))
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
                rows = features.float().cpu().to(dtype)
                if writer is not None:
                    writer.append([records[i].image_id for i in indices.tolist()], rows)
                else:
                    if out is None:
                        out = torch.empty(len(records), *features.shape[1:], dtype=dtype)
                    out[len(kept) : len(kept) + len(indices)] = rows
                kept.extend(indices.tolist())
            if progress is not None:
                progress(done, len(records))
        if writer is not None:
            writer.failed.extend(records[i].image_id for i in failed)
    elapsed = time.perf_counter() - started
    logger.info("extracted %d features in %.1fs (%.1f images/s, %d workers), %d unreadable",
                len(kept), elapsed, len(kept) / max(elapsed, 1e-9), workers, len(failed))
    if output is not None:
        return load_feature_table(output, mmap=True)
    features = out[: len(kept)] if out is not None else torch.empty(0, 0, dtype=dtype)
    if out is not None and len(kept) < len(records):
        features = features.clone()  # do not keep the unused tail alive
    return FeatureTable(
        ids=tuple(records[i].image_id for i in kept),
        features=features,
        failed=tuple(records[i].image_id for i in failed),
    )


class _RuntimeEncoder:
    """`encode` exported to ONNX (fp32, dynamic batch) at its first batch and run by ONNX Runtime
    or OpenVINO on the CPU (`FeatureConfig.backend`)."""

    def __init__(self, encode: Callable, module: nn.Module | None, backend: str, precision: str, device: torch.device):
        if backend not in ("openvino", "onnxruntime"):
            raise ValueError(f"unknown backend {backend!r}; choose torch, openvino or onnxruntime")
        if device.type != "cpu":
            raise ValueError(f"backend {backend!r} runs on the CPU only, not {device}")
        if backend == "onnxruntime" and precision != "fp32":
            raise ValueError("backend 'onnxruntime' runs fp32 only: set precision='fp32'")
        self.encode, self.module, self.backend, self.precision = encode, module, backend, precision
        self.session: Callable[[np.ndarray], np.ndarray] | None = None

    def _export(self, example: torch.Tensor) -> Callable[[np.ndarray], np.ndarray]:
        import tempfile
        import warnings

        from nola_core.acceleration import fused_attention

        class Encode(nn.Module):
            def __init__(self, encode, module):
                super().__init__()
                self.module, self.run = module, encode

            def forward(self, images):
                return self.run(images)

        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings
            path = Path(folder) / "encode.onnx"
            with torch.autocast("cpu", enabled=False), (
                    fused_attention(self.module) if self.module is not None else contextlib.nullcontext()):
                torch.onnx.export(Encode(self.encode, self.module), (example[:1].float(),), str(path), dynamo=False,
                                  opset_version=17, input_names=["images"], output_names=["features"],
                                  dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
            if self.backend == "onnxruntime":
                import onnxruntime

                session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                return lambda images: session.run(None, {"images": images})[0]
            import openvino

            hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[self.precision]
            compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint})
            return lambda images: compiled(images)[0]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.session is None:
            self.session = self._export(images)
        return torch.from_numpy(np.asarray(self.session(images.float().numpy()), dtype=np.float32))


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
    output: Path | None = None,
) -> tuple[FeatureTable, int]:
    """Features for `records` (in record order), computing only images `previous` lacks.

    Images are matched by content id, so renamed or moved files are reused; images no longer
    in `records` drop out; images that failed before are tried again. `previous` must come from
    the same model and preprocessing (it may be memory-mapped: only its kept rows are read).
    With `output`, the table is written there chunk by chunk and returned memory-mapped (it may
    be the file `previous` maps: that mapping stays valid). Returns the table and how many
    images were computed.
    """
    known = previous.row_index if previous is not None else {}
    todo = [r for r in records if r.image_id not in known]
    fresh = extract(todo) if todo else None
    if (fresh is None or not len(fresh)) and previous is None:
        raise ValueError("no features: nothing to reuse and no image could be read")
    fresh_rows = fresh.row_index if fresh is not None else {}
    kept = [r.image_id for r in records if r.image_id in known or r.image_id in fresh_rows]
    failed = fresh.failed if fresh is not None else ()
    sources = [table for table in (previous, fresh) if table is not None]
    dtype = sources[0].features.dtype
    if output is not None:
        table = write_feature_table(output, kept, sources, failed, dtype)
    else:
        features, done = torch.empty(len(kept), *_row_shape(sources), dtype=dtype), 0
        for chunk, rows in merged_chunks(kept, sources, dtype):
            features[done : done + len(chunk)] = rows
            done += len(chunk)
        table = FeatureTable(ids=tuple(kept), features=features, failed=failed)
    logger.info("features: %d reused, %d computed, %d dropped", len(records) - len(todo), len(todo),
                len(known) - (len(records) - len(todo)))
    return table, len(todo)


def table_rows(table: FeatureTable, ids: Sequence[str]) -> torch.Tensor:
    """[len(ids)] long: the row of each id in `table`, -1 where the table lacks it."""
    return torch.tensor([table.row_index.get(image_id, -1) for image_id in ids], dtype=torch.long)


def merged_chunks(
    ids: Sequence[str], sources: Sequence[FeatureTable], dtype: torch.dtype, chunk_bytes: int = MERGE_CHUNK_BYTES
) -> Iterator[tuple[Sequence[str], torch.Tensor]]:
    """(ids, their rows as `dtype`) about `chunk_bytes` of rows at a time, each row from the
    first of `sources` that holds it; only one chunk's rows are read at once (sources may be mapped)."""
    width = _row_shape(sources)
    row_bytes = math.prod(width) * torch.empty(0, dtype=dtype).element_size()
    chunk_size = max(1, chunk_bytes // max(row_bytes, 1))
    for start in range(0, len(ids), chunk_size):
        chunk = ids[start : start + chunk_size]
        rows = torch.empty(len(chunk), *width, dtype=dtype)
        filled = torch.zeros(len(chunk), dtype=torch.bool)
        for source in sources:
            found = table_rows(source, chunk)
            take = (found >= 0) & ~filled
            if bool(take.any()):
                rows[take] = source.features[found[take]].to(dtype)
                filled |= take
        if not bool(filled.all()):
            missing = [image_id for image_id, ok in zip(chunk, filled.tolist()) if not ok]
            raise KeyError(f"{len(missing)} id(s) in no source table, e.g. {missing[:3]}")
        yield chunk, rows


def _row_shape(tables: Sequence[FeatureTable]) -> tuple[int, ...]:
    """The shape of a row, the same in every non-empty table."""
    shapes = {tuple(table.features.shape[1:]) for table in tables if len(table)}
    if len(shapes) > 1:
        raise ValueError(f"tables of different widths cannot be merged: {sorted(shapes)}")
    return shapes.pop() if shapes else tuple(tables[0].features.shape[1:])


def write_feature_table(
    path: Path, ids: Sequence[str], sources: Sequence[FeatureTable], failed: Sequence[str] = (),
    dtype: torch.dtype | None = None,
) -> FeatureTable:
    """Write the table of `ids` (in that order, rows from `sources`, see `merged_chunks`) to
    `path` chunk by chunk; return it memory-mapped."""
    dtype = dtype or sources[0].features.dtype
    with FeatureTableWriter(path, dtype) as writer:
        for chunk, rows in merged_chunks(ids, sources, dtype):
            writer.append(chunk, rows)
        writer.failed.extend(failed)
    return load_feature_table(path, mmap=True)


class FeatureTableWriter:
    """Appends rows to a store file as they come, so no table has to sit in RAM whole.

    `with FeatureTableWriter(path) as writer: writer.append(ids, rows); writer.failed.append(id)`.
    The rows go to a temporary file at once; on leaving the block, the ids, the failed ids and
    the header (written last, into space reserved up front) complete it and it is renamed onto
    `path`. On an error nothing at `path` changes. The result is a plain safetensors file.
    """

    def __init__(self, path: Path, dtype: torch.dtype = torch.float16):
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"feature tables hold {sorted(map(str, _SAFETENSORS_DTYPES))}, not {dtype}")
        self.path, self.dtype = Path(path), dtype
        self.ids: list[str] = []
        self.failed: list[str] = []
        self._width: tuple[int, ...] | None = None

    def __enter__(self) -> "FeatureTableWriter":
        self._stack = contextlib.ExitStack()
        temporary = self._stack.enter_context(atomic_output(self.path))
        self._file = self._stack.enter_context(open(temporary, "wb"))
        self._file.write(bytes(8 + _HEADER_BYTES))
        return self

    def append(self, ids: Sequence[str], rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", self.dtype).contiguous()
        if rows.ndim < 1 or len(ids) != rows.shape[0]:
            raise ValueError(f"{len(ids)} ids for rows of shape {tuple(rows.shape)}")
        if self._width is None:
            self._width = tuple(rows.shape[1:])
        elif tuple(rows.shape[1:]) != self._width:
            raise ValueError(f"rows of shape {tuple(rows.shape[1:])} after rows of shape {self._width}")
        self._file.write(rows.view(-1).view(torch.uint8).numpy())
        self.ids.extend(ids)

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:  # the block failed: the temporary file goes, `path` is untouched
            self._stack.__exit__(kind, error, traceback)
            return
        with self._stack:  # renamed onto `path` only if finishing succeeds
            self._finish()

    def _finish(self) -> None:
        rows_end = self._file.tell() - 8 - _HEADER_BYTES
        header: dict = {"__metadata__": {"format": STORE_FORMAT},
                        "features": {"dtype": _SAFETENSORS_DTYPES[self.dtype],
                                     "shape": [len(self.ids), *(self._width or (0,))],
                                     "data_offsets": [0, rows_end]}}
        offset = rows_end
        for name, ids in (("ids", self.ids), ("failed", self.failed)):
            width = max((len(image_id.encode("utf-8")) for image_id in ids), default=1)
            for start in range(0, len(ids), ID_CHUNK):  # the bytes of 1.3 M ids never exist at once
                self._file.write(_encode_ids(ids[start : start + ID_CHUNK], width))
            header[name] = {"dtype": "U8", "shape": [len(ids), width],
                            "data_offsets": [offset, offset + len(ids) * width]}
            offset += len(ids) * width
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > _HEADER_BYTES:
            raise RuntimeError(f"feature table header of {len(text)} bytes exceeds the {_HEADER_BYTES} reserved")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", _HEADER_BYTES) + text.ljust(_HEADER_BYTES, b" "))


def save_feature_table(table: FeatureTable, path: Path) -> None:
    """Write `table` (features, ids and failed ids) to `path` atomically (`FeatureTableWriter`)."""
    with FeatureTableWriter(path, table.features.dtype) as writer:
        writer.append(table.ids, table.features)
        writer.failed.extend(table.failed)


def load_feature_table(path: str | Path, mmap: bool = False, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> FeatureTable:
    """Read a table; with `mmap`, `features` is backed by the file and paged in on access.

    The mapping is copy-on-write: writing to the tensor never changes the file. `path` may be the
    URL of a table in object storage (`s3://…`): it is read through its local copy under
    `cache_dir`, fetched once by key in ranged reads (`nola_core.storage.fetch_cached`), never
    whole into RAM.
    """
    path = fetch_cached(str(path), cache_dir) if is_remote(str(path)) else path
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        names = set(handle.keys())
        ids = _decode_ids(handle.get_tensor("ids")) if "ids" in names else tuple(json.loads(metadata["ids"]))
        failed = (_decode_ids(handle.get_tensor("failed")) if "failed" in names
                  else tuple(json.loads(metadata.get("failed", "[]"))))
        features = None if mmap else handle.get_tensor("features")
    if mmap:
        features = _memmap_tensor(Path(path), "features")
    return FeatureTable(ids=ids, features=features, failed=failed)


def _encode_ids(ids: Sequence[str], width: int) -> bytes:
    """The rows of a [len(ids), width] uint8 tensor: each id's UTF-8 bytes, zero-padded."""
    encoded = [image_id.encode("utf-8") for image_id in ids]
    if any(b.endswith(b"\0") for b in encoded):
        raise ValueError("image ids must not end in NUL bytes")
    return b"".join(b.ljust(width, b"\0") for b in encoded)


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
    array = (np.zeros(shape, dtype=dtype) if end == start
             else np.memmap(path, dtype=dtype, mode="c", offset=8 + header_size + start, shape=shape))
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if entry["dtype"] == "BF16" else tensor
