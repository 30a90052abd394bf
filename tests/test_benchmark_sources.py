"""Standard benchmarks as dataset sources: the registry, clear errors, and end-to-end exports
from tiny fakes written in each dataset's own on-disk format (no network anywhere)."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import yaml
from PIL import Image

from nola_core.data import (
    BENCHMARKS,
    BenchmarkNotFoundError,
    benchmark_names,
    build_manifest,
    export_benchmark,
    get_benchmark,
    known_labels,
    load_dataset_spec,
)
from nola_core.text import get_templates

NOLA_DATASETS = {"imagenet", "imagenet_a", "imagenet_r", "imagenet_sketch", "cifar10", "cifar100", "caltech101",
                 "dtd", "eurosat", "flowers102", "sun397", "ucf101"}
LATTECLIP_TORCHVISION = {"eurosat", "dtd", "flowers102", "food101", "oxford_pets", "stanford_cars", "fgvc_aircraft",
                         "caltech101", "sun397"}


def test_registry_covers_every_listed_benchmark_with_existing_templates():
    assert NOLA_DATASETS | LATTECLIP_TORCHVISION <= set(benchmark_names())
    for name in benchmark_names():
        source = get_benchmark(name)
        templates = get_templates(source.templates)
        assert templates and all(t.count("{}") == 1 for t in templates), name
        assert source.domain and source.local_path and source.layout, name
    assert {n for n in BENCHMARKS if "nola" in BENCHMARKS[n].papers} == NOLA_DATASETS
    assert {n for n in BENCHMARKS if "latteclip" in BENCHMARKS[n].papers} == LATTECLIP_TORCHVISION | {"ucf101"}
    with pytest.raises(ValueError, match="unknown benchmark 'mnist'.*eurosat"):
        get_benchmark("mnist")


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_missing_local_copy_says_where_to_put_it_and_touches_nothing(name, tmp_path):
    source = get_benchmark(name)
    data_root = tmp_path / "downloads"
    data_root.mkdir()
    with pytest.raises(BenchmarkNotFoundError) as error:
        export_benchmark(name, tmp_path / "out", data_root, download=False)
    message = str(error.value)
    assert str(data_root / source.local_path) in message and source.title in message
    assert ("download=True" in message) == source.downloadable
    assert not any(data_root.iterdir()) and not (tmp_path / "out" / "dataset.yaml").exists()
    if not source.downloadable:  # asking for a download does not help, and says so
        with pytest.raises(BenchmarkNotFoundError, match="cannot be downloaded"):
            export_benchmark(name, tmp_path / "out", data_root, download=True)


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _fake_cifar10(root, per_class_train=3, per_class_test=2):
    """CIFAR-10's pickled batches; every image of class c is filled with red 20c and green 255 - 20c."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    serial = iter(range(7, 256))  # a distinct blue per image: identical images would be deduplicated

    def batch(labels):
        data = np.zeros((len(labels), 3 * 32 * 32), dtype=np.uint8)
        for row, label in enumerate(labels):
            data[row, :1024], data[row, 1024:2048], data[row, 2048:] = 20 * label, 255 - 20 * label, next(serial)
        return {"data": data, "labels": list(labels)}

    train = [c for c in range(10) for _ in range(per_class_train)]
    for n in range(1, 6):
        part = train[n - 1 :: 5]
        (folder / f"data_batch_{n}").write_bytes(pickle.dumps(batch(part)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch([c for c in range(10) for _ in range(per_class_test)])))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR_CLASSES}))


def _colour_class(path) -> int:
    with Image.open(path) as image:
        return round(image.convert("RGB").getpixel((0, 0))[0] / 20)


def test_cifar10_exports_end_to_end(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # our fake has other md5s
    _fake_cifar10(tmp_path / "downloads")
    out = export_benchmark("cifar10", tmp_path / "cifar10", tmp_path / "downloads")

    spec = load_dataset_spec(out)
    assert spec.name == "cifar10" and list(spec.classes) == CIFAR_CLASSES and spec.templates == "cifar10"
    unlabeled, labeled = build_manifest(spec, "unlabeled"), build_manifest(spec, "labeled")
    assert len(unlabeled) == 30 and len(labeled) == 30 + 20
    # File names and order carry no class: train_000000.png ... in a seeded shuffle.
    names = [r.path for r in unlabeled.records]
    assert names == [f"unlabeled/train_{i:06d}.png" for i in range(30)]
    assert [_colour_class(out / p) for p in names] != sorted(_colour_class(out / p) for p in names)
    # Every labelled image sits under its true class; unlabeled images are known through their copies.
    for record in labeled.records:
        assert _colour_class(out / record.path) == record.label
    labels = known_labels(unlabeled, labeled)
    assert len(labels) == 30 and all(labels[r.image_id] == _colour_class(out / r.path) for r in unlabeled.records)
    source = yaml.safe_load((out / "dataset.yaml").read_text())["source"]
    assert source["unlabeled_split"] == "train" and source["held_out_images"] == 20

    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_benchmark("cifar10", out, tmp_path / "downloads")
    again = export_benchmark("cifar10", out, tmp_path / "downloads", overwrite=True, label_unlabeled=False,
                             max_per_class=1)
    assert len(build_manifest(load_dataset_spec(again), "unlabeled")) == 10
    assert len(build_manifest(load_dataset_spec(again), "labeled")) == 10  # held-out only, one per class


def _jpeg(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format="JPEG", quality=95)


def test_eurosat_split_by_seed_copies_files_unchanged_with_readable_names(tmp_path):
    folder = tmp_path / "downloads" / "eurosat" / "2750"
    originals = {}
    for c, name in enumerate(["AnnualCrop", "HerbaceousVegetation", "SeaLake"]):
        for i in range(10):
            path = folder / name / f"{name}_{i + 1}.jpg"
            _jpeg(path, (80 * c, 10 * i, 50))
            originals[hashlib.sha256(path.read_bytes()).hexdigest()] = c
    out = export_benchmark("eurosat", tmp_path / "eurosat", tmp_path / "downloads", test_fraction=0.3, seed=1)
    spec = load_dataset_spec(out)
    assert list(spec.classes) == ["Annual Crop Land", "Herbaceous Vegetation Land", "Sea or Lake"]
    assert spec.templates == "eurosat" and spec.domain == "satellite photo"
    unlabeled, labeled = build_manifest(spec, "unlabeled"), build_manifest(spec, "labeled")
    assert len(unlabeled) == 21 and len(labeled) == 30  # 7 + 3 per class; train copies labelled too
    assert all(originals[r.image_id] == r.label for r in labeled.records)  # bytes unchanged, right class
    assert {r.image_id for r in unlabeled.records} <= set(originals)
    held_out = {r.image_id for r in labeled.records} - set(unlabeled.ids)
    assert len(held_out) == 9
    assert not any("Crop" in r.path or "Sea" in r.path for r in unlabeled.records)
    second = export_benchmark("eurosat", tmp_path / "again", tmp_path / "downloads", test_fraction=0.3, seed=1)
    assert set(build_manifest(load_dataset_spec(second), "unlabeled").ids) == set(unlabeled.ids)  # seeded


def test_caltech101_drops_and_renames_classes_like_coop(tmp_path):
    folder = tmp_path / "downloads" / "caltech101" / "101_ObjectCategories"
    for c, name in enumerate(["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "airplanes", "water_lilly"]):
        for i in range(3):
            _jpeg(folder / name / f"image_{i + 1:04d}.jpg", (40 * c, 30 * i, 9))
    (tmp_path / "downloads" / "caltech101" / "Annotations").mkdir()
    out = export_benchmark("caltech101", tmp_path / "caltech", tmp_path / "downloads", test_fraction=0.34)
    spec = load_dataset_spec(out)
    assert list(spec.classes) == ["face", "leopard", "airplane", "water lilly"]
    assert len(build_manifest(spec, "unlabeled")) == 4 * 2


def test_imagenet_variant_names_classes_from_the_wnid_order(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    root = tmp_path / "downloads"
    wnids = [f"n{index:08d}" for index in range(1000)]
    for index in (1, 7):
        for i in range(2):
            _jpeg(root / "imagenet-r" / wnids[index] / f"{i}.jpg", (index, i, 3))
    with pytest.raises(BenchmarkNotFoundError, match="imagenet_wnids.txt"):
        export_benchmark("imagenet_r", tmp_path / "r", root)
    (root / "imagenet_wnids.txt").write_text("\n".join(wnids))
    out = export_benchmark("imagenet_r", tmp_path / "r2", root, test_fraction=0.5)
    assert list(load_dataset_spec(out).classes) == [IMAGENET_CLASSNAMES[1], IMAGENET_CLASSNAMES[7]]
