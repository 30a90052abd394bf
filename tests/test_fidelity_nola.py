"""NoLA's mechanisms against its reference code (fazliimam/NoLA), on controlled data.

Each expected value is written out here from the reference (file and function named in each
test), not derived from the code under test; see docs/fidelity.md, section NoLA.
"""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from nola_core.alignment import select_top_k
from nola_core.data import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiView,
    Preprocess,
    build_manifest,
    load_dataset_spec,
    strong_transform,
)
from nola_core.demo import demo_dataset_path
from nola_core.export import export_classifier, load_classifier
from nola_core.models import ModelConfig, load_clip
from nola_core.methods.nola import tuning_views
from nola_core.tuning import build_prompt_classifier
from nola_core.predictions import tuned_head_probabilities
from nola_core.runtime import ComputeSettings
from nola_core.tuning import TuningConfig, train_prompts

CLIP_224 = Preprocess(224, CLIP_MEAN, CLIP_STD)


# ── top-k (reference: utils/model_utils.py, top_k_indices_per_class2) ────────────────────────────


def _reference_top_k(scores: torch.Tensor, k: int) -> dict[int, int]:
    """The reference's candidate lists, written as plain loops: class c ranks the images whose
    first choice is c by their score for c; only a class with no such image looks at second,
    then third choices. An image picked twice keeps its higher score (our rule, see the docs)."""
    top3 = scores.topk(3, dim=1).indices.tolist()
    picks: list[tuple[float, int, int]] = []  # (score, image, class)
    for c in range(scores.shape[1]):
        for choice in range(3):
            candidates = [i for i, ranked in enumerate(top3) if ranked[choice] == c]
            if candidates:
                ranked = sorted(candidates, key=lambda i: (-scores[i, c].item(), i))[:k]
                picks += [(scores[i, c].item(), i, c) for i in ranked]
                break
    chosen: dict[int, tuple[float, int]] = {}
    for score, image, c in picks:
        if image not in chosen or score > chosen[image][0]:
            chosen[image] = (score, c)
    return {image: c for image, (_, c) in chosen.items()}


def _skewed_scores(num_images=600, num_classes=6, seed=0) -> torch.Tensor:
    """Log-odds-like scores where class 0 takes most first choices, classes 1-3 a few, and class 5
    is nobody's first choice (it must fall back); class 4 is strong as a second choice."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_images, num_classes, generator=generator)
    logits[:, 0] += 2.0
    logits[:, 4] += 1.0
    logits[:, 5] -= 8.0
    best_other = logits[:40, :5].max(dim=1).values
    logits[:40, 5] = best_other - 0.05 - 0.3 * torch.rand(40, generator=generator)  # never first
    return logits


def test_top_k_ranks_only_images_whose_first_choice_is_the_class():
    scores = _skewed_scores()
    first_choice = scores.argmax(dim=1)
    assert (first_choice == 5).sum() == 0 and (first_choice == 0).sum() > 300  # the skew the test needs
    k = 20
    selection = select_top_k([scores[:250], scores[250:]], k=k)  # two chunks: streamed
    has_own = set(first_choice.tolist())
    for image, label in zip(selection.indices.tolist(), selection.labels.tolist()):
        if label in has_own:
            assert first_choice[image] == label, (image, label)
    assert dict(zip(selection.indices.tolist(), selection.labels.tolist())) == _reference_top_k(scores, k)
    counts = torch.bincount(first_choice, minlength=6)
    for c in range(5):  # a class with fewer than k images of its own is reported short
        assert (c in selection.short_classes) == (counts[c] < k), (c, counts[c].item())
    assert selection.counts[5] > 0  # filled from second/third choices
    assert selection.fallback_choice == {5: 2}


def test_an_image_taken_by_a_fallback_class_stays_with_its_own_first_choice():
    # Class 2 is nobody's first choice; its candidates are the images whose second choice it is:
    # image 0 (0.40) and image 1 (0.30). Class 0's own candidates: image 2 (0.70), image 0 (0.50).
    probabilities = torch.tensor([[0.50, 0.10, 0.40], [0.10, 0.60, 0.30], [0.70, 0.25, 0.05]])
    selection = select_top_k([probabilities.log()], k=1)  # class 0 takes only image 2
    assert dict(zip(selection.indices.tolist(), selection.labels.tolist())) == {0: 2, 1: 1, 2: 0}
    selection = select_top_k([probabilities.log()], k=2)  # class 0 takes image 0 too: it stays there
    assert dict(zip(selection.indices.tolist(), selection.labels.tolist())) == {0: 0, 1: 1, 2: 0}
    assert selection.short_classes == [1, 2] and selection.fallback_choice == {2: 2}


# ── strong view (reference: utils/model_utils.py, get_random_transform) ─────────────────────────


def _describe(transform) -> list[tuple]:
    """Each step of a v2.Compose as (kind, its parameters)."""
    steps = []
    for step in transform.transforms:
        if isinstance(step, v2.RandomApply):
            [inner] = step.transforms
            steps.append(("RandomApply", step.p, *_describe(v2.Compose([inner]))))
        elif isinstance(step, v2.RandomResizedCrop):
            steps.append(("RandomResizedCrop", tuple(step.size), tuple(step.scale), tuple(step.ratio),
                          step.interpolation))
        elif isinstance(step, v2.RandomHorizontalFlip):
            steps.append(("RandomHorizontalFlip", step.p))
        elif isinstance(step, v2.ColorJitter):
            steps.append(("ColorJitter", tuple(step.brightness), tuple(step.contrast), tuple(step.saturation),
                          tuple(step.hue)))
        elif isinstance(step, v2.RandomPerspective):
            steps.append(("RandomPerspective", step.distortion_scale, step.p, step.interpolation))
        elif isinstance(step, v2.Normalize):
            steps.append(("Normalize", tuple(step.mean), tuple(step.std)))
        elif hasattr(step, "sigma"):
            steps.append((type(step).__name__, tuple(step.sigma), getattr(step, "kernel_size", None)))
        else:
            steps.append((type(step).__name__,))
    return steps


def test_strong_view_is_the_reference_composition():
    jitter = ("ColorJitter", (0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))  # ColorJitter(.4, .4, .4, .1)
    expected = [
        ("RandomResizedCrop", (224, 224), (0.2, 1.0), (3 / 4, 4 / 3), InterpolationMode.BILINEAR),
        ("RandomHorizontalFlip", 0.5),
        ("RandomApply", 0.8, jitter),
        ("RandomPerspective", 0.2, 0.5, InterpolationMode.BICUBIC),  # interpolation=3
        jitter,  # the second, unconditional jitter
        ("PILGaussianBlur", (0.1, 2.0), None),  # PIL's blur, radius ~ U(0.1, 2.0), always
        ("ToImage",), ("ToDtype",), ("Normalize", CLIP_MEAN, CLIP_STD),
    ]
    assert _describe(strong_transform(CLIP_224)) == expected
    dino = SimpleNamespace(preprocess=Preprocess(224, IMAGENET_MEAN, IMAGENET_STD, crop_pct=0.9))
    assert _describe(tuning_views(SimpleNamespace(preprocess=CLIP_224), dino).transforms[1]) == expected  # NoLA's


def test_strong_view_blurs_every_image_with_pil_radius():
    """The blur step is PIL's GaussianBlur(radius=sigma), as the reference's `GaussianBlur` class."""
    from PIL import ImageFilter

    blur = strong_transform(CLIP_224).transforms[5]
    image = Image.new("RGB", (32, 32))
    image.paste((255, 255, 255), (0, 0, 16, 32))
    torch.manual_seed(0)
    sigma = torch.empty(1).uniform_(0.1, 2.0).item()
    torch.manual_seed(0)
    assert blur(image).tobytes() == image.filter(ImageFilter.GaussianBlur(radius=sigma)).tobytes()


# ── optimiser and schedule (reference: trainers/NoLA.py, NoLA.setup_optim) ──────────────────────


@pytest.fixture(scope="module")
def tiny():
    clip = load_clip(ModelConfig.from_profile("tiny"))
    spec = load_dataset_spec(demo_dataset_path())
    records = build_manifest(spec, "unlabeled").records[:8]
    cde = torch.nn.functional.normalize(torch.randn(len(spec.classes), clip.embed_dim,
                                                    generator=torch.Generator().manual_seed(0)), dim=-1)
    return clip, spec, records, cde


def _trainable_names(clip) -> list[str]:
    """What NoLA trains, by name, from the architecture: the prompts, the head, and every
    LayerNorm of the vision tower (open_clip names: ln_pre, ln_1 / ln_2 per block, ln_post)."""
    blocks = len(clip.visual.transformer.resblocks)
    layer_norms = ["ln_pre", *[f"transformer.resblocks.{i}.{ln}" for i in range(blocks) for ln in ("ln_1", "ln_2")],
                   "ln_post"]
    return ["encoder.prompts", "head.weight",
            *[f"encoder.visual.{ln}.{kind}" for ln in layer_norms for kind in ("weight", "bias")]]


def test_no_weight_decay_on_biases_and_a_constant_learning_rate(tiny, monkeypatch):
    clip, spec, records, cde = tiny
    seen = {"groups": None, "lrs": []}

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, params, *args, **kwargs):
            super().__init__(params, *args, **kwargs)
            seen["groups"] = self.param_groups

        def step(self, closure=None):
            seen["lrs"].append([group["lr"] for group in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    classifier = build_prompt_classifier(clip, cde, TuningConfig(num_prompts=2))
    names = {id(p): name for name, p in classifier.named_parameters()}
    config = TuningConfig(num_prompts=2, epochs=2, batch_size=4, micro_batch_size=4, reference_batch_size=4,
                          compute=ComputeSettings(num_workers=0))
    views = MultiView((strong_transform(clip.preprocess), strong_transform(clip.preprocess)))
    train_prompts(classifier, spec.root, records, views, lambda weak: torch.zeros(len(weak), dtype=torch.long),
                  config, device="cpu")

    decay = {names[id(p)]: group["weight_decay"] for group in seen["groups"] for p in group["params"]}
    expected = {name: 0.0 if "bias" in name else 0.01 for name in _trainable_names(clip)}
    assert decay == expected
    assert len(seen["lrs"]) == 4  # 8 images, batch 4, 2 epochs
    assert all(lr == config.lr for step in seen["lrs"] for lr in step)  # MultiStepLR without milestones


# ── tuned head (reference: trainers/NoLA.py, NoLAUFT.forward_aug_with_prompts / eval_clip) ───────


def test_tuned_head_is_the_cde_adapter_on_the_unnormalised_projected_feature(tiny, tmp_path):
    """Training (forward), scoring stored features (`tuned_head_probabilities`) and an export
    reloaded by `nola predict` all give the reference's logits: feature @ W.T, no norm, no scale."""
    clip, spec, records, cde = tiny
    classifier = build_prompt_classifier(clip, cde, TuningConfig(num_prompts=2)).eval()
    images = torch.randn(3, 3, clip.preprocess.image_size, clip.preprocess.image_size,
                         generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        visual = classifier.encoder.visual
        tokens = visual._embeds(images)  # patches, class token, positions, ln_pre
        tokens = torch.cat([tokens[:, :1], classifier.encoder.prompts[0].expand(3, -1, -1), tokens[:, 1:]], dim=1)
        cls = visual.ln_post(visual.transformer(tokens)[:, 0])
        projected = cls @ visual.proj  # no normalisation, as forward_after_patch_embeddings
        expected = projected @ cde.T  # cde_adapter: Linear(512, C, bias=False), weight = CDE
        assert torch.allclose(classifier(images), expected, atol=1e-5)
        features = classifier.image_features(images)
        assert torch.allclose(tuned_head_probabilities(classifier, features), expected.softmax(-1), atol=1e-6)
        assert not torch.allclose(projected.norm(dim=-1), torch.ones(3))  # the test could tell the two apart
    export_classifier(classifier, ModelConfig.from_profile("tiny"), clip.preprocess, spec.classes, tmp_path)
    with torch.no_grad():
        assert torch.allclose(load_classifier(tmp_path).logits(images), expected, atol=1e-5)
