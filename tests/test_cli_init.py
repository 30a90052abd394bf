"""`nola init`: a folder of images and a class list become a dataset every command accepts."""

import hashlib
import shutil
from pathlib import Path

import pytest

from conftest import labels_from_folders
from nola_core.cli import main
from nola_core.data import DatasetSpecError, load_dataset_spec
from nola_core.data.init import check_classes, init_dataset, parse_classes
from nola_core.demo import demo_dataset_path
from nola_core.data.loading import load_dataset

CLASSES = "t-shirt, trouser, sneaker, bag"
PER_CLASS = 3


def _class_folders(folder: Path, names=("t-shirt", "Trouser", "sneaker", "bag")) -> dict[str, set[bytes]]:
    """PER_CLASS real demo images of each class in folder/<name>/ (one name in another case), and
    the bytes of each folder's images."""
    labeled = demo_dataset_path() / "labeled"
    contents = {}
    for name in names:
        (folder / name).mkdir(parents=True)
        for image in sorted((labeled / name.lower()).iterdir())[:PER_CLASS]:
            shutil.copy(image, folder / name / image.name)
        contents[name.lower()] = {p.read_bytes() for p in (folder / name).iterdir()}
    return contents


def _flat_folder(folder: Path, count: int = 8) -> list[Path]:
    folder.mkdir(parents=True)
    images = sorted((demo_dataset_path() / "unlabeled").iterdir())[:count]
    return [Path(shutil.copy(image, folder / image.name)) for image in images]


def test_init_links_a_flat_folder_into_a_dataset(tmp_path, capsys):
    originals = _flat_folder(tmp_path / "photos")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")

    assert main(["init", str(tmp_path / "photos"), "--classes", CLASSES]) == 0
    out = capsys.readouterr().out
    assert f"next: nola run {tmp_path / 'photos'}" in out
    spec, unlabeled, labeled = load_dataset(tmp_path / "photos")
    assert spec.name == "photos" and spec.classes == ("t-shirt", "trouser", "sneaker", "bag")
    assert len(unlabeled) == len(originals) and not unlabeled.skipped and labeled is None
    assert all(p.is_file() for p in originals)  # linked: the originals stay where they were
    linked = sorted((tmp_path / "photos" / "unlabeled").iterdir())
    assert [p.name for p in linked] == [p.name for p in originals] and all(p.is_symlink() for p in linked)


def test_init_moves_when_asked(tmp_path):
    originals = _flat_folder(tmp_path / "photos" / "batch1")
    assert main(["init", str(tmp_path / "photos"), "--classes", CLASSES, "--move"]) == 0
    assert not any(p.exists() for p in originals) and not (tmp_path / "photos" / "batch1").exists()
    moved = sorted((tmp_path / "photos" / "unlabeled" / "batch1").iterdir())  # nesting kept
    assert len(moved) == len(originals) and not any(p.is_symlink() for p in moved)
    assert len(load_dataset(tmp_path / "photos")[1]) == len(originals)


def test_class_subfolders_are_offered_then_become_the_evaluation_split(tmp_path, capsys):
    folder = tmp_path / "shop"
    contents = _class_folders(folder)

    assert main(["init", str(folder), "--classes", CLASSES]) == 2  # the choice is offered, nothing done
    assert "--evaluate-class-folders" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["Trouser", "bag", "sneaker", "t-shirt"]

    assert main(["init", str(folder), "--classes", CLASSES, "--evaluate-class-folders"]) == 0
    spec, unlabeled, labeled = load_dataset(folder)
    assert len(unlabeled) == len(labeled) == 4 * PER_CLASS  # every image adapted on, and labelled
    truth = labels_from_folders(folder)  # labeled/<class>/ as read off the disk
    by_class = {name: {record.image_id for record in labeled.records if spec.classes[record.label] == name}
                for name in spec.classes}
    assert by_class == {name: {i for i, c in truth.items() if c == name} for name in spec.classes}
    assert {name: {hashlib.sha256(b).hexdigest() for b in blobs} for name, blobs in contents.items()} == by_class


def test_class_subfolders_can_be_declined(tmp_path):
    _class_folders(tmp_path / "shop")
    assert main(["init", str(tmp_path / "shop"), "--classes", CLASSES, "--no-evaluate-class-folders"]) == 0
    spec, unlabeled, labeled = load_dataset(tmp_path / "shop")
    assert len(unlabeled) == 4 * PER_CLASS and labeled is None


def test_classes_file_and_what_is_refused(tmp_path, capsys):
    _flat_folder(tmp_path / "photos")
    (tmp_path / "classes.txt").write_text("# my classes\nt-shirt\ntrouser\n\nsneaker, bag\n")
    assert parse_classes((tmp_path / "classes.txt").read_text()) == ["t-shirt", "trouser", "sneaker", "bag"]
    for bad in ("cat, , dog", "cat,", "T-shirt, t_shirt, dog", "Cat, cat", "cat"):
        assert main(["init", str(tmp_path / "photos"), "--classes", bad]) == 1, bad
        assert "nola init: error:" in capsys.readouterr().err
    assert not (tmp_path / "photos" / "unlabeled").exists()  # refused before touching anything
    assert check_classes(["bag", "bags", "shoe"])  # a plural pair: a warning, not a refusal
    assert main(["init", str(tmp_path / "photos"), "--classes-file", str(tmp_path / "classes.txt")]) == 0
    assert load_dataset_spec(tmp_path / "photos").classes == ("t-shirt", "trouser", "sneaker", "bag")
    with pytest.raises(DatasetSpecError, match="already exists"):
        init_dataset(tmp_path / "photos", ["a", "b"])


def test_an_initialised_folder_feeds_the_asset_graph(tmp_path):
    from assets_helpers import materialize_partition, resources_for_test
    from nola_assets.assets import dataset_manifest

    _class_folders(tmp_path / "data" / "shop")
    assert main(["init", str(tmp_path / "data" / "shop"), "--classes", CLASSES, "--evaluate-class-folders"]) == 0
    result = materialize_partition(resources_for_test(tmp_path / "data", tmp_path / "artifacts"),
                                   [dataset_manifest], "shop")
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["images"].value == metadata["labelled_copies_of_unlabeled"].value == 4 * PER_CLASS
    assert metadata["skipped_files"].value == 0
