"""A weights folder for machines without internet: written by the same fetch code as
`nola weights download` (given local files as the source, as open_clip and timm both allow),
read first by the loaders, every file checked against its manifest's SHA-256."""

import hashlib
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from nola_core.cli import main
from nola_core.models import ModelConfig, load_clip, load_dino
from nola_core.models.loading import CheckpointHashError, WeightsUnavailableError
from nola_core.models.registry import MINI_CLIP_NAME, MINI_DINO_NAME, TINY_CLIP_NAME, TINY_DINO_NAME
from nola_core.models.weights import MANIFEST, WEIGHTS_DIR_ENV, clip_request, dino_request, download_weights
from nola_core.preflight import Environment, check_models

from nola_assets.resources import ModelsResource

MINI = ModelConfig.from_profile("mini")
TAG = "mini"  # a tag open_clip does not know: only the weights folder can supply it


def _write_mini_folder(folder):
    return download_weights(folder, [clip_request(MINI_CLIP_NAME, TAG, {"file": MINI.clip_checkpoint}),
                                     dino_request(MINI_DINO_NAME, {"file": MINI.dino_checkpoint})], log=lambda _: None)


def _by_folder(folder=None) -> ModelConfig:
    return ModelConfig(clip_name=MINI_CLIP_NAME, clip_pretrained=TAG, dino_name=MINI_DINO_NAME, dino_pretrained=True,
                       weights_dir=None if folder is None else str(folder))


def test_a_weights_folder_loads_the_same_models_as_their_checkpoint_paths(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    clip_entry, dino_entry = _write_mini_folder(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert [(m["kind"], m["name"], m["tag"]) for m in manifest["models"]] == [
        ("clip", MINI_CLIP_NAME, TAG), ("dino", MINI_DINO_NAME, None)]
    assert (clip_entry.sha256, dino_entry.sha256) == (MINI.clip_checkpoint_sha256, MINI.dino_checkpoint_sha256)
    assert clip_entry.size == (folder / clip_entry.file).stat().st_size and clip_entry.source == MINI.clip_checkpoint

    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    by_path_clip, by_path_dino = load_clip(MINI), load_dino(MINI)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(folder))  # the environment variable, as on an air-gapped machine
    edge = ModelsResource(clip_model=MINI_CLIP_NAME, clip_pretrained=TAG, dino_model=MINI_DINO_NAME)
    from_the_edge = edge.config()
    assert from_the_edge.weights_dir == str(folder)  # the Dagster resource reads it into the model config
    for config in (_by_folder(folder), from_the_edge):
        clip, dino = load_clip(config), load_dino(config)
        with torch.inference_mode():
            assert torch.equal(clip.encode_image(images), by_path_clip.encode_image(images))
            assert torch.equal(clip.encode_text(["a shirt"]), by_path_clip.encode_text(["a shirt"]))
            assert torch.equal(dino.encode_image(images), by_path_dino.encode_image(images))
        assert clip.preprocess == by_path_clip.preprocess and dino.preprocess == by_path_dino.preprocess

    with pytest.raises(WeightsUnavailableError, match="nola weights download --clip nola-mini-clip:mini"):
        load_clip(_by_folder())  # the core reads no environment: without the folder the tag is unknown


def test_a_file_whose_hash_differs_from_the_manifest_is_refused_by_name(tmp_path):
    tiny = ModelConfig.from_profile("tiny")
    sources = tmp_path / "sources"
    sources.mkdir()
    torch.save(load_clip(tiny).model.state_dict(), sources / "clip.pt")
    torch.save(load_dino(tiny).model.state_dict(), sources / "dino.pt")
    folder = tmp_path / "weights"
    clip_entry, dino_entry = download_weights(folder, [clip_request(TINY_CLIP_NAME, "t", {"file": str(sources / "clip.pt")}),
                                                       dino_request(TINY_DINO_NAME, {"file": str(sources / "dino.pt")})],
                                              log=lambda _: None)
    config = ModelConfig(clip_name=TINY_CLIP_NAME, clip_pretrained="t", dino_name=TINY_DINO_NAME, dino_pretrained=True,
                         weights_dir=str(folder))
    load_clip(config), load_dino(config)  # intact: loads
    for entry, load in ((clip_entry, load_clip), (dino_entry, load_dino)):
        path = folder / entry.file
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointHashError, match=f"{path}.*nola weights download"):
            load(config)


def test_the_preflight_counts_a_folder_holding_the_models_as_present(tmp_path):
    folder = tmp_path / "weights"
    _write_mini_folder(folder)
    offline = Environment(environ={"HF_HUB_OFFLINE": "1"}, reachable=lambda hosts: False,
                          free_bytes=lambda path: 10**12)
    assert check_models(_by_folder(folder), offline) == []
    (folder / "clip" / MINI_CLIP_NAME / TAG / "nola-mini-clip.safetensors").write_bytes(b"short")
    [problem] = check_models(_by_folder(folder), offline)
    assert "nola-mini-clip.safetensors" in problem.why and "nola weights download" in problem.fix


def _hub_cache_file(repo: str, name: str, content: bytes) -> None:
    """A file in the Hugging Face cache layout, as a download leaves it: refs/main names the
    snapshot, whose file links to a blob named by its hash."""
    folder = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    for sub in ("refs", "blobs", f"snapshots/{'0' * 40}"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text("0" * 40)
    blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
    blob.write_bytes(content)
    (folder / "snapshots" / ("0" * 40) / name).symlink_to(blob)


def test_download_of_the_paper_profile_goes_through_open_clip_and_timm(tmp_path, monkeypatch, capsys):
    """The real resolution of the paper's tags (open_clip's hub config, timm's), served offline from
    a Hugging Face cache the test fills, as a second `nola weights download` on a machine that
    already downloaded them would be."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _hub_cache_file("timm/vit_base_patch16_clip_224.openai", "open_clip_model.safetensors", b"clip weights")
    _hub_cache_file("timm/vit_base_patch16_224.dino", "model.safetensors", b"dino weights")

    assert main(["weights", "download", "--profile", "paper", "--to", str(tmp_path / "w")]) == 0
    assert f"{WEIGHTS_DIR_ENV}={tmp_path / 'w'}" in capsys.readouterr().out
    models = json.loads((tmp_path / "w" / MANIFEST).read_text())["models"]
    assert [(m["kind"], m["name"], m["tag"], m["file"], m["size"], m["sha256"]) for m in models] == [
        ("clip", "ViT-B-16", "openai", "clip/ViT-B-16/openai/open_clip_model.safetensors", 12,
         hashlib.sha256(b"clip weights").hexdigest()),
        ("dino", "vit_base_patch16_224.dino", None, "dino/vit_base_patch16_224.dino/model.safetensors", 12,
         hashlib.sha256(b"dino weights").hexdigest())]
    assert models[0]["source"] == "hf-hub:timm/vit_base_patch16_clip_224.openai/open_clip_model.safetensors"
    assert not any((tmp_path / "w" / m["file"]).is_symlink() for m in models)  # the bytes, to carry elsewhere
    offline = Environment(environ={"HF_HUB_OFFLINE": "1"}, reachable=lambda hosts: False,
                          free_bytes=lambda path: 10**12)
    assert check_models(ModelConfig.from_profile("paper", weights_dir=str(tmp_path / "w")), offline) == []

    assert main(["weights", "download", "--clip", "ViT-B-16:no-such-tag", "--to", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert "no-such-tag" in err and "openai" in err and "Traceback" not in err


def test_download_of_a_profile_without_pretrained_weights_fetches_nothing(tmp_path, capsys):
    assert main(["weights", "download", "--profile", "mini", "--to", str(tmp_path / "w")]) == 0
    assert "nothing to download" in capsys.readouterr().out
    assert not (tmp_path / "w").exists()


def test_a_tag_trained_with_quick_gelu_loads_with_quick_gelu(tmp_path, monkeypatch):
    """OpenAI's CLIP weights were trained with QuickGELU, which open_clip's `ViT-B-16` config does
    not use (it only warns): a model loaded by such a tag must run QuickGELU, and its cache key
    must say so. The tag is declared the way open_clip declares `openai` (its pretrained table)."""
    import open_clip
    from open_clip.transformer import QuickGELU

    assert ModelConfig.from_profile("paper").clip_quick_gelu  # ViT-B-16 / openai, by open_clip's own table
    assert not ModelConfig(clip_name="ViT-B-32", clip_pretrained="laion2b_s34b_b79k").clip_quick_gelu
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, MINI_CLIP_NAME,
                        {TAG: open_clip.pretrained._pcfg(quick_gelu=True)})
    _write_mini_folder(tmp_path / "weights")
    config = _by_folder(tmp_path / "weights")
    activations = {type(m) for m in load_clip(config).model.visual.modules()}
    assert QuickGELU in activations and torch.nn.GELU not in activations
    assert config.clip_identity()["clip_quick_gelu"] == "True"
    assert ModelConfig.from_profile("mini").clip_identity()["clip_quick_gelu"] == "False"
