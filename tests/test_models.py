"""Model loading (tiny registered configs through the real open_clip / timm paths) and VPT."""

import pytest
import torch

from nola_core.data import CLIP_MEAN, IMAGENET_MEAN
from nola_core.models import (
    ModelConfig,
    PromptedVisionEncoder,
    PromptTunedClassifier,
    WeightsUnavailableError,
    load_clip,
    load_dino,
)

TINY = ModelConfig.from_profile("tiny")


@pytest.fixture(scope="module")
def tiny_clip():
    return load_clip(TINY)


def test_profiles_choose_the_papers_backbones_by_default():
    paper = ModelConfig()
    assert (paper.clip_name, paper.clip_pretrained, paper.dino_name) == (
        "ViT-B-16", "openai", "vit_base_patch16_224.dino")
    assert ModelConfig.from_profile("paper") == paper
    assert TINY.clip_is_random and TINY.dino_is_random and not paper.clip_is_random
    with pytest.raises(ValueError, match="unknown model profile 'huge'.*paper"):
        ModelConfig.from_profile("huge")


def test_each_model_carries_its_own_normalisation(tiny_clip):
    dino = load_dino(TINY)
    assert tiny_clip.preprocess.mean == pytest.approx(CLIP_MEAN)
    assert dino.preprocess.mean == pytest.approx(IMAGENET_MEAN)
    assert tiny_clip.preprocess.image_size == 32 and dino.preprocess.image_size == 32
    features = dino.encode_image(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, dino.feature_dim) and torch.isfinite(features).all()


def test_random_initialisation_is_reproducible_and_leaves_global_rng_alone(tiny_clip):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = load_clip(TINY)
    assert torch.rand(1) == before
    for a, b in zip(tiny_clip.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    other_seed = load_clip(ModelConfig.from_profile("tiny", init_seed=1))
    assert not torch.equal(other_seed.model.visual.proj, tiny_clip.model.visual.proj)


def test_offline_weights_error_names_the_model_and_the_local_path_option():
    with pytest.raises(WeightsUnavailableError, match="ViT-B-32.*openai.*clip_checkpoint"):
        load_clip(ModelConfig(clip_name="ViT-B-32"))
    with pytest.raises(WeightsUnavailableError, match="vit_small_patch16_224.dino.*dino_checkpoint"):
        load_dino(ModelConfig(dino_name="vit_small_patch16_224.dino"))


def test_local_checkpoints_go_through_the_same_loaders(tmp_path, tiny_clip):
    clip_file = tmp_path / "clip.pt"
    torch.save(tiny_clip.model.state_dict(), clip_file)
    loaded = load_clip(ModelConfig.from_profile("tiny", clip_checkpoint=str(clip_file), init_seed=5))
    assert torch.equal(loaded.model.visual.proj, tiny_clip.model.visual.proj)
    assert loaded.config.clip_identity()["clip_weights"].startswith("file:")

    from safetensors.torch import save_file

    dino = load_dino(TINY)
    dino_file = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in dino.model.state_dict().items()}, str(dino_file))
    reloaded = load_dino(ModelConfig.from_profile("tiny", dino_checkpoint=str(dino_file), init_seed=9))
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(reloaded.encode_image(images), dino.encode_image(images))


def test_text_encoder_gives_unit_vectors(tiny_clip):
    embeddings = tiny_clip.encode_text(["a photo of a bag.", "a photo of a sneaker."])
    assert embeddings.shape == (2, tiny_clip.embed_dim)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_vpt_without_prompts_reproduces_open_clip_forward(tiny_clip):
    """Guards our reading of open_clip's _embeds / transformer / _pool split."""
    images = torch.randn(3, 3, 32, 32)
    wrapped = PromptedVisionEncoder(tiny_clip.visual, num_prompts=0)
    with torch.no_grad():
        assert torch.allclose(wrapped(images), tiny_clip.visual(images), atol=1e-5)


@pytest.mark.parametrize("deep", [False, True])
def test_only_prompts_layernorms_and_head_are_trained(tiny_clip, deep):
    import copy

    classes = torch.nn.functional.normalize(torch.randn(4, tiny_clip.embed_dim), dim=-1)
    model = PromptTunedClassifier(copy.deepcopy(tiny_clip.visual), classes, num_prompts=5, deep_prompts=deep)
    assert model.encoder.prompts.shape[0] == (2 if deep else 1)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder.prompts" in trainable and "head.weight" in trainable
    assert any("ln_pre" in n for n in trainable) and any("ln_1" in n for n in trainable)
    assert not any("attn" in n or "conv1" in n or n.endswith("proj") for n in trainable)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    share = sum(p.numel() for n, p in model.named_parameters() if n in trainable) / sum(
        p.numel() for p in model.parameters())
    assert share < 0.5
