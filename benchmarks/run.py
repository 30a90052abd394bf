"""Throughput benchmarks of nola: naive loop vs the project's path, in one run.

    .venv/bin/python -m benchmarks.run                 # real ViT-B/16 CLIP + DINO (random weights)
    .venv/bin/python -m benchmarks.run --size tiny     # tiny models, a minute: what CI runs

Writes `benchmarks/results.json` (machine, settings, every figure) and refreshes the results
table in `BENCHMARKS.md` (between the `results:start` / `results:end` markers). Each measured
phase runs in its own child process, so its peak RSS is its own and one phase's allocator or
thread state cannot speed up or slow down the next. Images are generated from the demo
dataset's real pictures (`benchmarks/images.py`), JPEG, 224-320 px on the short side.

Figures: feature extraction (naive: PIL per image in the main process, fp32, batch 32, no
workers; ours: `data.loading.image_features` with workers, batching and reduced precision),
prompt-tuning steps (naive: fp32, MHA's own path, no workers; ours: bf16 autocast with fused
attention and pre-cast frozen weights, workers; and ours with fixed pseudo-labels), peak memory
per phase, matmul throughput and the compute-bound limit of a ViT-B/16 forward (35.1 GFLOPs
per 224 px image), the end-to-end `run_nola` time, the cost of adding 1 % new images, the
CLIP image tower's forward under ONNX Runtime and OpenVINO beside torch's (peers: same batch,
interleaved rounds, cosine to torch fp32; skipped with the reason when a peer is not installed,
`pip install 'nola[peers]'`), and the projected wall time of a full NoLA run per 1,000 images
at the paper's settings, by stage (`cost_projection`). `--size small` runs the paper's models
on 192 images (minutes). These are measurements, not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VIT_B16_FLOPS = 2 * 17.58e9
"""Multiply-adds of one 224 px ViT-B/16 forward (timm: 17.58 GMACs), counted as 2 FLOPs each."""
NAIVE_BATCH = 32
MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass(frozen=True)
class Size:
    models: str  # "paper" architectures with random weights, or "tiny"
    extraction_images: int  # the dataset every extraction figure is measured on
    naive_images: int  # the naive loop's share of it (its rate is steady; it is slow)
    train_steps: int  # optimizer steps of NAIVE_BATCH images per training variant
    end_to_end_images: int
    end_to_end_epochs: tuple[int, int] | None  # (alignment, tuning); None = the paper's 50 / 50
    matmul_seconds: float
    alignment_images: int = 1000  # the cost projection's alignment stage is measured at this N
    cpu_square_sides: tuple[int, ...] = (1024, 2048, 4096)  # the CPU's square products (n x n x n)


SIZES = {
    "full": Size("paper", 960, 128, 2, 200, None, 1.5),
    "small": Size("paper", 192, 32, 1, 40, (5, 1), 0.6),  # the paper's models in a few minutes
    # tiny: no 4096^3 product (its six fp32 runs were half of the smoke test's matmul phase)
    "tiny": Size("tiny", 100, 32, 1, 40, (5, 1), 0.2, alignment_images=100, cpu_square_sides=(1024, 2048)),
}
PEER_BATCH = 16
"""Images per forward in the peers comparison (one preprocessed batch, shared by every runtime)."""
PEER_ROUNDS = 4
"""Rounds of the peers comparison; each round times every variant once, in turn (A B C A B C)."""
COST_IMAGES = 1000
"""The cost projection is stated per this many images."""


# ---------------------------------------------------------------------------------------------
# Measuring helpers (used in the child processes)


def _cpu_busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (0, 0 where unavailable)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


class Timer:
    """Wall time, this process tree's CPU time, and what other processes took meanwhile."""

    def __enter__(self):
        self.busy0, self.total0 = _cpu_busy_jiffies()
        self.times0 = os.times()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        times = os.times()
        ours = sum(getattr(times, f) - getattr(self.times0, f)
                   for f in ("user", "system", "children_user", "children_system"))
        busy, total = _cpu_busy_jiffies()
        ticks = os.sysconf("SC_CLK_TCK")
        capacity = (total - self.total0) / ticks
        others = max(0.0, (busy - self.busy0) / ticks - ours)
        self.other_load = others / capacity if capacity > 0 else None


def _timed(seconds: float, images: int, timer: Timer) -> dict:
    return {"seconds": round(seconds, 3), "images": images, "images_per_s": round(images / seconds, 3),
            "cpu_taken_by_other_processes": None if timer.other_load is None else round(timer.other_load, 3)}


def _peak_memory(device) -> dict:
    import torch

    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    # A forked loader worker's RSS counts the pages it shares with this process, and ru_maxrss
    # survives exec, so the children's figure overstates their own memory; kept for reference.
    return {"rss_mib": round(self_kb / 1024, 1), "largest_child_rss_mib_incl_shared": round(children_kb / 1024, 1),
            "gpu_mib": None if gpu is None else round(gpu, 1)}


def _models(size: Size, device):
    from nola_core.models import ModelConfig, load_clip, load_dino

    if size.models == "tiny":
        config = ModelConfig.from_profile("tiny")
    else:  # the paper's architectures, randomly initialised: speed does not depend on weight values
        config = ModelConfig(clip_pretrained=None, dino_pretrained=False)
    return config, load_clip(config, device), load_dino(config, device)


def _towers(clip, dino):
    return {"clip": (clip, clip.visual), "dino": (dino, dino.model)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _records(root: Path, limit: int | None = None):
    from nola_core.data.loading import load_dataset

    _, manifest, _ = load_dataset(root)
    return list(manifest.records[:limit] if limit else manifest.records)


# ---------------------------------------------------------------------------------------------
# Phases (each runs in a child process and returns a JSON-able dict)


def phase_matmul(options, size: Size, device) -> dict:
    import torch

    from nola_core.acceleration import cpu_supports_bf16

    sides = (4096, 8192) if device.type == "cuda" else size.cpu_square_sides
    square = [(n, n, n) for n in sides]
    tokens = options.batch_size * 197  # the linear layers of a ViT-B/16 at our batch size (m, k, n)
    vit = [(tokens, 768, 2304), (tokens, 768, 768), (tokens, 768, 3072), (tokens, 3072, 768)]
    result = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
            # Emulated bf16 is orders of magnitude slower (one 2048^2 product took over 100 s on an
            # AVX2-only EPYC): no limit worth stating, and the run would not end.
            result[name] = {"skipped": "this CPU has no native bf16 (AVX-512 BF16 / AMX)"}
            continue
        per_shape = {}
        for m, k, n in square + vit:
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            best = 0.0
            for _ in range(3):
                a @ b
                _sync(device)
                runs, start = 0, time.perf_counter()
                while time.perf_counter() - start < size.matmul_seconds / 3:
                    a @ b
                    runs += 1
                _sync(device)
                best = max(best, 2 * m * k * n * runs / (time.perf_counter() - start))
            per_shape[f"{m}x{k}x{n}"] = round(best / 1e9, 1)
        peak = max(per_shape.values())
        # Time-weighted rate of the ViT's own linear shapes (95 % of its FLOPs): a sharper bound.
        flops = [2 * m * k * n for m, k, n in vit]
        seconds = sum(f / (per_shape[f"{m}x{k}x{n}"] * 1e9) for f, (m, k, n) in zip(flops, vit))
        vit_rate = sum(flops) / seconds / 1e9
        result[name] = {"gflops_by_shape": per_shape, "peak_gflops": peak,
                        "vit_b16_limit_images_per_s": round(peak * 1e9 / VIT_B16_FLOPS, 2),
                        "vit_linear_shapes_gflops": round(vit_rate, 1),
                        "vit_b16_limit_at_vit_shapes_images_per_s": round(vit_rate * 1e9 / VIT_B16_FLOPS, 2)}
    if device.type == "cuda":
        result["note"] = "fp32 on CUDA may use TF32 where torch allows it"
    return result


def phase_naive_extraction(options, size: Size, device) -> dict:
    """The reference code's loop: PIL per image, fp32, batch 32, one process, no workers."""
    import torch
    from PIL import Image

    from nola_core.data import eval_transform

    _, clip, dino = _models(size, device)
    records = _records(options.dataset, size.naive_images)
    result = {}
    for name, (model, _) in _towers(clip, dino).items():
        transform = eval_transform(model.preprocess)
        paths = [options.dataset / r.path for r in records]
        with torch.no_grad():  # warm-up: one-time kernel selection, excluded
            model.encode_image(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[:2]]).to(device))
        rows = []
        with Timer() as timer, torch.no_grad():
            for start in range(0, len(paths), NAIVE_BATCH):
                batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start : start + NAIVE_BATCH]])
                rows.append(model.encode_image(batch.to(device)).float().cpu())
            _sync(device)
        result[name] = _timed(timer.seconds, len(torch.cat(rows)), timer)
    result["peak_memory"] = _peak_memory(device)
    return result


def _feature_config(options, compile_everything: bool = False):
    """Ours; `compile_everything` compiles even below `compile_min_images` (the extraction phase
    measures a large job's steady state on a small set; the incremental rerun keeps the default)."""
    import dataclasses

    from nola_core.features import FeatureConfig
    from nola_core.runtime import ComputeSettings

    config = FeatureConfig(batch_size=options.batch_size, compile=options.compile,
                           compute=ComputeSettings(num_workers=options.workers, precision=options.precision,
                                                   cpu_threads=options.threads or None))
    return dataclasses.replace(config, compile_min_images=0) if compile_everything else config


def phase_extraction(options, size: Size, device) -> dict:
    """The project's path, `data.loading.image_features`, over the whole dataset, written to the
    store file batch by batch as the assets do; before it, the manifest scan, with one thread
    and with the default threads."""
    from nola_core.data import build_manifest, load_dataset_spec
    from nola_core.data.manifest import scan_workers
    from nola_core.data.loading import image_features, load_dataset

    _, clip, dino = _models(size, device)
    config = _feature_config(options, compile_everything=True)
    spec = load_dataset_spec(options.dataset)
    with Timer() as serial_scan:  # the naive scan: one file after another
        build_manifest(spec, "unlabeled", workers=1)
    with Timer() as scan:
        spec, manifest, _ = load_dataset(options.dataset)
    manifest.to_polars().write_parquet(options.work / "manifest.parquet")
    records = list(manifest.records)
    result = {"manifest_scan": {**_timed(scan.seconds, len(records), scan), "threads": scan_workers()},
              "manifest_scan_one_thread": _timed(serial_scan.seconds, len(records), serial_scan)}
    for name, (model, _) in _towers(clip, dino).items():
        with Timer() as warm:  # warm-up (and compilation, with --compile), reported apart
            image_features(model, spec.root, records[:2], config, device)
        with Timer() as timer:
            table = image_features(model, spec.root, records, config, device,
                                   output=options.work / f"{name}_features.safetensors")
            _sync(device)
        result[name] = {**_timed(timer.seconds, len(table), timer), "warm_up_seconds": round(warm.seconds, 2),
                        "images_per_s_including_warm_up": round(len(table) / (timer.seconds + warm.seconds), 3)}
    result["peak_memory"] = _peak_memory(device)
    return result


def phase_incremental(options, size: Size, device) -> dict:
    """Rerun after new images landed: rescan (reusing file stats), load, extract the new, merge, save."""
    import polars as pl

    from nola_core.data import Manifest, build_manifest
    from nola_core.features import load_feature_table, update_feature_table
    from nola_core.data.loading import image_features, load_dataset

    _, clip, dino = _models(size, device)
    config = _feature_config(options)
    spec, _, _ = load_dataset(options.dataset)
    previous_manifest = Manifest.from_polars(pl.read_parquet(options.work / "manifest.parquet"))
    image_features(clip, spec.root, list(previous_manifest.records[:2]), config, device)  # warm-up, excluded
    image_features(dino, spec.root, list(previous_manifest.records[:2]), config, device)
    computed = {}
    with Timer() as timer:
        manifest = build_manifest(spec, "unlabeled", previous=previous_manifest)
        for name, (model, _) in _towers(clip, dino).items():
            path = options.work / f"{name}_features.safetensors"
            previous = load_feature_table(path, mmap=True)
            table, computed[name] = update_feature_table(
                previous, manifest.records, lambda todo, model=model: image_features(model, spec.root, todo, config, device),
                output=path.with_name(f"{name}_features.next.safetensors"))  # merged chunk by chunk, as the assets do
        _sync(device)
    return {"previous_images": len(previous_manifest), "images": len(manifest), "computed": computed,
            "rerun": _timed(timer.seconds, len(manifest), timer), "peak_memory": _peak_memory(device)}


def _training(options, size: Size, device, variant: str) -> dict:
    import dataclasses

    import torch

    from nola_core.alignment import alignment_network
    from nola_core.data import MultiView
    from nola_core.methods.nola import dino_pseudo_labeller, tuning_views
    from nola_core.tuning import build_prompt_classifier
    from nola_core.runtime import ComputeSettings
    from nola_core.tuning import TuningConfig, train_prompts

    _, clip, dino = _models(size, device)
    records = _records(options.dataset, NAIVE_BATCH * size.train_steps)
    generator = torch.Generator().manual_seed(0)
    cde = torch.nn.functional.normalize(torch.randn(4, clip.embed_dim, generator=generator), dim=-1)
    dl_network = alignment_network(dino.feature_dim, 4)
    views = tuning_views(clip, dino)
    labeller = dino_pseudo_labeller(dino, dl_network, device)
    if variant == "naive":  # fp32, MHA's own path, no pre-cast, full decodes in the main process
        config = TuningConfig(compute=ComputeSettings(precision="fp32", fused_attention=False, precast_weights=False,
                                                      num_workers=0, cpu_threads=options.threads or None))
        views = MultiView(views.transforms)
    else:
        config = TuningConfig(fixed_pseudo_labels=variant == "fixed",
                              compute=ComputeSettings(precision=options.precision, num_workers=options.workers,
                                                      cpu_threads=options.threads or None))
    config = dataclasses.replace(config, epochs=1, batch_size=NAIVE_BATCH, micro_batch_size=NAIVE_BATCH)

    def run(subset):
        classifier = build_prompt_classifier(clip, cde, config)
        fixed = torch.randint(0, 4, (len(subset),), generator=generator) if config.fixed_pseudo_labels else None
        train_prompts(classifier, options.dataset, subset, views, labeller, config, device,
                      fixed_labels=fixed, frozen_modules=(dino.model,))

    run(records[:4])  # warm-up, excluded
    with Timer() as timer:
        run(records)
        _sync(device)
    return {**_timed(timer.seconds, len(records), timer), "peak_memory": _peak_memory(device),
            "config": {**asdict(config.compute), "fixed_pseudo_labels": config.fixed_pseudo_labels,
                       "micro_batch_size": config.micro_batch_size}}


def phase_training_naive(options, size, device):
    return _training(options, size, device, "naive")


def phase_training(options, size, device):
    return _training(options, size, device, "ours")


def phase_training_fixed(options, size, device):
    return _training(options, size, device, "fixed")


def phase_end_to_end(options, size: Size, device) -> dict:
    """`run_nola` on a generated dataset with the tiny models (the real ones would take hours here)."""
    import dataclasses

    from nola_core.models import ModelConfig
    from nola_core.methods.nola import NolaConfig, run_nola

    config = NolaConfig(models=ModelConfig.from_profile("tiny"), features=_feature_config(options),
                        device=str(device))
    compute = dataclasses.replace(config.tuning.compute, num_workers=options.workers, cpu_threads=options.threads or None)
    config = dataclasses.replace(config, tuning=dataclasses.replace(config.tuning, compute=compute))
    if size.end_to_end_epochs is not None:
        alignment_epochs, tuning_epochs = size.end_to_end_epochs
        config = dataclasses.replace(config, alignment=dataclasses.replace(config.alignment, epochs=alignment_epochs),
                                     tuning=dataclasses.replace(config.tuning, epochs=tuning_epochs))
    with Timer() as timer:
        result = run_nola(options.end_to_end_dataset, config)
    return {**_timed(timer.seconds, len(result.manifest), timer), "models": "tiny (nola-tiny-clip, nola-tiny-dino)",
            "alignment_epochs": config.alignment.epochs, "tuning_epochs": config.tuning.epochs,
            "peak_memory": _peak_memory(device)}


def _peer_sessions(onnx_path: Path) -> tuple[dict, dict]:
    """{variant: run(batch ndarray) -> ndarray} for the installed peers; {variant: why skipped}."""
    runners, skipped = {}, {}
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        runners["onnxruntime_fp32"] = lambda x, session=session: session.run(None, {"images": x})[0]
    except ImportError:
        skipped["onnxruntime_fp32"] = "onnxruntime is not installed (pip install 'nola[peers]')"
    try:
        import openvino

        core = openvino.Core()
        for name, hint in (("fp32", "f32"), ("bf16", "bf16")):
            if name == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                skipped["openvino_bf16"] = "OpenVINO reports no bf16 on this CPU"
                continue
            compiled = core.compile_model(str(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": hint})
            runners[f"openvino_{name}"] = lambda x, compiled=compiled: compiled(x)[0]
    except ImportError:
        skipped["openvino_fp32"] = skipped["openvino_bf16"] = "openvino is not installed (pip install 'nola[peers]')"
    return runners, skipped


def phase_peers(options, size: Size, device) -> dict:
    """The CLIP image tower's forward under torch (fp32; ours: `acceleration.reduced_precision`,
    eager) and under ONNX Runtime and OpenVINO, on one batch of real preprocessed images, timed
    in interleaved rounds so the machine's load falls on every variant alike; agreement: per-image
    cosine of each output to torch fp32's."""
    import statistics
    import warnings

    import numpy as np
    import torch
    import torch.nn.functional as F

    from nola_core.acceleration import fused_attention, reduced_precision
    from nola_core.data import eval_transform, load_rgb

    if device.type != "cpu":
        return {"skipped": "the peers comparison runs on the CPU only (TensorRT is not wired in)"}
    _, clip, _ = _models(size, device)
    tower = clip.visual.eval()
    transform = eval_transform(clip.preprocess)
    images = torch.stack([transform(load_rgb(options.dataset / r.path)) for r in _records(options.dataset, PEER_BATCH)])
    onnx_path = options.work / "clip_visual.onnx"
    with warnings.catch_warnings(), torch.no_grad(), fused_attention(tower):  # MHA's fused kernel has no ONNX op
        warnings.simplefilter("ignore")
        torch.onnx.export(tower, (images[:1],), str(onnx_path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    runners, skipped = _peer_sessions(onnx_path)
    batch = images.numpy()

    def torch_fp32(_):
        with torch.inference_mode():
            return tower(images).numpy()

    def torch_ours(_):
        with torch.inference_mode(), reduced_precision(tower, device, options.precision):
            return tower(images).float().numpy()

    variants = {"torch_fp32": torch_fp32, f"torch_ours_{options.precision}": torch_ours, **runners}
    outputs = {name: np.asarray(run(batch), dtype=np.float32) for name, run in variants.items()}  # warm-up
    seconds = {name: [] for name in variants}
    load = [os.getloadavg()[0]]
    with Timer() as timer:
        for _ in range(PEER_ROUNDS):
            for name, run in variants.items():
                start = time.perf_counter()
                run(batch)
                seconds[name].append(time.perf_counter() - start)
    load.append(os.getloadavg()[0])
    reference = torch.from_numpy(outputs["torch_fp32"])
    rows = {}
    for name in variants:
        cosine = F.cosine_similarity(torch.from_numpy(outputs[name]), reference)
        median = statistics.median(seconds[name])
        rows[name] = {"images_per_s": round(PEER_BATCH / median, 3), "seconds_per_batch": [round(t, 3) for t in seconds[name]],
                      "min_cosine_to_torch_fp32": round(float(cosine.min()), 6),
                      "mean_cosine_to_torch_fp32": round(float(cosine.mean()), 6)}
    return {"batch": PEER_BATCH, "rounds": PEER_ROUNDS, "tower": "CLIP image tower (clip.visual)", "variants": rows,
            "skipped": skipped, "load_average_1min": load,
            "cpu_taken_by_other_processes": None if timer.other_load is None else round(timer.other_load, 3),
            "versions": _peer_versions()}


def _peer_versions() -> dict:
    import importlib.metadata

    versions = {}
    for package in ("onnxruntime", "openvino"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def phase_alignment(options, size: Size, device) -> dict:
    """NoLA's stage between extraction and tuning at the paper's settings, on `size.alignment_images`:
    CDE scores + top-k per class over CLIP features, then the DL network's 50 epochs on DINO
    features (`methods.nola.cde_pseudo_labels`, `alignment.train_alignment`). Features are random:
    the cost depends on the shapes (ViT-B/16: 512 / 768 dims), not the values."""
    import torch

    from nola_core.alignment import AlignmentConfig, train_alignment
    from nola_core.methods.nola import cde_pseudo_labels

    images = size.alignment_images
    classes = min(options.cost_classes, images // 10)
    generator = torch.Generator().manual_seed(0)
    clip_features = torch.nn.functional.normalize(torch.randn(images, 512, generator=generator), dim=-1)
    dino_features = torch.randn(images, 768, generator=generator)
    cde = torch.nn.functional.normalize(torch.randn(classes, 512, generator=generator), dim=-1)
    config = AlignmentConfig()
    with Timer() as timer:
        selection = cde_pseudo_labels(clip_features, cde, config)
        train_alignment(dino_features, selection, config, device, cpu_threads=options.threads or None)
    return {**_timed(timer.seconds, images, timer), "classes": classes, "k": selection.k,
            "epochs": config.epochs, "selected": int(selection.indices.numel())}


PHASES = {
    "matmul": phase_matmul,
    "naive_extraction": phase_naive_extraction,
    "extraction": phase_extraction,
    "incremental": phase_incremental,
    "training_naive": phase_training_naive,
    "training": phase_training,
    "training_fixed": phase_training_fixed,
    "end_to_end": phase_end_to_end,
    "peers": phase_peers,
    "alignment": phase_alignment,
}


# ---------------------------------------------------------------------------------------------
# The parent: data, children, results, markdown


def machine_info(device_name: str) -> dict:
    import torch

    from nola_core.acceleration import cpu_supports_bf16

    flags, model_name = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info = {
        "cpu": model_name, "logical_cpus": os.cpu_count(), "memory_gib": memory,
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"}),
        "cpu_native_bf16": cpu_supports_bf16(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(), "device": device_name,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def wait_for_quiet_cpu(limit_s: float, busy_below: float = 0.15, seconds: int = 5) -> float:
    """Wait (at most `limit_s`) until the whole machine is under `busy_below` busy for `seconds`
    consecutive seconds; returns the seconds waited. On a shared machine this keeps other
    sessions' bursts out of the start of a phase (their share is reported either way)."""
    started, quiet = time.perf_counter(), 0
    busy0, total0 = _cpu_busy_jiffies()
    while quiet < seconds and time.perf_counter() - started < limit_s:
        time.sleep(1)
        busy, total = _cpu_busy_jiffies()
        quiet = quiet + 1 if total > total0 and (busy - busy0) / (total - total0) < busy_below else 0
        busy0, total0 = busy, total
    return round(time.perf_counter() - started, 1)


def run_child(phase: str, options, work: Path) -> dict:
    command = [sys.executable, "-m", "benchmarks.run", "--phase", phase, "--size", options.size,
               "--work-dir", str(work), "--device", options.device, "--precision", options.precision,
               "--batch-size", str(options.batch_size), "--workers", str(options.workers)]
    if options.threads:
        command += ["--threads", str(options.threads)]
    command.append("--compile" if options.compile else "--no-compile")
    command += ["--cost-classes", str(options.cost_classes)]
    environment = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    waited = wait_for_quiet_cpu(options.wait_quiet) if options.wait_quiet else 0.0
    print(f"[benchmarks] {phase} ...", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark phase {phase} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["waited_for_quiet_cpu_s"] = waited
    result["load_average_1min_before_after"] = [load_before, os.getloadavg()[0]]
    print(f"[benchmarks] {phase} done in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    return result


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def summarise(phases: dict, size: Size, options) -> dict:
    naive, ours = phases["naive_extraction"], phases["extraction"]
    speedup = {m: _ratio(ours[m]["images_per_s"], naive[m]["images_per_s"]) for m in ("clip", "dino")}
    precision = "bf16" if options.resolved_precision == "bf16" else "fp32"
    limit = phases["matmul"][precision]["vit_b16_limit_images_per_s"]
    shape_limit = phases["matmul"][precision]["vit_b16_limit_at_vit_shapes_images_per_s"]
    fraction = {m: _ratio(ours[m]["images_per_s"], limit) for m in ("clip", "dino")}
    fraction_shapes = {m: _ratio(ours[m]["images_per_s"], shape_limit) for m in ("clip", "dino")}
    full_seconds = ours["clip"]["seconds"] + ours["dino"]["seconds"]
    incremental = phases["incremental"]
    cost = _ratio(incremental["rerun"]["seconds"], full_seconds)
    train_naive, train, fixed = phases["training_naive"], phases["training"], phases["training_fixed"]
    figures = {
        "extraction": {
            "naive": {m: naive[m] for m in ("clip", "dino")},
            "ours": {m: ours[m] for m in ("clip", "dino")},
            "speedup": speedup,
            "speedup_including_warm_up": {m: _ratio(ours[m]["images_per_s_including_warm_up"],
                                                    naive[m]["images_per_s"]) for m in ("clip", "dino")},
            "manifest_scan": ours["manifest_scan"],
            "manifest_scan_one_thread": ours["manifest_scan_one_thread"],
            "manifest_scan_speedup": _ratio(ours["manifest_scan"]["images_per_s"],
                                            ours["manifest_scan_one_thread"]["images_per_s"]),
        },
        "compute_bound": {
            "precision": precision,
            "flops_per_image": VIT_B16_FLOPS,
            "matmul_peak_gflops": phases["matmul"][precision]["peak_gflops"],
            "limit_images_per_s": limit,
            "fraction_reached": fraction,
            "vit_linear_shapes_gflops": phases["matmul"][precision]["vit_linear_shapes_gflops"],
            "limit_at_vit_shapes_images_per_s": shape_limit,
            "fraction_of_limit_at_vit_shapes": fraction_shapes,
            "models_measured": "paper architectures" if size.models == "paper"
            else "tiny models: the fraction is not meaningful at this size",
        },
        "matmul": phases["matmul"],
        "training": {
            "naive": train_naive, "ours": train, "ours_fixed_pseudo_labels": fixed,
            "speedup": _ratio(train["images_per_s"], train_naive["images_per_s"]),
            "fixed_pseudo_labels_speedup": _ratio(fixed["images_per_s"], train["images_per_s"]),
        },
        "peak_memory": {name: phase["peak_memory"] for name, phase in phases.items() if "peak_memory" in phase},
        "end_to_end": phases["end_to_end"],
        "incremental": {
            **incremental,
            "full_extraction_seconds": round(full_seconds, 3),
            "cost_fraction_of_full_extraction": cost,
        },
    }
    targets = {
        "extraction_speedup_at_least_2.5x": all(s is not None and s >= 2.5 for s in speedup.values()),
        "extraction_at_least_80pct_of_compute_bound": all(f is not None and f >= 0.8 for f in fraction.values()),
        "incremental_1pct_at_most_2pct": cost is not None and cost <= 0.02,
    }
    figures["peers"] = peers_summary(phases["peers"])
    figures["cost"] = cost_projection(ours, fixed, phases["alignment"])
    return {"figures": figures, "targets": targets}


def peers_summary(peers: dict) -> dict:
    """The peers' rows, and how ours compares with the fastest peer within the agreement bound."""
    from nola_core.acceleration import BF16_FEATURE_MIN_COSINE

    if "skipped" in peers and "variants" not in peers:
        return peers
    variants = peers["variants"]
    ours = next(name for name in variants if name.startswith("torch_ours"))
    eligible = {name: row for name, row in variants.items() if not name.startswith("torch")
                and row["min_cosine_to_torch_fp32"] >= BF16_FEATURE_MIN_COSINE}
    best = max(eligible, key=lambda name: eligible[name]["images_per_s"], default=None)
    return {**peers, "agreement_bound": BF16_FEATURE_MIN_COSINE, "fastest_peer_within_bound": best,
            "ours_over_fastest_peer": _ratio(variants[ours]["images_per_s"], eligible[best]["images_per_s"]) if best else None}


def cost_projection(extraction: dict, tuning: dict, alignment: dict) -> dict:
    """Seconds for a full NoLA run on COST_IMAGES images at the paper's settings, by stage.

    extraction = N / clip rate + N / dino rate (steady state; the one-time warm-up/compile is
    added once); alignment = measured at `size.alignment_images` (1,000 unless tiny), scaled to N (CDE scores + top-k + the DL network's epochs; k grows
    with N / classes, so it is linear in N above k_min); tuning = epochs x N / step rate (NoLA's
    fixed pseudo-labels); evaluation = N / clip rate (the tuned encoder's pass over the images).
    Scale linearly for other N.
    """
    from nola_core.methods.nola import nola_tuning_config

    n, epochs = COST_IMAGES, nola_tuning_config().epochs
    stages = {
        "extraction_clip": n / extraction["clip"]["images_per_s"],
        "extraction_dino": n / extraction["dino"]["images_per_s"],
        "warm_up_once": extraction["clip"]["warm_up_seconds"] + extraction["dino"]["warm_up_seconds"],
        "top_k_and_dl_network": alignment["seconds"] * n / alignment["images"],
        "tuning": epochs * n / tuning["images_per_s"],
        "evaluation_tuned_encoder": n / extraction["clip"]["images_per_s"],
    }
    return {"images": n, "tuning_epochs": epochs, "classes": alignment["classes"], "k": alignment["k"],
            "alignment_epochs": alignment["epochs"], "tuning_precision": tuning["config"]["precision"],
            "seconds_by_stage": {k: round(v, 1) for k, v in stages.items()},
            "total_seconds": round(sum(stages.values()), 1),
            "alignment_measured_images": alignment["images"],
            "formula": "N/clip_rate + N/dino_rate + warm-up + alignment(n)*N/n + epochs*N/tuning_rate + N/clip_rate"}


def markdown_table(results: dict) -> str:
    f = results["figures"]
    m = results["machine"]
    ex, tr, cb, inc, e2e = f["extraction"], f["training"], f["compute_bound"], f["incremental"], f["end_to_end"]
    settings = results["settings"]
    lines = [
        f"Measured {results['created'][:16].replace('T', ' ')} UTC with `{results['command']}` "
        f"(size `{results['size']}`, models: {results['models']}), on {m['cpu']} "
        f"({m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB; device `{m['device']}`"
        + (f", {m['gpu']}" if m.get("gpu") else "") + f"), torch {m['torch']}. "
        f"Ours: precision `{settings['precision']}`, batch {settings['batch_size']}, {settings['workers']} "
        f"loader workers, {m['torch_threads']} torch threads, torch.compile {'on' if settings['compile'] else 'off'}.",
        "",
        "| figure | naive | ours | ratio |",
        "|---|---|---|---|",
    ]
    for model in ("clip", "dino"):
        lines.append(f"| {model.upper()} feature extraction, images/s | {ex['naive'][model]['images_per_s']:.2f} | "
                     f"{ex['ours'][model]['images_per_s']:.2f} | {ex['speedup'][model]:.2f}x |")
        lines.append(f"| {model.upper()} extraction incl. the one-time warm-up/compile "
                     f"({ex['ours'][model]['warm_up_seconds']:.0f} s), images/s over {ex['ours'][model]['images']} images | "
                     f"{ex['naive'][model]['images_per_s']:.2f} | {ex['ours'][model]['images_per_s_including_warm_up']:.2f} | "
                     f"{ex['speedup_including_warm_up'][model]:.2f}x |")
    lines.append(f"| manifest scan (read + SHA-256 + decode check), images/s, one thread vs "
                 f"{ex['manifest_scan']['threads']} threads | {ex['manifest_scan_one_thread']['images_per_s']:.1f} | "
                 f"{ex['manifest_scan']['images_per_s']:.1f} | {ex['manifest_scan_speedup']:.2f}x |")
    lines.append(f"| prompt-tuning step (NoLA, DINO labels per weak view), images/s | "
                 f"{tr['naive']['images_per_s']:.2f} | {tr['ours']['images_per_s']:.2f} | {tr['speedup']:.2f}x |")
    lines.append(f"| prompt-tuning step, fixed pseudo-labels, images/s | - | "
                 f"{tr['ours_fixed_pseudo_labels']['images_per_s']:.2f} | "
                 f"{tr['fixed_pseudo_labels_speedup']:.2f}x over per-view labels |")
    lines += [
        "",
        "| figure | value |",
        "|---|---|",
        f"| matmul peak, {cb['precision']} | {cb['matmul_peak_gflops']:.0f} GFLOP/s |",
        f"| compute-bound limit of a ViT-B/16 forward (35.1 GFLOPs/image), {cb['precision']} | "
        f"{cb['limit_images_per_s']:.2f} images/s |",
        f"| fraction of that limit reached, CLIP / DINO extraction | "
        f"{cb['fraction_reached']['clip']:.0%} / {cb['fraction_reached']['dino']:.0%} |",
        f"| matmul rate at the ViT's own linear shapes (batch {settings['batch_size']}), {cb['precision']} | "
        f"{cb['vit_linear_shapes_gflops']:.0f} GFLOP/s = {cb['limit_at_vit_shapes_images_per_s']:.2f} images/s |",
        f"| fraction of that shape-specific limit reached, CLIP / DINO | "
        f"{cb['fraction_of_limit_at_vit_shapes']['clip']:.0%} / {cb['fraction_of_limit_at_vit_shapes']['dino']:.0%} |",
        f"| adding {inc['images'] - inc['previous_images']} new images to {inc['previous_images']} "
        f"(rescan + both feature stores), cost vs full extraction | {inc['rerun']['seconds']:.2f} s vs "
        f"{inc['full_extraction_seconds']:.1f} s = {inc['cost_fraction_of_full_extraction']:.1%} |",
        f"| end to end `run_nola`, {e2e['images']} images, {e2e['models']}, "
        f"{e2e['alignment_epochs']}+{e2e['tuning_epochs']} epochs | {e2e['seconds']:.1f} s |",
    ]
    for phase, memory in f["peak_memory"].items():
        gpu = f", GPU {memory['gpu_mib']:.0f} MiB" if memory.get("gpu_mib") is not None else ""
        lines.append(f"| peak RSS of the process, {phase} | {memory['rss_mib']:.0f} MiB{gpu} |")
    others = [p.get("cpu_taken_by_other_processes") for p in
              [*ex["naive"].values(), *ex["ours"].values(), tr["naive"], tr["ours"], tr["ours_fixed_pseudo_labels"]]]
    others = [o for o in others if o is not None]
    if others:
        lines.append(f"| CPU taken by other processes during the timed phases | "
                     f"{min(others):.0%} to {max(others):.0%} |")
    lines += ["", *peers_table(f["peers"]), "", *cost_table(f["cost"])]
    lines += ["", "Targets: " + ", ".join(f"{name}: {'met' if ok else 'NOT met'}"
                                          for name, ok in results["targets"].items()) + "."]
    return "\n".join(lines)


def peers_table(peers: dict) -> list[str]:
    if "variants" not in peers:
        return [f"Peers: skipped ({peers.get('skipped')})."]
    load = peers["load_average_1min"]
    lines = [f"Peers: the {peers['tower']} forward, batch {peers['batch']}, median of {peers['rounds']} interleaved "
             f"rounds (load average {load[0]:.1f} -> {load[1]:.1f}; other processes took "
             f"{peers['cpu_taken_by_other_processes'] or 0:.0%} of the CPU).", "",
             "| runtime | images/s | min / mean cosine to torch fp32 |", "|---|---|---|"]
    for name, row in peers["variants"].items():
        lines.append(f"| {name} | {row['images_per_s']:.2f} | {row['min_cosine_to_torch_fp32']:.5f} / "
                     f"{row['mean_cosine_to_torch_fp32']:.5f} |")
    for name, why in peers["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | |")
    if peers.get("fastest_peer_within_bound"):
        lines += ["", f"Ours / fastest peer within the agreement bound (cosine >= {peers['agreement_bound']}, "
                      f"{peers['fastest_peer_within_bound']}): {peers['ours_over_fastest_peer']:.2f}x."]
    return lines


def cost_table(cost: dict) -> list[str]:
    stages = cost["seconds_by_stage"]
    names = {"extraction_clip": "feature extraction, CLIP", "extraction_dino": "feature extraction, DINO",
             "warm_up_once": "one-time warm-up / compilation (not per image)",
             "top_k_and_dl_network": f"CDE top-k + DL network ({cost['classes']} classes, k {cost['k']}, "
                                     f"{cost['alignment_epochs']} epochs)",
             "tuning": f"prompt tuning, {cost['tuning_epochs']} epochs ({cost['tuning_precision']})",
             "evaluation_tuned_encoder": "evaluation pass of the tuned encoder"}
    lines = [f"Cost of a full NoLA run per {cost['images']:,} images at the paper's settings, projected "
             f"as `{cost['formula']}`:", "", "| stage | seconds | minutes |", "|---|---|---|"]
    for key, seconds in stages.items():
        lines.append(f"| {names[key]} | {seconds:.0f} | {seconds / 60:.1f} |")
    lines.append(f"| total | {cost['total_seconds']:.0f} | {cost['total_seconds'] / 60:.1f} |")
    return lines


def refresh_markdown(path: Path, table: str) -> None:
    block = f"{MARK_START}\n{table}\n{MARK_END}"
    if path.exists():
        text = path.read_text(encoding="utf-8")
        if MARK_START in text and MARK_END in text:
            head, rest = text.split(MARK_START, 1)
            text = head + block + rest.split(MARK_END, 1)[1]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = "# Benchmarks\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--smallest", action="store_const", const="tiny", dest="size", help="same as --size tiny")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="auto",
                        help="ours: auto = bf16 on CUDA and on CPUs with native bf16, else fp32")
    parser.add_argument("--batch-size", type=int, default=None, help="ours (default: 32 on CPU, 256 on CUDA)")
    parser.add_argument("--workers", type=int, default=None,
                        help="ours: loader workers (default: GPU min(8, cores - 1); CPU a quarter of the cores)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="ours: FeatureConfig.compile for the full extraction (default on; needs a C++ compiler)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each phase, wait up to this long for the machine to be idle (shared machines)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep generated data here (default: temp)")
    parser.add_argument("--cost-classes", type=int, default=100,
                        help="classes assumed by the cost projection's alignment stage (default 100)")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _resolve_defaults(options) -> None:
    import torch

    from nola_core.acceleration import cpu_supports_bf16
    from nola_core.runtime import loader_workers, resolve_device

    device = resolve_device(options.device)
    options.device = str(device)
    if options.precision == "auto":
        options.precision = "bf16" if device.type == "cuda" or cpu_supports_bf16() else "fp32"
    options.resolved_precision = options.precision
    if options.batch_size is None:
        options.batch_size = 256 if device.type == "cuda" else 32
    if options.workers is None:  # on the CPU, what the library would use anyway (runtime.loader_workers)
        cores = os.cpu_count() or 1
        options.workers = min(8, max(1, cores - 1)) if device.type == "cuda" else loader_workers(device, 8)
    if options.threads:
        torch.set_num_threads(options.threads)


def child_main(options) -> None:
    import torch

    from nola_core.runtime import resolve_device

    if options.threads:  # explicit: also past the library's CPU thread budget (ComputeSettings.cpu_threads)
        torch.set_num_threads(options.threads)
    size = SIZES[options.size]
    options.work = options.work_dir
    options.dataset = options.work_dir / "dataset"
    options.end_to_end_dataset = options.work_dir / "end_to_end"
    result = PHASES[options.phase](options, size, resolve_device(options.device))
    print(json.dumps(result))


def main(argv=None) -> dict:
    options = parse_args(argv)
    if options.phase:
        child_main(options)
        return {}
    sys.path.insert(0, str(REPO))
    from benchmarks.images import write_dataset, write_images

    _resolve_defaults(options)
    size = SIZES[options.size]
    work = options.work_dir or Path(tempfile.mkdtemp(prefix="nola-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        shutil.rmtree(work / "dataset", ignore_errors=True)
        shutil.rmtree(work / "end_to_end", ignore_errors=True)
        write_dataset(work / "dataset", size.extraction_images, seed=0)
        write_dataset(work / "end_to_end", size.end_to_end_images, seed=1)
        machine = machine_info(options.device)
        phases = {}
        for phase in ("matmul", "naive_extraction", "extraction"):
            phases[phase] = run_child(phase, options, work)
        new_images = max(1, round(0.01 * size.extraction_images))
        write_images(work / "dataset" / "unlabeled", new_images, seed=0, start=size.extraction_images)
        for phase in ("incremental", "training_naive", "training", "training_fixed", "end_to_end", "peers", "alignment"):
            phases[phase] = run_child(phase, options, work)
        machine["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        results = {
            "schema": 1,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m benchmarks.run" + ("" if options.size == "full" else f" --size {options.size}")
            + (f" --wait-quiet {options.wait_quiet:g}" if options.wait_quiet else ""),
            "size": options.size,
            "size_settings": asdict(size),
            "models": "ViT-B-16 (open_clip) + vit_base_patch16_224.dino (timm), random weights"
            if size.models == "paper" else "tiny profile (nola-tiny-clip, nola-tiny-dino), random weights",
            "machine": machine,
            "settings": {"device": options.device, "precision": options.precision, "batch_size": options.batch_size,
                         "workers": options.workers, "threads": options.threads, "compile": options.compile,
                         "naive_batch": NAIVE_BATCH, "wait_quiet_s": options.wait_quiet},
            **summarise(phases, size, options),
            "total_seconds": round(time.perf_counter() - started, 1),
        }
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        refresh_markdown(options.markdown, markdown_table(results))
        print(markdown_table(results))
        return results
    finally:
        if options.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
