"""bf16 on CPU is only offered because it matches fp32 closely on the real architectures.

The real ViT-B/16 CLIP (open_clip) and DINO ViT-B/16 (timm) architectures, randomly
initialised (no weights here), on generated images made from real pictures, through the
project's reduced-precision path (autocast + pre-cast weights + fused attention) against
fp32. Stated tolerance, per image: cosine(fp32, bf16) >= 0.999; after removing the batch mean
(the image-specific part of the features) cosine >= 0.99; image-image cosine similarities
differ by at most 0.01. Measured on the 2-core CPU: 0.99995 / 0.9987 / 0.0015.
"""

import hashlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nola_core.acceleration import cpu_supports_bf16, fused_attention, precast_weights
from nola_core.data import ImageRecord, eval_transform
from nola_core.features import FeatureConfig, extract_features
from nola_core.models import ModelConfig, load_clip, load_dino
from nola_core.runtime import ComputeSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.images import write_images  # noqa: E402

RAW_COSINE = 0.999
CENTRED_COSINE = 0.99
SIMILARITY_DIFFERENCE = 0.01


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("precision")
    paths = write_images(folder, 8, seed=11)
    return folder, [ImageRecord(hashlib.sha256(p.read_bytes()).hexdigest(), p.name) for p in paths]


# Skips where bf16 would be emulated (BENCHMARKS.md, "CPUs without native bf16"); listed in the README.
@pytest.mark.skipif(not cpu_supports_bf16(), reason=(
    "this CPU has no native bf16 (AVX-512 BF16 / AMX): emulated bf16 is too slow for two ViT-B/16 "
    "forwards and is never chosen on such a CPU; run `pytest tests/test_perf_precision.py` on a CPU "
    "with AMX or AVX-512 BF16 (e.g. Intel Sapphire Rapids)"))
@pytest.mark.parametrize("which", ["clip", "dino"])
def test_bf16_features_match_fp32_on_the_real_architectures(images, which):
    folder, records = images
    config = ModelConfig(clip_pretrained=None, dino_pretrained=False)  # ViT-B-16 and vit_base_patch16_224.dino
    model = load_clip(config) if which == "clip" else load_dino(config)
    tower = model.visual if which == "clip" else model.model
    features = {
        precision: extract_features(model.encode_image, folder, records, eval_transform(model.preprocess),
                                    FeatureConfig(batch_size=8,
                                                  compute=ComputeSettings(num_workers=0, precision=precision)), "cpu",
                                    dtype=torch.float32, module=tower).features
        for precision in ("fp32", "bf16")
    }
    full, reduced = features["fp32"], features["bf16"]
    assert F.cosine_similarity(full, reduced).min() >= RAW_COSINE
    centred = F.cosine_similarity(full - full.mean(0), reduced - reduced.mean(0))
    assert centred.min() >= CENTRED_COSINE
    similarity = [F.normalize(f, dim=-1) @ F.normalize(f, dim=-1).T for f in (full, reduced)]
    assert (similarity[0] - similarity[1]).abs().max() <= SIMILARITY_DIFFERENCE
    # The model is restored after extraction: fp32 weights, MHA's own forward.
    assert all(p.dtype == torch.float32 for p in tower.parameters())
    assert not any("forward" in vars(m) for m in tower.modules())


def test_speedups_are_exact_rewrites_and_restore_the_module():
    """Fused attention = MHA's function; pre-cast weights = what autocast would cast."""
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    block = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
    for p in [*attention.parameters(), *block.parameters()]:
        p.requires_grad_(False)
    x = torch.randn(3, 10, 64)
    expected = attention(x, x, x, need_weights=False)[0]
    with fused_attention(attention) as patched:
        assert patched == 1
        assert torch.allclose(attention(x, x, x, need_weights=False)[0], expected, atol=1e-5)
        crossed = attention(x, x[:, :5], x[:, :5], need_weights=False)[0]  # not self-attention: MHA's own path
    assert torch.equal(crossed, attention(x, x[:, :5], x[:, :5], need_weights=False)[0])
    assert "forward" not in vars(attention)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_only = block(x)
        with precast_weights(block, torch.bfloat16) as cast:
            assert cast == 4 and block[0].weight.dtype == torch.bfloat16
            precast = block(x)
    assert torch.equal(autocast_only, precast)
    assert block[0].weight.dtype == torch.float32
