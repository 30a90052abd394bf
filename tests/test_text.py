"""Template sets and the text classifiers (zero-shot, CDE) with uneven description counts."""

import hashlib

import pytest
import torch
import torch.nn.functional as F

from nola_core.models import ModelConfig, load_clip
from nola_core.text import (
    cde_classifier,
    cde_texts,
    class_text_embeddings,
    get_templates,
    template_set_names,
    zero_shot_classifier,
)

NOLA_DATASETS = ["imagenet", "cifar10", "cifar100", "caltech101", "dtd", "eurosat", "flowers102",
                 "sun397", "ucf101", "imagenet_a", "imagenet_r", "imagenet_sketch"]


def _fake_encoder(texts):
    """A deterministic stand-in text encoder: one fixed random vector per distinct string."""
    rows = []
    for text in texts:
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        rows.append(torch.randn(16, generator=torch.Generator().manual_seed(seed)) * (1 + len(text)))
    return torch.stack(rows)


def test_template_sets_cover_the_nola_datasets():
    names = template_set_names()
    for dataset in NOLA_DATASETS + ["generic"]:
        assert dataset in names
        templates = get_templates(dataset)
        assert templates and all(t.count("{}") == 1 for t in templates)
    assert len(get_templates("imagenet_openai80")) == 80  # CLIP's set, from open_clip
    assert get_templates("cifar100_openai18") == get_templates("cifar10")  # CLIP's CIFAR sets are one
    with pytest.raises(ValueError, match="unknown template set 'nope'.*eurosat"):
        get_templates("nope")


def test_class_embedding_is_the_renormalised_mean_of_normalised_texts_with_uneven_counts():
    texts = [["a", "bb", "ccc"], ["dddd"], ["e", "ff"]]
    weights = class_text_embeddings(_fake_encoder, texts, batch_size=2)  # batches cross classes
    for class_index, class_texts in enumerate(texts):
        expected = F.normalize(F.normalize(_fake_encoder(class_texts), dim=-1).mean(0), dim=0)
        assert torch.allclose(weights[class_index], expected, atol=1e-6)
    with pytest.raises(ValueError, match="class #1 has no text"):
        class_text_embeddings(_fake_encoder, [["a"], []])


def test_cde_uses_descriptions_plus_templates_and_empty_means_templates_only():
    texts = cde_texts(["cat", "dog"], ["a photo of a {}."], {"cat": ["a small furry cat."], "dog": []})
    assert texts == [["a small furry cat.", "a photo of a cat."], ["a photo of a dog."]]
    with pytest.raises(ValueError, match=r"descriptions missing for classes: \['dog'\]"):
        cde_texts(["cat", "dog"], ["a photo of a {}."], {"cat": ["x"]})


def test_cde_and_zero_shot_through_the_real_tiny_clip_text_encoder():
    clip = load_clip(ModelConfig.from_profile("tiny"))
    classes = ["t-shirt", "bag"]
    templates = get_templates("generic")
    zero_shot = zero_shot_classifier(clip, classes, templates)
    cde = cde_classifier(clip, classes, templates, {"t-shirt": ["a cotton top."], "bag": ["a leather handbag."]})
    templates_only = cde_classifier(clip, classes, templates, {"t-shirt": [], "bag": []})
    assert zero_shot.shape == cde.shape == (2, clip.embed_dim)
    assert torch.allclose(cde.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(templates_only, zero_shot, atol=1e-6)
    assert not torch.allclose(cde, zero_shot, atol=1e-4)
