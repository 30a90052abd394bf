"""`auto` extracts features in bf16 on a CPU with native bf16, because bf16 stays within a stated
bound of fp32 on real images; everywhere else, and for training, `auto` stays fp32.

The bound (`acceleration.BF16_FEATURE_MIN_COSINE` per image, `BF16_FEATURE_MEAN_COSINE` on
average) is checked here on the mini world's real pictures with the shipped mini CLIP and DINO
(trained weights) and the tiny models; the ViT-B/16 architectures are checked in
tests/test_perf_precision.py (tighter, 0.999 per image). Measured figures: BENCHMARKS.md.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nola_core import acceleration
from nola_core.acceleration import BF16_FEATURE_MEAN_COSINE, BF16_FEATURE_MIN_COSINE, resolve_precision
from nola_core.demo import MINI_DEMO_DATASET, bundled_dataset_path
from nola_core.features import FeatureConfig
from nola_core.models import ModelConfig, load_clip, load_dino
from nola_core.data.loading import image_features, load_dataset
from nola_core.runtime import ComputeSettings
from nola_core.text.classifiers import zero_shot_classifier
from nola_core.text.templates import get_templates

CPU = torch.device("cpu")
ZERO_SHOT_AGREEMENT = 0.97
"""bf16 vs fp32 zero-shot top-1 agreement of the mini CLIP on its shipped domain (measured 1.0 on
`fashion_blurred_small`, AMD EPYC without native bf16; 0.9886 on the earlier `fashion_textured_small`:
8 of 700 images, near-ties of a 10-class 32 px model)."""


@pytest.fixture(scope="module")
def mini_domain():
    spec, manifest, labeled = load_dataset(bundled_dataset_path(MINI_DEMO_DATASET))
    return spec, list(manifest.records) + list(labeled.records)


def _features(model, root, records, precision):
    config = FeatureConfig(batch_size=64, compute=ComputeSettings(num_workers=0, precision=precision))
    return image_features(model, root, records, config, CPU).features.float()


@pytest.mark.parametrize("native", [True, False])
def test_auto_resolves_to_bf16_only_for_extraction_on_a_native_bf16_cpu(monkeypatch, native):
    monkeypatch.setattr(acceleration, "cpu_supports_bf16", lambda: native)
    assert resolve_precision(CPU, "auto", extraction=True) == ("bf16" if native else "fp32")
    assert FeatureConfig().resolved_precision(CPU) == ("bf16" if native else "fp32")  # what artifact keys hold
    assert resolve_precision(CPU, "auto") == "fp32"  # training: unchanged
    fp32 = FeatureConfig(compute=ComputeSettings(precision="fp32"))
    assert fp32.resolved_precision(CPU) == "fp32"  # one setting away
    assert resolve_precision(torch.device("cuda"), "auto", extraction=True) == "bf16"


@pytest.mark.parametrize("native", [True, False])
def test_extraction_under_auto_runs_the_resolved_precision(monkeypatch, mini_domain, native):
    """The features `auto` produces are exactly those of the precision it resolves to."""
    spec, records = mini_domain
    clip = load_clip(ModelConfig.from_profile("mini"))
    monkeypatch.setattr(acceleration, "cpu_supports_bf16", lambda: native)
    auto = _features(clip, spec.root, records[:32], "auto")
    expected = _features(clip, spec.root, records[:32], "bf16" if native else "fp32")
    other = _features(clip, spec.root, records[:32], "fp32" if native else "bf16")
    assert torch.equal(auto, expected)
    assert not torch.equal(auto, other)


@pytest.mark.parametrize("profile", ["mini", "tiny"])
@pytest.mark.parametrize("which", ["clip", "dino"])
def test_bf16_features_stay_within_the_bound_on_real_images(mini_domain, profile, which):
    spec, records = mini_domain
    config = ModelConfig.from_profile(profile)
    model = load_clip(config) if which == "clip" else load_dino(config)
    full, reduced = (_features(model, spec.root, records[:64], p) for p in ("fp32", "bf16"))
    cosine = F.cosine_similarity(full, reduced)
    assert cosine.min() >= BF16_FEATURE_MIN_COSINE
    assert cosine.mean() >= BF16_FEATURE_MEAN_COSINE


def test_bf16_keeps_the_mini_zero_shot_predictions(mini_domain):
    spec, records = mini_domain
    clip = load_clip(ModelConfig.from_profile("mini"))
    classifier = zero_shot_classifier(clip, spec.classes, get_templates(spec.templates))
    full, reduced = (_features(clip, spec.root, records, p) for p in ("fp32", "bf16"))
    same = (full @ classifier.T).argmax(1) == (reduced @ classifier.T).argmax(1)
    assert same.float().mean() >= ZERO_SHOT_AGREEMENT


@pytest.mark.parametrize("backend, precision", [("openvino", "bf16"), ("openvino", "fp32"), ("onnxruntime", "fp32")])
def test_peer_backends_stay_within_the_bound(mini_domain, backend, precision):
    """The opt-in ONNX Runtime / OpenVINO extraction (`FeatureConfig.backend`) against torch fp32."""
    pytest.importorskip(backend, reason=f"{backend} is not installed (pip install 'nola[peers]')")
    spec, records = mini_domain
    clip = load_clip(ModelConfig.from_profile("mini"))
    full = _features(clip, spec.root, records[:32], "fp32")
    config = FeatureConfig(batch_size=16, backend=backend, compute=ComputeSettings(num_workers=0, precision=precision))
    table = image_features(clip, spec.root, records[:32], config, CPU)
    cosine = F.cosine_similarity(full, table.features.float())
    assert cosine.min() >= BF16_FEATURE_MIN_COSINE and cosine.mean() >= BF16_FEATURE_MEAN_COSINE
    assert config.resolved_precision(CPU) == f"{backend}-{precision}"  # keys tell the backend apart
