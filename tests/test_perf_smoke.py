"""The benchmark's smallest setting runs end to end and reports every figure (no speed asserted).

`python -m benchmarks.run --size tiny` is what this runs, in a temporary folder, so the
benchmark code cannot rot; the figures themselves (tiny models, a shared CI machine) mean
nothing and are not checked, only that each one is there and is a number.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def test_smallest_benchmark_writes_every_figure(tmp_path):
    out, markdown = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nprose kept\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nafter\n")
    environment = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--size", "tiny", "--device", "cpu", "--out", str(out),
         "--markdown", str(markdown), "--work-dir", str(tmp_path / "work")],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    machine, figures = results["machine"], results["figures"]
    assert machine["logical_cpus"] >= 1 and machine["torch"] and "cpu_native_bf16" in machine

    extraction = figures["extraction"]
    for model in ("clip", "dino"):
        for side in ("naive", "ours"):
            assert _number(extraction[side][model]["images_per_s"]), (side, model)
        assert _number(extraction["speedup"][model])
        assert _number(figures["compute_bound"]["fraction_reached"][model])
    training = figures["training"]
    for variant in ("naive", "ours", "ours_fixed_pseudo_labels"):
        assert _number(training[variant]["images_per_s"]), variant
    assert _number(training["speedup"]) and _number(training["fixed_pseudo_labels_speedup"])
    for precision in ("fp32", "bf16") if machine["cpu_native_bf16"] else ("fp32",):
        assert _number(figures["matmul"][precision]["peak_gflops"])
        assert _number(figures["matmul"][precision]["vit_b16_limit_images_per_s"])
    if not machine["cpu_native_bf16"]:  # emulated bf16 would take minutes per product: not measured
        assert "no native bf16" in figures["matmul"]["bf16"]["skipped"]
    assert _number(figures["compute_bound"]["limit_images_per_s"])
    assert figures["compute_bound"]["flops_per_image"] == 2 * 17.58e9
    for phase, memory in figures["peak_memory"].items():
        assert _number(memory["rss_mib"]), phase
    assert {"extraction", "naive_extraction", "training", "end_to_end"} <= set(figures["peak_memory"])
    assert _number(figures["end_to_end"]["seconds"]) and figures["end_to_end"]["images"] == 40
    incremental = figures["incremental"]
    assert incremental["images"] == incremental["previous_images"] + 1
    assert incremental["computed"] == {"clip": 1, "dino": 1}  # only the new image was encoded
    assert _number(incremental["cost_fraction_of_full_extraction"])
    assert set(results["targets"]) == {"extraction_speedup_at_least_2.5x",
                                       "extraction_at_least_80pct_of_compute_bound", "incremental_1pct_at_most_2pct"}

    peers = figures["peers"]  # torch always; each peer measured or skipped with its reason
    assert _number(peers["variants"]["torch_fp32"]["images_per_s"])
    for name in ("onnxruntime_fp32", "openvino_fp32"):
        assert name in peers["skipped"] or (_number(peers["variants"][name]["images_per_s"])
                                            and peers["variants"][name]["min_cosine_to_torch_fp32"] >= 0.999), name
    cost = figures["cost"]
    assert cost["images"] == 1000 and cost["tuning_epochs"] == 50
    assert set(cost["seconds_by_stage"]) == {"extraction_clip", "extraction_dino", "warm_up_once",
                                             "top_k_and_dl_network", "tuning", "evaluation_tuned_encoder"}
    assert cost["total_seconds"] == pytest.approx(sum(cost["seconds_by_stage"].values()), abs=1)

    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nprose kept\n") and text.endswith("\n\nafter\n") and "old" not in text
    assert "| CLIP feature extraction, images/s |" in text
    assert "| runtime | images/s |" in text and "| prompt tuning, 50 epochs" in text
