"""The papers' table in miniature: every method on every mini-world target domain.

    python -m nola_core.mini.table [--domains-dir DIR] [--per-class 30] [--seeds 0 1 2]
                                   [--out docs/mini_results.md]

Zero-shot, CDE, the DL network (NoLA's alignment stage), LaFTer, LatteCLIP (class texts only:
no LMM here, so the paper's T_class-only ablation) and NoLA, with the `mini` profile, on each
shifted domain made by `nola_core.mini.domains` (generated into `--domains-dir` from Debian's
Fashion-MNIST when missing), plus the source-domain zero-shot that shows the gap. Mean ± sd
over seeds of transductive and held-out top-1, written as Markdown and as JSON beside it,
with the wall time it took. The methods run as the code is (nola_core.methods.compare):
rerun the command after changing a method. Epochs are scaled down (flags below) so the table
finishes on two CPU cores (the defaults: about 9 minutes for the four domains on a 2-core AMD EPYC, see
docs/mini_results.md); they are not tuned on these labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from nola_core.alignment import AlignmentConfig
from nola_core.eval import HELD_OUT, TRANSDUCTIVE, split_column
from nola_core.features import FeatureConfig
from nola_core.methods.compare import ComparisonConfig, compare_methods
from nola_core.methods.lafter import LaFTerConfig
from nola_core.methods.latteclip import LatteCLIPConfig
from nola_core.methods.nola import NolaConfig, nola_tuning_config
from nola_core.mini.domains import SHIFTS, SOURCE, write_domain
from nola_core.mini.fashion import FASHION_MNIST_DIR, load_split
from nola_core.models import ModelConfig
from nola_core.runtime import ComputeSettings
from nola_core.stage_names import NOLA_DL_STAGE

REPO_DOCS = Path(__file__).resolve().parents[2] / "docs"
ROWS = (  # (method, stage) in table order; the DL network is NoLA's alignment stage
    ("zero-shot", None), ("cde", None), ("nola", NOLA_DL_STAGE), ("lafter", None), ("latteclip", None), ("nola", None),
)
LABELS = {"zero-shot": "zero-shot", "cde": "CDE", NOLA_DL_STAGE: "DL network", "lafter": "LaFTer",
          "latteclip": "LatteCLIP (class texts only)", "nola": "NoLA"}


def _domain_dirs(domains_dir: Path, per_class: int, held_out: int) -> dict[str, Path]:
    dirs = {name: domains_dir / f"fashion_{name}" for name in [SOURCE, *SHIFTS]}
    missing = [name for name, path in dirs.items() if not (path / "dataset.yaml").is_file()]
    if missing:
        images, labels = load_split("test", FASHION_MNIST_DIR)
        for name in missing:
            write_domain(domains_dir, name, images, labels, per_class, held_out)
    return dirs


def _summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def _rows(evaluation, domain: str) -> list[dict]:
    """One row per table line: the method's final stage (or the named stage) over seeds."""
    rows = []
    for method, stage in ROWS:
        part = evaluation.filter(evaluation["method"] == method)
        part = part.filter(part["stage"] == stage) if stage else part.filter(part["final"])
        if part.is_empty():
            continue
        rows.append({
            "domain": domain, "method": LABELS[stage or method],
            TRANSDUCTIVE: _summary(part[split_column(TRANSDUCTIVE, "top1")].to_list()),
            HELD_OUT: _summary(part[split_column(HELD_OUT, "top1")].to_list()),
        })
    return rows


def cpu_name() -> str:
    """The CPU model (/proc/cpuinfo on Linux) and whether it has native bf16, for the timing
    line: the same model name comes with and without it on shared machines."""
    from nola_core.acceleration import cpu_supports_bf16

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {'native' if cpu_supports_bf16() else 'no native'} bf16"


def _cell(summary: dict) -> str:
    if summary["mean"] is None:
        return "–"
    return f"{100 * summary['mean']:.1f}" + (f" ± {100 * summary['sd']:.1f}" if summary["n"] > 1 else "")


def markdown(result: dict) -> str:
    load = result.get("load_average_at_start")
    load = f"; load average {load:.1f} at the start" if load is not None else ""
    lines = [
        "# Mini-world results (trained by this project; not the papers' numbers)", "",
        "Made by `python -m nola_core.mini.table` (see docs/mini_world.md for the world). Top-1 accuracy "
        "in %, mean ± sd over seeds; *transductive*: the unlabeled images adapted on; *held-out*: "
        "labelled images never seen in adaptation. LatteCLIP runs on class texts only (no LMM "
        "here: the paper's T_class-only ablation).", "",
        f"- source-domain zero-shot (clean Fashion-MNIST test images): "
        f"{_cell(result['source_zero_shot'][TRANSDUCTIVE])} % on {result['source_images']} images",
        f"- command: `{result['command']}`; settings: {json.dumps(result['settings'])}",
        f"- wall time: {result['wall_s']:.0f} s on {result['cpu']} ({result['threads']} threads{load})", "",
        "Read with docs/mini_world.md (section Measured), which measures each method's standing. `blurred` "
        "is the domain with room for label-free adaptation (the mini DINO's features keep the classes "
        "apart where the mini CLIP's zero-shot does not): there the DL network beats zero-shot and NoLA "
        "follows it as far as its prompt-tuning epochs let it. On `textured` even true labels would not "
        "take a head on the mini DINO's features above zero-shot, and on `negative` and `sketch` the "
        "top-k pseudo-labels the DL network learns from are a third or more wrong. NoLA's 16 and "
        "LaFTer's 50 prompt tokens weigh heavily on the 16-patch mini ViT, LaFTer's labeller (its text "
        "classifier) is no better than zero-shot here, and LatteCLIP on class texts alone has nothing "
        "new to learn (its targets are zero-shot's own answers).", "",
        "| domain | method | transductive | held-out |", "|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['domain']} | {row['method']} | {_cell(row[TRANSDUCTIVE])} | {_cell(row[HELD_OUT])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains-dir", type=Path, default=Path("mini_domains"))
    parser.add_argument("--per-class", type=int, default=30, help="unlabeled images per class (new domains)")
    parser.add_argument("--held-out-per-class", type=int, default=10)
    parser.add_argument("--domains", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--alignment-epochs", type=int, default=AlignmentConfig.epochs)
    parser.add_argument("--tuning-epochs", type=int, default=5, help="NoLA and LaFTer prompt-tuning epochs")
    parser.add_argument("--latteclip-epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO_DOCS / "mini_results.md")
    parser.add_argument("--threads", type=int, default=1, help="1: on a shared 2-core machine, 2 were slower")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # not on Windows
    started = time.perf_counter()
    dirs = _domain_dirs(args.domains_dir, args.per_class, args.held_out_per_class)
    models = ModelConfig.from_profile("mini")
    in_process = ComputeSettings(num_workers=0)
    features = FeatureConfig(compute=in_process)
    nola = NolaConfig(alignment=AlignmentConfig(epochs=args.alignment_epochs),
                      tuning=nola_tuning_config(epochs=args.tuning_epochs, compute=in_process))
    lafter_default = LaFTerConfig()
    lafter = dataclasses.replace(lafter_default, tuning=dataclasses.replace(
        lafter_default.tuning, epochs=args.tuning_epochs, compute=in_process))
    latte = LatteCLIPConfig(max_epochs=args.latteclip_epochs, compute=in_process)
    source = compare_methods(dirs[SOURCE], ComparisonConfig(methods=("zero-shot",), models=models,
                                                            features=features, device="cpu"))
    source_row = _rows(source.evaluation, SOURCE)[0]
    rows = []
    for name in args.domains:
        config = ComparisonConfig(seeds=tuple(args.seeds), models=models, features=features, lafter=lafter,
                                  latteclip=latte, nola=nola, device="cpu")
        comparison = compare_methods(dirs[name], config)
        rows += _rows(comparison.evaluation, name)
        print(f"{name}: done after {time.perf_counter() - started:.0f} s", flush=True)
    result = {
        "rows": rows, "source_zero_shot": source_row, "source_images": int(source.evaluation["n_unlabeled"][0]),
        "settings": {"seeds": args.seeds, "per_class": args.per_class, "held_out_per_class": args.held_out_per_class,
                     "alignment_epochs": args.alignment_epochs, "tuning_epochs": args.tuning_epochs,
                     "latteclip_epochs": args.latteclip_epochs},
        "wall_s": time.perf_counter() - started, "cpu": cpu_name(),
        "threads": args.threads, "load_average_at_start": load_at_start,
        "command": " ".join(["python -m nola_core.mini.table", *(sys.argv[1:] if argv is None else argv)]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(result), encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
