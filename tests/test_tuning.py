"""Prompt tuning: only the tensors named below move, the checkpoint holds exactly those and
reloads exactly, and NoLA's pseudo-labeller sees the weak view.

The check functions (`check_*`) are shared with tests/test_sabotage.py, which breaks each
mechanism on purpose and asserts that the check fails.
"""

import copy
import re

import pytest
import torch
from safetensors import safe_open
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from nola_core.methods.nola import tune_prompts
from nola_core.alignment import alignment_network
from nola_core.data import MultiView, build_manifest, eval_transform, load_dataset_spec, load_rgb, strong_transform, weak_transform
from nola_core.demo import demo_dataset_path
from nola_core.models import ModelConfig, PromptTunedClassifier, load_clip, load_dino
from nola_core.runtime import ComputeSettings
from nola_core.text import cde_classifier, get_templates
from nola_core.tuning import TuningConfig, load_trainable, save_trainable, train_prompts

# What prompt tuning may train, written down independently of the code's `requires_grad`: the
# prompt tokens, the affine of every LayerNorm of the vision tower, the classifier head.
TRAINABLE_NAMES = re.compile(
    r"encoder\.prompts"
    r"|encoder\.visual\.(ln_pre|ln_post|transformer\.resblocks\.\d+\.ln_[12])\.(weight|bias)"
    r"|head\.weight"
)
CHECKPOINT_OVERHEAD = 16_384  # safetensors header and metadata, bytes


def tuning_setup():
    """The tiny CLIP, the demo dataset, its manifest and a CDE classifier from one description each."""
    clip = load_clip(ModelConfig.from_profile("tiny"))
    spec = load_dataset_spec(demo_dataset_path())
    manifest = build_manifest(spec, "unlabeled")
    cde = cde_classifier(clip, spec.classes, get_templates("generic"), {c: [f"a {c} on white."] for c in spec.classes})
    return clip, spec, manifest, cde


@pytest.fixture(scope="module")
def setup():
    return tuning_setup()


def _classifier(clip, cde, **kwargs):
    return PromptTunedClassifier(copy.deepcopy(clip.visual), cde, num_prompts=4, **kwargs)


def _first_pixel_labeller(num_classes):
    """A fixed, deterministic pseudo-labeller standing in for the DL network."""
    return lambda weak: (weak[:, 0, 0, 0] * 1000).long().remainder(num_classes)


def tune_tiny(setup, images: int, epochs: int):
    """(classifier before, classifier after, history) of prompt tuning on the first demo images."""
    clip, spec, manifest, cde = setup
    classifier = _classifier(clip, cde)
    before = copy.deepcopy(classifier)
    views = MultiView((weak_transform(clip.preprocess), strong_transform(clip.preprocess)))
    config = TuningConfig(epochs=epochs, batch_size=64, micro_batch_size=16, lr=1e-2,
                          compute=ComputeSettings(num_workers=0))
    history = train_prompts(classifier, spec.root, manifest.records[:images], views,
                            _first_pixel_labeller(len(spec.classes)), config, device="cpu")
    return before, classifier, history


def check_only_named_tensors_train(before, after):
    """Every tensor in TRAINABLE_NAMES moved and no other did, by name (not by `requires_grad`)."""
    old = dict(before.named_parameters())
    moved = {name for name, p in after.named_parameters() if not torch.equal(old[name].detach(), p.detach())}
    named = {name for name, _ in after.named_parameters() if TRAINABLE_NAMES.fullmatch(name)}
    assert named, "no parameter has a trainable name"
    assert moved == named, (f"trained outside the named tensors: {sorted(moved - named)[:5]}; "
                            f"named but unchanged: {sorted(named - moved)[:5]}")


def check_checkpoint_holds_the_named_tensors_and_reloads_exactly(setup, classifier, path):
    """The checkpoint holds exactly the named tensors, in float32 and no bigger than they are, and a
    fresh classifier loaded from it gives bit-identical logits on real images."""
    clip, spec, manifest, cde = setup
    save_trainable(classifier, path, {"clip_name": clip.config.clip_name})
    named = {name: p for name, p in classifier.named_parameters() if TRAINABLE_NAMES.fullmatch(name)}
    with safe_open(str(path), "pt") as stored:
        keys = set(stored.keys())
        dtypes = {stored.get_slice(name).get_dtype() for name in keys}
    assert keys == set(named), f"checkpoint tensors: extra {sorted(keys - set(named))[:5]}, missing {sorted(set(named) - keys)[:5]}"
    assert dtypes == {"F32"}, f"checkpoint dtypes {dtypes}"
    named_bytes = sum(p.numel() * 4 for p in named.values())
    assert path.stat().st_size < named_bytes + CHECKPOINT_OVERHEAD, "checkpoint bigger than the named tensors"

    fresh = load_trainable(_classifier(load_clip(ModelConfig.from_profile("tiny")), cde), path)
    images = torch.stack([eval_transform(clip.preprocess)(img) for img in _demo_images(spec, manifest, 6)])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images), classifier.eval()(images)), "reloaded classifier differs"
        assert not torch.equal(_classifier(clip, cde)(images), classifier(images))


def test_training_changes_exactly_the_trainable_tensors(setup, tmp_path):
    before, classifier, history = tune_tiny(setup, images=48, epochs=2)
    assert [s.epoch for s in history] == [1, 2] and all(s.images == 48 for s in history)
    assert all(0.0 <= s.agreement <= 1.0 and s.mean_entropy >= 0 for s in history)
    old = dict(before.named_parameters())
    for name, parameter in classifier.named_parameters():
        changed = not torch.equal(old[name], parameter.detach())
        assert changed == parameter.requires_grad, name
    check_only_named_tensors_train(before, classifier)

    checkpoint = tmp_path / "tuned.safetensors"
    check_checkpoint_holds_the_named_tensors_and_reloads_exactly(setup, classifier, checkpoint)
    trainable_bytes = sum(p.numel() * 4 for p in classifier.parameters() if p.requires_grad)
    assert checkpoint.stat().st_size < trainable_bytes + CHECKPOINT_OVERHEAD  # only the trainable tensors


def check_tuning_follows_the_labeller(setup, images: int = 16):
    """The training targets are the pseudo-labeller's: a labeller that names the class the untuned
    classifier predicts least turns (almost) every prediction into that class in one epoch."""
    clip, spec, manifest, cde = setup
    classifier = _classifier(clip, cde)
    batch = torch.stack([eval_transform(clip.preprocess)(img) for img in _demo_images(spec, manifest, images)])
    with torch.no_grad():
        untuned = classifier.eval()(batch).argmax(-1)
    target = int(torch.bincount(untuned, minlength=len(spec.classes)).argmin())
    views = MultiView((weak_transform(clip.preprocess), strong_transform(clip.preprocess)))
    config = TuningConfig(epochs=1, batch_size=images, micro_batch_size=images, reference_batch_size=images, lr=1e-2,
                          compute=ComputeSettings(num_workers=0))
    train_prompts(classifier, spec.root, manifest.records[:images], views,
                  lambda weak: torch.full((len(weak),), target), config, device="cpu")
    with torch.no_grad():
        share = (classifier.eval()(batch).argmax(-1) == target).float().mean().item()
    assert share >= 0.9, f"after tuning on the labeller's class {target}, {share:.2f} of the images are predicted as it"


def test_tuning_trains_towards_the_labellers_labels(setup):
    check_tuning_follows_the_labeller(setup)


# --- NoLA's pseudo-labeller sees the weak view -------------------------------------------------


class RecordingDino:
    """The tiny DINO, recording every batch the pseudo-labeller feeds it."""

    def __init__(self, dino):
        self.dino = dino
        self.preprocess, self.model, self.feature_dim = dino.preprocess, dino.model, dino.feature_dim
        self.inputs: list[torch.Tensor] = []

    def encode_image(self, images):
        self.inputs.append(images.detach().float().clone())
        return self.dino.encode_image(images)


def possible_weak_views(image, pre) -> torch.Tensor:
    """Every view the weak augmentation can make of `image`, enumerated by hand: the shorter side
    resized, each crop position of an image_size square, flipped or not, normalised. [V, 3, S, S]"""
    resized = TF.to_image(TF.resize(image, [pre.resize_size], interpolation=InterpolationMode(pre.interpolation),
                                    antialias=True))
    height, width = resized.shape[-2:]
    size = pre.image_size
    crops = [resized[:, top : top + size, left : left + size]
             for top in range(height - size + 1) for left in range(width - size + 1)]
    crops += [crop.flip(-1) for crop in crops]
    mean, std = torch.tensor(pre.mean)[:, None, None], torch.tensor(pre.std)[:, None, None]
    return torch.stack([(crop.float() / 255 - mean) / std for crop in crops])


def check_nola_labeller_sees_weak_views(clip, dino, spec, records, tolerance=1e-5):
    """NoLA's prompt tuning (`methods.nola.tune_prompts`, real views and labeller) on a few demo images:
    every image the DL network's DINO receives is one of the weak views of a training image."""
    recorder = RecordingDino(dino)
    network = alignment_network(dino.feature_dim, len(spec.classes), hidden_dim=8)
    config = TuningConfig(num_prompts=2, epochs=1, batch_size=len(records), micro_batch_size=len(records),
                          compute=ComputeSettings(num_workers=0))
    tune_prompts(clip, recorder, network, torch.eye(len(spec.classes), clip.embed_dim), spec.root, records, config,
                 "cpu")
    received = torch.cat(recorder.inputs)
    assert len(received) == len(records), f"the labeller saw {len(received)} views of {len(records)} images"
    candidates = torch.cat([possible_weak_views(load_rgb(spec.root / r.path), dino.preprocess) for r in records])
    distance = (received[:, None] - candidates[None]).abs().flatten(2).amax(-1).amin(-1)
    assert (distance <= tolerance).all(), f"the labeller received views that no weak augmentation makes: {distance}"


def test_nola_pseudo_labeller_is_fed_the_weak_view(setup):
    clip, spec, manifest, _ = setup
    dino = load_dino(ModelConfig.from_profile("tiny"))
    check_nola_labeller_sees_weak_views(clip, dino, spec, manifest.records[:6])


def test_same_seed_gives_identical_tuning(setup):
    clip, spec, manifest, cde = setup
    views = MultiView((weak_transform(clip.preprocess), strong_transform(clip.preprocess)))
    config = TuningConfig(epochs=1, batch_size=32, micro_batch_size=16, seed=3, compute=ComputeSettings(num_workers=2))
    results = []
    for _ in range(2):
        classifier = _classifier(clip, cde)
        train_prompts(classifier, spec.root, manifest.records[:32], views,
                      _first_pixel_labeller(len(spec.classes)), config, device="cpu")
        results.append(classifier.trainable_state_dict())
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_checkpoint_for_another_model_is_refused(setup, tmp_path):
    clip, _, _, cde = setup
    classifier = _classifier(clip, cde)
    path = tmp_path / "c.safetensors"
    save_trainable(classifier, path)
    with pytest.raises(ValueError, match=r"encoder.prompts: shape \(1, 4, 64\), model expects \(2, 4, 64\)"):
        load_trainable(PromptTunedClassifier(copy.deepcopy(clip.visual), cde, deep_prompts=True, num_prompts=4), path)
    tensors = classifier.trainable_state_dict()
    tensors["encoder.visual.conv1.weight"] = torch.zeros(1)
    del tensors["head.weight"]
    with pytest.raises(ValueError, match=r"missing \['head.weight'\], unexpected \['encoder.visual.conv1.weight'\]"):
        _classifier(clip, cde).load_trainable_state_dict(tensors)


def _demo_images(spec, manifest, count):
    return [load_rgb(spec.root / record.path) for record in manifest.records[:count]]


def test_every_optimizer_step_takes_batch_size_images_whatever_the_micro_batch(setup, monkeypatch):
    """A batch that the micro-batch does not divide (LaFTer: 50 images, micro-batches of 32) is
    still one optimizer step of `batch_size` images, cut into micro-batches of at most `micro`."""
    from nola_core import tuning

    clip, spec, manifest, cde = setup
    steps = []

    def recorded_plan(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        steps.extend((images, [len(batch) for batch in batches]) for images, batches in plan)
        return plan

    real_plan = tuning.epoch_plan
    monkeypatch.setattr(tuning, "epoch_plan", recorded_plan)
    config = TuningConfig(epochs=1, batch_size=10, micro_batch_size=4, reference_batch_size=10,
                          compute=ComputeSettings(num_workers=0))
    views = MultiView((weak_transform(clip.preprocess), strong_transform(clip.preprocess)))
    train_prompts(_classifier(clip, cde), spec.root, manifest.records[:20], views,
                  _first_pixel_labeller(len(spec.classes)), config, device="cpu")
    assert steps == [(10, [4, 4, 2]), (10, [4, 4, 2])]
