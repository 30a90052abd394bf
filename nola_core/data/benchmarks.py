"""Standard benchmarks as dataset sources: torchvision (or a local copy) → our dataset folder.

`export_benchmark("eurosat", "datasets/eurosat", "downloads")` writes

    datasets/eurosat/dataset.yaml        name, classes (prompt-ready names), templates, domain, source
    datasets/eurosat/unlabeled/…         the training split's images, renamed and shuffled: neither
                                         the file name nor the order tells the class
    datasets/eurosat/labeled/<class>/…   the evaluation split (held-out), and by default hard links
                                         to the unlabeled images too, so pseudo-label precision
                                         can be measured (labels only ever reach metric code)

The registry covers the 11 datasets of NoLA / LaFTer (ImageNet and its -A, -R and -Sketch
variants, CIFAR-10/100, Caltech-101, DTD, EuroSAT, Flowers102, SUN397, UCF-101) and the extra
LatteCLIP ones torchvision provides (Food101, Oxford-IIIT Pet, Stanford Cars, FGVC-Aircraft).
Each names its template set (`nola_core/text/templates.yaml`) and the domain noun put into LLM
prompts. Class names come from the dataset's own files, cleaned the way CoOp (whose splits and
names LaFTer and NoLA use) cleans them; EuroSAT's folder names are replaced by CoOp's names.

Downloads happen only with `download=True` and where the network allows (torchvision's
downloaders); otherwise the local copy under `data_root` is read, and a missing copy raises
`BenchmarkNotFoundError` saying exactly which path to create. Datasets torchvision has no split
for (EuroSAT, Caltech-101, SUN397, UCF-101, ImageNet-A/-R/-Sketch) are split per class with a
seed (`test_fraction` held out), not with CoOp's split files, which would need a download.
Cars and aircraft names keep their characters except "/" (not allowed in a folder name),
which becomes "-" ("F/A-18" → "F-A-18").
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml

from nola_core.data.images import IMAGE_SUFFIXES

logger = logging.getLogger("nola_core.data")


class BenchmarkNotFoundError(FileNotFoundError):
    """A benchmark is not under the data root and cannot (or may not) be downloaded."""


# CoOp's readable names for EuroSAT's folder names (used by LaFTer and NoLA).
EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}
# CoOp drops these Caltech-101 folders (the background class is already dropped by torchvision;
# "Faces" duplicates "Faces_easy") and renames these.
CALTECH_DROPPED = frozenset({"BACKGROUND_Google", "Faces"})
CALTECH_NAMES = {"airplanes": "airplane", "Faces_easy": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
WNID_FILES = ("imagenet_wnids.txt", "LOC_synset_mapping.txt")


@dataclass(frozen=True)
class BenchmarkSource:
    """One benchmark: where its local copy lives, how to open a split, its templates and names.

    `splits` is (unlabeled split, labeled split) where the dataset has official splits, None
    where it is one collection split here by seed. `local_path` (relative to the data root)
    must exist for the copy to count as present; `layout` describes it for the error message.
    """

    name: str
    title: str
    templates: str
    domain: str
    papers: tuple[str, ...]
    local_path: str
    layout: str
    open: Callable[[Path, str | None, bool], Any]  # (data_root, split, download) -> dataset
    class_names: Callable[[Any, Path], list[str | None]]  # names per raw label; None drops a class
    splits: tuple[str, str] | None = None
    downloadable: bool = True
    torchvision: str | None = None  # torchvision.datasets class, for the error message
    notes: str = ""


def _tv(name: str):
    import torchvision.datasets

    return getattr(torchvision.datasets, name)


def _cifar(cls_name: str):
    return lambda root, split, download: _tv(cls_name)(str(root), train=split == "train", download=download)


def _split_kw(cls_name: str, **extra):
    return lambda root, split, download: _tv(cls_name)(str(root), split=split, download=download, **extra)


def _no_split(cls_name: str, **extra):
    return lambda root, split, download: _tv(cls_name)(str(root), download=download, **extra)


def _folder(relative: str, with_split: bool = False):
    def open_folder(root: Path, split: str | None, download: bool):
        from torchvision.datasets import ImageFolder

        path = root / relative / split if with_split else root / relative
        if not path.is_dir():
            raise BenchmarkNotFoundError(f"{path}: folder missing")
        return ImageFolder(str(path))

    return open_folder


def _underscores(dataset, root) -> list[str]:
    return [c.replace("_", " ").strip() for c in dataset.classes]


def _as_is(dataset, root) -> list[str]:
    return list(dataset.classes)


def _eurosat(dataset, root) -> list[str]:
    return [EUROSAT_NAMES.get(c, _split_camel(c)) for c in dataset.classes]


def _caltech(dataset, root) -> list[str | None]:
    return [None if c in CALTECH_DROPPED else CALTECH_NAMES.get(c, c.replace("_", " ")) for c in dataset.categories]


def _sun397(dataset, root) -> list[str]:
    # torchvision strips "/a/": "apartment_building/outdoor" → CoOp's "outdoor apartment building".
    return [" ".join(reversed(c.split("/"))).replace("_", " ").strip() for c in dataset.classes]


def _ucf101(dataset, root) -> list[str]:
    return [_split_camel(c) for c in dataset.classes]


def _split_camel(name: str) -> str:
    """"ApplyEyeMakeup" / "Apply_Eye_Makeup" → "Apply Eye Makeup"."""
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name.replace("_", " "))
    return " ".join(words) if words else name


def _imagenet(dataset, root) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = list(dataset.classes)
    if len(wnids) == len(IMAGENET_CLASSNAMES):
        return list(IMAGENET_CLASSNAMES)  # sorted wnids are ImageNet-1k's class order
    order = _imagenet_wnid_order(root)
    missing = [w for w in wnids if w not in order]
    if missing:
        raise BenchmarkNotFoundError(f"wnids {missing[:5]} are not in the ImageNet-1k wnid list")
    return [IMAGENET_CLASSNAMES[order[w]] for w in wnids]


def _imagenet_wnid_order(root: Path) -> dict[str, int]:
    """wnid → ImageNet-1k index, from a wnid list in the data root or ImageNet's train folders."""
    for name in WNID_FILES:
        path = root / name
        if path.is_file():
            wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
            return {w: i for i, w in enumerate(wnids)}
    train = root / "imagenet" / "train"
    if train.is_dir():
        wnids = sorted(p.name for p in train.iterdir() if p.is_dir())
        if len(wnids) == 1000:
            return {w: i for i, w in enumerate(wnids)}
    raise BenchmarkNotFoundError(
        f"ImageNet-A and -R have 200 of ImageNet's classes and need ImageNet-1k's wnid order to be named: put "
        f"{root / WNID_FILES[0]} (1000 lines, one wnid each, in ImageNet-1k order; Kaggle's "
        f"{WNID_FILES[1]} works too) or ImageNet's {train}/<wnid>/ folders there"
    )


_IMAGENET_LAYOUT = "one folder per wnid (n01440764/, ...) of images"
SOURCES: dict[str, BenchmarkSource] = {
    source.name: source
    for source in (
        BenchmarkSource("imagenet", "ImageNet-1k", "imagenet", "photo", ("nola", "lafter"),
                        "imagenet", f"imagenet/train/ and imagenet/val/, each {_IMAGENET_LAYOUT}",
                        _folder("imagenet", with_split=True), _imagenet, splits=("train", "val"),
                        downloadable=False, notes="local copy only (licence); val/ must be sorted into wnid folders"),
        BenchmarkSource("imagenet_sketch", "ImageNet-Sketch", "imagenet_sketch", "sketch", ("nola", "lafter"),
                        "imagenet-sketch", f"imagenet-sketch/ with {_IMAGENET_LAYOUT} (1000 classes)",
                        _folder("imagenet-sketch"), _imagenet, downloadable=False),
        BenchmarkSource("imagenet_a", "ImageNet-A", "imagenet_a", "photo", ("nola", "lafter"),
                        "imagenet-a", f"imagenet-a/ with {_IMAGENET_LAYOUT} (200 classes), plus a wnid list",
                        _folder("imagenet-a"), _imagenet, downloadable=False),
        BenchmarkSource("imagenet_r", "ImageNet-R", "imagenet_r", "rendition", ("nola", "lafter"),
                        "imagenet-r", f"imagenet-r/ with {_IMAGENET_LAYOUT} (200 classes), plus a wnid list",
                        _folder("imagenet-r"), _imagenet, downloadable=False),
        BenchmarkSource("cifar10", "CIFAR-10", "cifar10", "photo", ("nola", "lafter"),
                        "cifar-10-batches-py", "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)",
                        _cifar("CIFAR10"), _underscores, splits=("train", "test"), torchvision="CIFAR10"),
        BenchmarkSource("cifar100", "CIFAR-100", "cifar100", "photo", ("nola", "lafter"),
                        "cifar-100-python", "cifar-100-python/ (train, test, meta)",
                        _cifar("CIFAR100"), _underscores, splits=("train", "test"), torchvision="CIFAR100"),
        BenchmarkSource("caltech101", "Caltech-101", "caltech101", "object", ("nola", "lafter", "latteclip"),
                        "caltech101/101_ObjectCategories", "caltech101/101_ObjectCategories/<category>/*.jpg "
                        "and caltech101/Annotations/", _no_split("Caltech101", target_type="category"), _caltech,
                        torchvision="Caltech101"),
        BenchmarkSource("dtd", "Describable Textures (DTD)", "dtd", "texture", ("nola", "lafter", "latteclip"),
                        "dtd/dtd", "dtd/dtd/images/<texture>/*.jpg and dtd/dtd/labels/",
                        _split_kw("DTD", partition=1), _as_is, splits=("train", "test"), torchvision="DTD"),
        BenchmarkSource("eurosat", "EuroSAT", "eurosat", "satellite photo", ("nola", "lafter", "latteclip"),
                        "eurosat/2750", "eurosat/2750/<class folder>/*.jpg", _no_split("EuroSAT"), _eurosat,
                        torchvision="EuroSAT"),
        BenchmarkSource("flowers102", "Oxford Flowers-102", "flowers102", "flower", ("nola", "lafter", "latteclip"),
                        "flowers-102/jpg", "flowers-102/jpg/*.jpg, imagelabels.mat and setid.mat",
                        _split_kw("Flowers102"), _as_is, splits=("train", "test"), torchvision="Flowers102"),
        BenchmarkSource("sun397", "SUN397", "sun397", "scene", ("nola", "lafter", "latteclip"),
                        "SUN397", "SUN397/ClassName.txt and SUN397/<letter>/<class>/sun_*.jpg",
                        _no_split("SUN397"), _sun397, torchvision="SUN397"),
        BenchmarkSource("ucf101", "UCF-101 (middle frames)", "ucf101", "action", ("nola", "lafter", "latteclip"),
                        "UCF-101-midframes", "UCF-101-midframes/<Action_Name>/*.jpg (CoOp's middle frames)",
                        _folder("UCF-101-midframes"), _ucf101, downloadable=False,
                        notes="torchvision's UCF101 is videos; the image benchmarks use one middle frame per clip"),
        BenchmarkSource("food101", "Food-101", "food101", "food", ("latteclip",),
                        "food-101/images", "food-101/images/<dish>/*.jpg and food-101/meta/",
                        _split_kw("Food101"), _underscores, splits=("train", "test"), torchvision="Food101"),
        BenchmarkSource("oxford_pets", "Oxford-IIIT Pet", "oxford_pets", "pet", ("latteclip",),
                        "oxford-iiit-pet/images", "oxford-iiit-pet/images/*.jpg and oxford-iiit-pet/annotations/",
                        _split_kw("OxfordIIITPet", target_types="category"), _as_is, splits=("trainval", "test"),
                        torchvision="OxfordIIITPet"),
        BenchmarkSource("stanford_cars", "Stanford Cars", "stanford_cars", "car", ("latteclip",),
                        "stanford_cars/devkit", "stanford_cars/{devkit,cars_train,cars_test} and "
                        "stanford_cars/cars_test_annos_withlabels.mat", _split_kw("StanfordCars"), _as_is,
                        splits=("train", "test"), downloadable=False, torchvision="StanfordCars",
                        notes="the original download is gone; torchvision cannot fetch it"),
        BenchmarkSource("fgvc_aircraft", "FGVC-Aircraft (variants)", "fgvc_aircraft", "aircraft", ("latteclip",),
                        "fgvc-aircraft-2013b", "fgvc-aircraft-2013b/data/{images,variants.txt,...}",
                        _split_kw("FGVCAircraft", annotation_level="variant"), _as_is, splits=("trainval", "test"),
                        torchvision="FGVCAircraft"),
    )
}


def benchmark_names() -> list[str]:
    return sorted(SOURCES)


def get_benchmark(name: str) -> BenchmarkSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {benchmark_names()}") from None


@dataclass(frozen=True)
class _Sample:
    path: Path | None  # the image file, when the dataset has one
    label: int  # the dataset's raw label
    index: int  # position in the torchvision dataset


def open_benchmark_split(source: BenchmarkSource, data_root: Path, split: str | None, download: bool):
    """The torchvision (or ImageFolder) dataset of one split, or a clear error about where to put it."""
    present = (data_root / source.local_path).exists()
    if not present and not download:
        raise BenchmarkNotFoundError(_missing_message(source, data_root, "not found"))
    if download and not source.downloadable and not present:
        raise BenchmarkNotFoundError(_missing_message(source, data_root, "cannot be downloaded automatically"))
    try:
        return source.open(data_root, split, download and source.downloadable)
    except BenchmarkNotFoundError:
        raise
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError, ...
        reason = f"download failed ({type(error).__name__}: {error})" if download else (
            f"local copy unreadable ({type(error).__name__}: {error})")
        raise BenchmarkNotFoundError(_missing_message(source, data_root, reason)) from error


def _missing_message(source: BenchmarkSource, data_root: Path, reason: str) -> str:
    where = data_root / source.local_path
    message = f"{source.title} {reason}: expected {where} ({source.layout})."
    if source.downloadable:
        message += (f" Where the network allows, pass download=True (torchvision.datasets.{source.torchvision} "
                    f"fetches it into {data_root}); otherwise copy a downloaded copy there.")
    else:
        message += " It cannot be downloaded here: get a copy and put it there."
    if source.notes:
        message += f" Note: {source.notes}."
    return message


def _samples(dataset) -> list[_Sample]:
    """(file, raw label) of every item, without decoding images where the dataset lists files."""
    for paths_attr in ("_image_files", "_images"):
        if hasattr(dataset, paths_attr) and hasattr(dataset, "_labels"):
            paths, labels = getattr(dataset, paths_attr), dataset._labels
            return [_Sample(Path(p), int(y), i) for i, (p, y) in enumerate(zip(paths, labels))]
    for samples_attr in ("samples", "_samples"):
        if hasattr(dataset, samples_attr):
            return [_Sample(Path(p), int(y), i) for i, (p, y) in enumerate(getattr(dataset, samples_attr))]
    if hasattr(dataset, "categories") and hasattr(dataset, "index") and hasattr(dataset, "y"):  # Caltech101
        folder = Path(dataset.root) / "101_ObjectCategories"
        return [_Sample(folder / dataset.categories[y] / f"image_{n:04d}.jpg", int(y), i)
                for i, (n, y) in enumerate(zip(dataset.index, dataset.y))]
    if hasattr(dataset, "targets"):  # CIFAR: images in memory
        return [_Sample(None, int(y), i) for i, y in enumerate(dataset.targets)]
    return [_Sample(None, int(dataset[i][1]), i) for i in range(len(dataset))]


def export_benchmark(
    name: str,
    out_dir: str | Path,
    data_root: str | Path,
    *,
    download: bool = False,
    unlabeled_split: str | None = None,
    labeled_split: str | None = None,
    label_unlabeled: bool = True,
    max_per_class: int | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Materialise a benchmark as a dataset folder; returns `out_dir`.

    `unlabeled_split` / `labeled_split` default to the benchmark's official (train, test)
    pair; for one-collection benchmarks `test_fraction` of each class is held out, chosen with
    `seed`. `max_per_class` keeps a seeded subset of each class per split (quick runs).
    `label_unlabeled` also files the unlabeled images under labeled/<class>/ (as hard links
    where the file system allows), so pseudo-label precision can be reported.
    """
    source = get_benchmark(name)
    data_root, out_dir = Path(data_root), Path(out_dir)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace it")
        shutil.rmtree(out_dir)
    generator = torch.Generator().manual_seed(seed)

    if source.splits is not None or (unlabeled_split and labeled_split):
        default = source.splits or (None, None)
        train_name, test_name = unlabeled_split or default[0], labeled_split or default[1]
        train_set = open_benchmark_split(source, data_root, train_name, download)
        test_set = open_benchmark_split(source, data_root, test_name, download)
        train = [(train_set, s) for s in _samples(train_set)]
        test = [(test_set, s) for s in _samples(test_set)]
        names_from = train_set
    else:
        train_name, test_name = "train", "test"
        dataset = open_benchmark_split(source, data_root, None, download)
        train, test = _stratified_split([(dataset, s) for s in _samples(dataset)], test_fraction, generator)
        names_from = dataset

    raw_names = source.class_names(names_from, data_root)
    kept = [i for i, n in enumerate(raw_names) if n is not None]
    classes = [_folder_safe(raw_names[i]) for i in kept]
    _check_unique(classes, source)
    new_label = {raw: new for new, raw in enumerate(kept)}
    train = [item for item in train if item[1].label in new_label]
    test = [item for item in test if item[1].label in new_label]
    if max_per_class is not None:
        train = _per_class_subset(train, max_per_class, generator)
        test = _per_class_subset(test, max_per_class, generator)
    if not train:
        raise ValueError(f"{source.title}: no training image to export")

    unlabeled_dir, labeled_dir = out_dir / "unlabeled", out_dir / "labeled"
    unlabeled_dir.mkdir(parents=True)
    for class_name in classes:
        (labeled_dir / class_name).mkdir(parents=True, exist_ok=True)
    order = torch.randperm(len(train), generator=generator).tolist()
    for position, item_index in enumerate(order):
        dataset, sample = train[item_index]
        written = _write_image(dataset, sample, unlabeled_dir / f"{train_name}_{position:06d}")
        if label_unlabeled:
            _link(written, labeled_dir / classes[new_label[sample.label]] / written.name)
    test_order = torch.randperm(len(test), generator=generator).tolist()
    for position, item_index in enumerate(test_order):
        dataset, sample = test[item_index]
        _write_image(dataset, sample, labeled_dir / classes[new_label[sample.label]] / f"{test_name}_{position:06d}")

    spec = {
        "name": source.name,
        "classes": classes,
        "templates": source.templates,
        "domain": source.domain,
        "source": {
            "benchmark": source.name,
            "title": source.title,
            "unlabeled_split": train_name,
            "labeled_split": test_name,
            "split_by_seed": source.splits is None and not (unlabeled_split and labeled_split),
            "test_fraction": test_fraction if source.splits is None else None,
            "seed": seed,
            "max_per_class": max_per_class,
            "unlabeled_images": len(train),
            "held_out_images": len(test),
            "unlabeled_also_labeled": label_unlabeled,
        },
    }
    (out_dir / "dataset.yaml").write_text(
        f"# Exported from {source.title} by nola_core.data.export_benchmark.\n"
        + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True),
        encoding="utf-8",
    )
    logger.info("%s: exported %d unlabeled and %d held-out images of %d classes to %s",
                source.name, len(train), len(test), len(classes), out_dir)
    return out_dir


def _stratified_split(items: list, test_fraction: float, generator: torch.Generator) -> tuple[list, list]:
    by_label: dict[int, list] = {}
    for item in items:
        by_label.setdefault(item[1].label, []).append(item)
    train, test = [], []
    for label in sorted(by_label):
        group = by_label[label]
        order = torch.randperm(len(group), generator=generator).tolist()
        held = round(test_fraction * len(group)) if len(group) > 1 else 0
        test += [group[i] for i in order[:held]]
        train += [group[i] for i in order[held:]]
    return train, test


def _per_class_subset(items: list, limit: int, generator: torch.Generator) -> list:
    if limit < 1:
        raise ValueError(f"max_per_class must be at least 1, got {limit}")
    by_label: dict[int, list] = {}
    for item in items:
        by_label.setdefault(item[1].label, []).append(item)
    kept = []
    for label in sorted(by_label):
        group = by_label[label]
        order = torch.randperm(len(group), generator=generator).tolist()[:limit]
        kept += [group[i] for i in sorted(order)]
    return kept


def _write_image(dataset, sample: _Sample, stem: Path) -> Path:
    """Copy the original file when there is one (bytes unchanged), else encode the image as PNG."""
    if sample.path is not None and sample.path.suffix.lower() in IMAGE_SUFFIXES:
        target = stem.with_suffix(sample.path.suffix.lower())
        shutil.copyfile(sample.path, target)
        return target
    image = dataset[sample.index][0]
    target = stem.with_suffix(".png")
    image.convert("RGB").save(target, format="PNG")
    return target


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _folder_safe(name: str) -> str:
    return re.sub(r"\s+", " ", name.replace("/", "-").replace("\\", "-")).strip()


def _check_unique(classes: Sequence[str], source: BenchmarkSource) -> None:
    seen: dict[str, str] = {}
    for name in classes:
        key = name.casefold()
        if not name or key in seen:
            raise ValueError(f"{source.title}: class names {seen.get(key)!r} and {name!r} collide after cleaning")
        seen[key] = name
