"""How close bf16 feature extraction stays to fp32, on real images: the evidence behind `auto`.

    .venv/bin/python -m benchmarks.agreement [--images 32] [--out FILE]

For each model (tiny and mini profiles, open_clip ViT-B-16 and timm DINO ViT-B/16 with random
weights), the same images go through `data.loading.image_features` at fp32 and at bf16 (autocast,
fused attention, pre-cast weights); reported: the per-image cosine of the two (min, mean) and,
for the mini CLIP on its shipped shifted domain (`demo.MINI_DEMO_DATASET`), how often the
zero-shot prediction (fp32 text classifier) is the same. Images: the mini domain's real
Fashion-MNIST pictures, and for the 224 px models `benchmarks.images` pictures generated from
real ones (JPEG, textured). Only runs where bf16 is native (`acceleration.cpu_supports_bf16`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _records(folder: Path, paths):
    from nola_core.data import ImageRecord

    return [ImageRecord(hashlib.sha256(p.read_bytes()).hexdigest(), str(p.relative_to(folder))) for p in paths]


def features_at(model, root: Path, records, precision: str):
    import torch

    from nola_core.data.loading import image_features
    from nola_core.features import FeatureConfig
    from nola_core.runtime import ComputeSettings

    config = FeatureConfig(batch_size=16, compute=ComputeSettings(num_workers=0, precision=precision))
    return image_features(model, root, records, config, "cpu").features.to(torch.float32)


def cosine_summary(full, reduced) -> dict:
    import torch.nn.functional as F

    cosine = F.cosine_similarity(full, reduced)
    return {"images": len(cosine), "min_cosine": round(float(cosine.min()), 6), "mean_cosine": round(float(cosine.mean()), 6)}


def measure(images: int) -> dict:
    import torch

    from benchmarks.images import write_images
    from nola_core.demo import MINI_DEMO_DATASET, bundled_dataset_path
    from nola_core.models import ModelConfig, load_clip, load_dino
    from nola_core.data.loading import load_dataset
    from nola_core.text.classifiers import zero_shot_classifier
    from nola_core.text.templates import get_templates

    results = {}
    domain = bundled_dataset_path(MINI_DEMO_DATASET)
    spec, manifest, labeled = load_dataset(domain)
    mini_records = list(manifest.records) + (list(labeled.records) if labeled is not None else [])
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        generated = _records(folder, write_images(folder, images, seed=21))
        small_records = mini_records[:images]
        for profile in ("tiny", "mini"):
            config = ModelConfig.from_profile(profile)
            for name, model in (("clip", load_clip(config)), ("dino", load_dino(config))):
                rows = small_records if profile == "mini" else generated
                root = domain if profile == "mini" else folder
                full, reduced = (features_at(model, root, rows, p) for p in ("fp32", "bf16"))
                results[f"{profile}_{name}"] = cosine_summary(full, reduced)
        paper = ModelConfig(clip_pretrained=None, dino_pretrained=False)
        for name, model in (("clip", load_clip(paper)), ("dino", load_dino(paper))):
            full, reduced = (features_at(model, folder, generated, p) for p in ("fp32", "bf16"))
            results[f"vit_b16_random_{name}"] = cosine_summary(full, reduced)
    # Zero-shot agreement of the mini CLIP on its whole shipped domain (unlabeled + held-out).
    clip = load_clip(ModelConfig.from_profile("mini"))
    zero_shot = zero_shot_classifier(clip, spec.classes, get_templates(spec.templates))
    full, reduced = (features_at(clip, domain, mini_records, p) for p in ("fp32", "bf16"))
    same = (full @ zero_shot.T).argmax(1) == (reduced @ zero_shot.T).argmax(1)
    results["mini_zero_shot_top1_agreement"] = {"images": len(same), "agreement": round(float(same.float().mean()), 4),
                                                "dataset": MINI_DEMO_DATASET}
    results["torch"] = torch.__version__
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.agreement", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from nola_core.acceleration import cpu_supports_bf16

    if not cpu_supports_bf16():
        raise SystemExit("this CPU has no native bf16: `auto` is fp32 here, nothing to measure")
    results = measure(options.images)
    text = json.dumps(results, indent=2)
    if options.out:
        options.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return results


if __name__ == "__main__":
    main()
