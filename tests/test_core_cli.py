"""The core `nola` command (nola_core.cli): `predict` and `export` without Dagster, and the
Dagster commands it adds from nola_assets. The run in an environment without Dagster is in
test_packaging.py."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from nola_core.artifact_refs import ArtifactRef, ref_path
from nola_core.cli import DAGSTER_COMMANDS, DAGSTER_INSTALL, build_parser, main
from nola_core.data import build_manifest, eval_transform, load_dataset_spec, load_rgb
from nola_core.demo import demo_dataset_path
from nola_core.export import EXPORT_ASSET, MANIFEST_NAME, TENSORS_NAME, TUNED_ASSET, export_classifier
from nola_core.models import ModelConfig, load_clip
from nola_core.tuning import build_prompt_classifier
from nola_core.tuning import TuningConfig

TINY = ModelConfig.from_profile("tiny")


def export_where_sneaker_wins(folder: Path) -> Path:
    """Export a tiny classifier whose head rows are the image's own feature for 'sneaker' and its
    negative for every other class, so 'sneaker' gets logit +scale and the rest -scale, whatever
    the random encoder computes. Returns that image (the first of the bundled demo dataset)."""
    clip = load_clip(TINY)
    spec = load_dataset_spec(demo_dataset_path())
    image = spec.root / build_manifest(spec, "unlabeled").records[0].path
    classifier = build_prompt_classifier(clip, torch.zeros(len(spec.classes), clip.embed_dim),
                                         TuningConfig(num_prompts=4)).eval()
    with torch.no_grad():
        feature = classifier.image_features(eval_transform(clip.preprocess)(load_rgb(image))[None])[0]
        winner = spec.classes.index("sneaker")
        classifier.head.weight.copy_(-feature.expand(len(spec.classes), -1))
        classifier.head.weight[winner] = feature
    export_classifier(classifier, TINY, clip.preprocess, spec.classes, folder)
    return image


def test_predict_prints_the_class_that_must_win(tmp_path, capsys):
    image = export_where_sneaker_wins(tmp_path / "export")
    assert main(["predict", str(tmp_path / "export"), str(image), "-k", "2"]) == 0
    [line] = capsys.readouterr().out.strip().splitlines()
    path, top = line.split("\t")
    assert path == str(image) and top.startswith("sneaker (1.000)")
    assert main(["predict", str(tmp_path / "nowhere"), str(image)]) == 1


def _store_ref(root: Path, asset: str, digest: str, key: dict) -> ArtifactRef:
    """A finished artifact folder and the refs/ pointer to it, as the Dagster store leaves them."""
    ref = ArtifactRef(asset=asset, dataset="shop", digest=digest, path="/elsewhere", key=key)
    (root / "shop" / asset / digest).mkdir(parents=True)
    ref_path(root, asset, "shop").parent.mkdir(parents=True, exist_ok=True)
    ref_path(root, asset, "shop").write_text(json.dumps(ref.to_json()))
    return ref


def test_export_copies_the_stores_export_and_refuses_a_stale_one(tmp_path, monkeypatch, capsys):
    """`nola export` reads the store under NOLA_ARTIFACT_ROOT through its refs/ pointers only: the
    pointed-to files are copied (the pointer's old path is ignored), and an export whose tuned
    encoder was rematerialized since is refused."""
    root = tmp_path / "artifacts"
    _store_ref(root, EXPORT_ASSET, "e1", {"tuned": "t1"})
    for name in (MANIFEST_NAME, TENSORS_NAME):
        (root / "shop" / EXPORT_ASSET / "e1" / name).write_text(f"content of {name}")
    _store_ref(root, TUNED_ASSET, "t1", {})
    monkeypatch.setenv("NOLA_ARTIFACT_ROOT", str(root))

    assert main(["export", "shop", "--to", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / TENSORS_NAME).read_text() == f"content of {TENSORS_NAME}"

    ref_path(root, TUNED_ASSET, "shop").unlink()
    _store_ref(root, TUNED_ASSET, "t2", {})  # a newer tuned encoder than the export was made from
    capsys.readouterr()
    assert main(["export", "shop", "--to", str(tmp_path / "again")]) == 1
    assert "is stale" in capsys.readouterr().err and not (tmp_path / "again").exists()
    assert main(["export", "../shop", "--to", str(tmp_path / "x")]) == 1  # a name that leads outside the store


def test_the_dagster_commands_come_from_nola_assets():
    """Where Dagster is installed (here), run/demo/dev are nola_assets' own commands, and those are
    exactly the names the core offers a stand-in for without it."""
    from nola_assets.cli import add_commands

    added = argparse.ArgumentParser().add_subparsers()
    add_commands(added)
    assert set(added.choices) == set(DAGSTER_COMMANDS)
    parser = build_parser()
    for name in DAGSTER_COMMANDS:
        parsed = parser.parse_args([name, "x"] if name == "run" else [name])
        assert parsed.handler.__module__ == "nola_assets.cli", name


def test_without_dagster_its_commands_name_the_extra_whatever_their_arguments(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "dagster" else real(name, *rest))
    for argv in (["run", "--profile", "tiny", "photos"], ["demo"], ["dev", "--", "-p", "3001"]):
        assert main(argv) == 1, argv
        assert DAGSTER_INSTALL in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["predict", "--no-such-option", "export", "image.png"])
    assert refused.value.code == 2  # a core command still refuses what it does not know
