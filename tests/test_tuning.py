"""Prompt tuning: only trainable tensors move, the checkpoint is small and reloads exactly."""

import copy

import pytest
import torch

from nola_core.data import MultiView, build_manifest, eval_transform, load_dataset_spec, strong_transform, weak_transform
from nola_core.demo import demo_dataset_path
from nola_core.models import ModelConfig, PromptTunedClassifier, load_clip
from nola_core.text import cde_classifier, get_templates
from nola_core.tuning import TuningConfig, load_trainable, save_trainable, train_prompts


@pytest.fixture(scope="module")
def setup():
    clip = load_clip(ModelConfig.from_profile("tiny"))
    spec = load_dataset_spec(demo_dataset_path())
    manifest = build_manifest(spec, "unlabeled")
    cde = cde_classifier(clip, spec.classes, get_templates("generic"), {c: [f"a {c} on white."] for c in spec.classes})
    return clip, spec, manifest, cde


def _classifier(clip, cde, **kwargs):
    return PromptTunedClassifier(copy.deepcopy(clip.visual), cde, num_prompts=4, **kwargs)


def _first_pixel_labeller(num_classes):
    """A fixed, deterministic pseudo-labeller standing in for the DL network."""
    return lambda weak: (weak[:, 0, 0, 0] * 1000).long().remainder(num_classes)


def test_training_changes_exactly_the_trainable_tensors(setup, tmp_path):
    clip, spec, manifest, cde = setup
    classifier = _classifier(clip, cde)
    before = {name: p.detach().clone() for name, p in classifier.named_parameters()}
    views = MultiView((weak_transform(clip.preprocess), strong_transform(clip.preprocess)))
    config = TuningConfig(epochs=2, batch_size=64, micro_batch_size=16, num_workers=0, lr=1e-2)
    history = train_prompts(classifier, spec.root, manifest.records[:48], views,
                            _first_pixel_labeller(len(spec.classes)), config, device="cpu")
    assert [s.epoch for s in history] == [1, 2] and all(s.images == 48 for s in history)
    assert all(0.0 <= s.agreement <= 1.0 and s.mean_entropy >= 0 for s in history)
    for name, parameter in classifier.named_parameters():
        changed = not torch.equal(before[name], parameter.detach())
        assert changed == parameter.requires_grad, name

    checkpoint = tmp_path / "tuned.safetensors"
    save_trainable(classifier, checkpoint, {"clip_name": clip.config.clip_name})
    trainable_bytes = sum(p.numel() * 4 for p in classifier.parameters() if p.requires_grad)
    assert checkpoint.stat().st_size < trainable_bytes + 16_384  # only the trainable tensors

    fresh = load_trainable(_classifier(load_clip(ModelConfig.from_profile("tiny")), cde), checkpoint)
    images = torch.stack([eval_transform(clip.preprocess)(img) for img in _demo_images(spec, manifest, 6)])
    with torch.no_grad():
        assert torch.equal(fresh(images), classifier.eval()(images))
        assert not torch.equal(_classifier(clip, cde)(images), classifier(images))


def test_same_seed_gives_identical_tuning(setup):
    clip, spec, manifest, cde = setup
    views = MultiView((weak_transform(clip.preprocess), strong_transform(clip.preprocess)))
    config = TuningConfig(epochs=1, batch_size=32, micro_batch_size=16, num_workers=2, seed=3)
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
    from nola_core.data import load_rgb

    return [load_rgb(spec.root / record.path) for record in manifest.records[:count]]
