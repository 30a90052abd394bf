"""nola_core.data: specs, image loading, manifests, datasets, transforms, demo dataset."""

from __future__ import annotations

import os
import shutil
import threading
import unicodedata
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

import nola_core.data.manifest as manifest_module
from image_fixtures import (
    BASE_SIZE,
    GRADIENT_WIDTH,
    base_image,
    bomb_png_bytes,
    write_bad_images,
    write_good_images,
)
from nola_core.data import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetSpec,
    DatasetSpecError,
    ImageLoadError,
    ImageRecord,
    Manifest,
    ManifestImageDataset,
    MultiView,
    Preprocess,
    build_manifest,
    check_image,
    collate_skipping_failures,
    eval_transform,
    known_labels,
    load_dataset_spec,
    load_rgb,
    strong_transform,
    weak_transform,
)
from nola_core.demo import demo_dataset_path

CLASSES = ("cat", "dog", "bird")


def write_dataset(root: Path, classes=CLASSES, extra_yaml: str = "") -> DatasetSpec:
    root.mkdir(parents=True, exist_ok=True)
    (root / "unlabeled").mkdir(exist_ok=True)
    lines = ["name: pets", "classes:"] + [f"  - {c}" for c in classes]
    (root / "dataset.yaml").write_text("\n".join(lines) + "\n" + extra_yaml, encoding="utf-8")
    return load_dataset_spec(root)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


@pytest.fixture()
def zoo(tmp_path):
    """A dataset whose unlabeled/ holds every good and bad fixture file, some nested."""
    spec = write_dataset(tmp_path / "ds")
    good = write_good_images(spec.unlabeled_dir / "good")
    bad = write_bad_images(spec.unlabeled_dir / "bad" / "deeper")
    (spec.unlabeled_dir / "readme.txt").write_text("not an image, ignored silently")
    (spec.unlabeled_dir / ".DS_Store").write_bytes(b"\0\1")
    return spec, good, bad


# ----------------------------------------------------------------------------- spec


def test_spec_loads_with_optional_fields_and_ignores_unknown_keys(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "unlabeled").mkdir()
    (root / "texts").mkdir()
    (root / "texts" / "desc.json").write_text("{}")
    (root / "dataset.yaml").write_text(
        "name: ' satellites '\nclasses: [Forêt, 'river', 高速道路]\ntemplates: satellite\n"
        "domain: satellite photo\ndescriptions: texts/desc.json\nnotes: whatever\n",
        encoding="utf-8",
    )
    spec = load_dataset_spec(root)
    assert spec.name == "satellites"
    assert spec.classes == ("Forêt", "river", "高速道路")
    assert spec.templates == "satellite"
    assert spec.domain == "satellite photo"
    assert spec.descriptions == (root / "texts" / "desc.json").resolve()
    assert spec.unlabeled_dir == root.resolve() / "unlabeled"
    assert spec.labeled_dir == root.resolve() / "labeled"


def test_spec_defaults(tmp_path):
    spec = write_dataset(tmp_path / "ds")
    assert (spec.templates, spec.domain, spec.descriptions) == ("generic", None, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: [unclosed\n", "malformed YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("classes: [a, b]\n", "field 'name' is missing"),
        ("name: '   '\nclasses: [a, b]\n", "field 'name' is blank"),
        ("name: 42\nclasses: [a, b]\n", "field 'name' must be a string"),
        ("name: x\n", "field 'classes' is missing"),
        ("name: x\nclasses: cat, dog\n", "field 'classes' must be a list"),
        ("name: x\nclasses: []\n", "field 'classes' is empty"),
        ("name: x\nclasses: [cat]\n", "field 'classes' has 1 class"),
        ("name: x\nclasses: [cat, '  ']\n", "field 'classes' item 2 is blank"),
        ("name: x\nclasses: [cat, yes]\n", "field 'classes' item 2 is bool"),
        ("name: x\nclasses: [cat, dog, cat]\n", "duplicate class name 'cat'"),
        ("name: x\nclasses: [Cat, dog, cat]\n", "duplicate class name 'cat'"),
        ("name: x\nclasses: [a, b]\ndescriptions: ../outside.json\n", "field 'descriptions'"),
        ("name: x\nclasses: [a, b]\ndescriptions: nowhere.json\n", "field 'descriptions'"),
    ],
)
def test_bad_spec_names_file_and_field(tmp_path, text, expected):
    root = tmp_path / "ds"
    (root / "unlabeled").mkdir(parents=True)
    (tmp_path / "outside.json").write_text("{}")
    (root / "dataset.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(DatasetSpecError) as error:
        load_dataset_spec(root)
    message = str(error.value)
    assert message.startswith(f"{root.resolve() / 'dataset.yaml'}: ")
    assert expected in message


def test_missing_spec_file_and_missing_unlabeled_folder(tmp_path):
    with pytest.raises(DatasetSpecError, match="dataset.yaml: file not found"):
        load_dataset_spec(tmp_path)
    (tmp_path / "dataset.yaml").write_text("name: x\nclasses: [a, b]\n")
    with pytest.raises(DatasetSpecError) as error:
        load_dataset_spec(tmp_path)
    assert str(tmp_path / "dataset.yaml") in str(error.value)
    assert "unlabeled" in str(error.value)


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "name",
    [
        "photo.jpg", "grey.png", "gradient16.png", "gradient32.tif", "cmyk.jpg",
        "palette_transparent.png", "rgba.png", "grey_alpha.png", "animated.gif",
        "rotated_exif.jpg", "photo.webp", "photo.bmp", "photo.tiff", "one_pixel.png",
        "name with spaces.PNG", "näme_ünïcode_画像.png", "copy of photo.jpg",
    ],
)
def test_every_good_format_loads_as_rgb(tmp_path, name):
    good = write_good_images(tmp_path)[name]
    image = load_rgb(good.path)
    assert image.mode == "RGB"
    assert image.size == good.size
    assert np.asarray(image).dtype == np.uint8
    check_image(good.path)


def test_exif_rotation_is_applied(tmp_path):
    good = write_good_images(tmp_path)
    image = load_rgb(good["rotated_exif.jpg"].path)
    assert image.size == (BASE_SIZE[1], BASE_SIZE[0])
    expected = base_image().transpose(Image.Transpose.ROTATE_270)  # orientation 6 = 90° CW
    assert mean_abs_diff(image, expected) < 8
    assert mean_abs_diff(image, base_image().transpose(Image.Transpose.ROTATE_90)) > 20


@pytest.mark.parametrize("name", ["gradient16.png", "gradient32.tif"])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path, name):
    row = np.asarray(load_rgb(write_good_images(tmp_path)[name].path))[0]
    assert (row[:, 0] == row[:, 1]).all() and (row[:, 1] == row[:, 2]).all()
    grey = row[:, 0].astype(int)
    expected = np.round(np.linspace(0, 255, GRADIENT_WIDTH)).astype(int)
    assert np.abs(grey - expected).max() <= 1
    assert grey[0] == 0 and grey[-1] == 255 and grey[GRADIENT_WIDTH // 2] in (127, 128, 129)


def test_transparency_is_composited_on_white(tmp_path):
    good = write_good_images(tmp_path)
    for name in ("rgba.png", "grey_alpha.png"):
        pixels = np.asarray(load_rgb(good[name].path))
        assert (pixels[:, : BASE_SIZE[0] // 2] == 255).all(), name
        assert (pixels[:, BASE_SIZE[0] // 2 :] < 255).any(), name
    palette = Image.open(good["palette_transparent.png"].path)
    transparent = np.asarray(palette) == palette.info["transparency"]
    pixels = np.asarray(load_rgb(good["palette_transparent.png"].path))
    assert transparent.any() and (pixels[transparent] == 255).all()


def test_animated_gif_gives_first_frame_and_cmyk_keeps_colours(tmp_path):
    good = write_good_images(tmp_path)
    first = load_rgb(good["animated.gif"].path)
    assert mean_abs_diff(first, base_image()) < mean_abs_diff(first, ImageOps.invert(base_image()))
    assert mean_abs_diff(load_rgb(good["cmyk.jpg"].path), base_image()) < 10


@pytest.mark.parametrize("name", ["truncated.jpg", "empty.png", "notes.jpg", "bomb.png"])
def test_bad_files_raise_image_load_error_naming_the_path(tmp_path, name):
    path = write_bad_images(tmp_path)[name]
    for read in (load_rgb, check_image):
        with pytest.raises(ImageLoadError) as error:
            read(path)
        assert str(error.value).startswith(f"{path}: ")


def test_bomb_is_refused_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    def never(self):
        raise AssertionError("pixels were decoded")

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png_bytes(9000, 8000))
    small = tmp_path / "small.png"
    base_image().save(small)
    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_rgb(bomb)
    with pytest.raises(ImageLoadError, match="max_pixels=100"):
        load_rgb(small, max_pixels=100)


# ----------------------------------------------------------------------------- manifest


def test_manifest_lists_good_images_once_and_bad_ones_with_reasons(zoo):
    spec, good, bad = zoo
    manifest = build_manifest(spec)
    paths = [r.path for r in manifest.records]
    assert paths == sorted(paths)
    assert all(r.label is None and len(r.image_id) == 64 for r in manifest.records)
    expected = {f"unlabeled/good/{n}" for n in good if n != "photo.jpg"}
    assert set(paths) == expected  # "copy of photo.jpg" sorts first, so photo.jpg is the copy
    assert len(manifest) == len(good) - 1 == len(set(manifest.ids))

    reasons = {s.path: s.reason for s in manifest.skipped}
    duplicate = reasons.pop("unlabeled/good/photo.jpg")
    assert duplicate == "duplicate of unlabeled/good/copy of photo.jpg"
    assert set(reasons) == {f"unlabeled/bad/deeper/{n}" for n in bad}
    assert "truncated" in reasons["unlabeled/bad/deeper/truncated.jpg"]
    assert "decompression bomb" in reasons["unlabeled/bad/deeper/bomb.png"]
    assert reasons["unlabeled/bad/deeper/notes.jpg"] == "not an image file PIL recognises"
    assert reasons["unlabeled/bad/deeper/empty.png"] == "empty file"


def test_manifest_is_deterministic_and_round_trips_through_parquet(zoo, tmp_path):
    spec, _, _ = zoo
    manifest = build_manifest(spec)
    assert build_manifest(spec) == manifest
    manifest.to_polars().write_parquet(tmp_path / "m.parquet")
    again = Manifest.from_polars(pl.read_parquet(tmp_path / "m.parquet"))
    assert again == manifest
    assert again.fingerprint == manifest.fingerprint
    frame = manifest.records_frame()
    assert frame.columns == ["image_id", "path", "label"]
    assert frame["path"].to_list() == [r.path for r in manifest.records]


def test_the_manifest_does_not_depend_on_the_number_of_scan_threads(zoo, monkeypatch):
    spec, good, _ = zoo
    for index, name in enumerate(["photo.bmp", "grey.png", "photo.tiff"]):  # a labeled split too
        (spec.labeled_dir / CLASSES[index]).mkdir(parents=True)
        shutil.copyfile(good[name].path, spec.labeled_dir / CLASSES[index] / f"{name}.png")
    serial = build_manifest(spec, workers=1), build_manifest(spec, "labeled", workers=1)
    threads, real_inspect = set(), manifest_module._inspect_file

    def inspect(path, max_pixels):
        threads.add(threading.get_ident())
        return real_inspect(path, max_pixels)

    monkeypatch.setattr(manifest_module, "_inspect_file", inspect)
    seen = []
    threaded = (build_manifest(spec, workers=8, progress=lambda done, total: seen.append(done)),
                build_manifest(spec, "labeled", workers=8))
    assert threaded == serial  # records, skipped files with reasons, file stats, all in the same order
    assert len(threads) > 1 and threading.get_ident() not in threads  # the files were read by the pool
    assert seen == list(range(1, len(seen) + 1)) and len(seen) == len(serial[0].records) + len(serial[0].skipped)


def test_symlinks_outside_root_are_not_followed(tmp_path):
    spec = write_dataset(tmp_path / "ds")
    write_good_images(spec.unlabeled_dir)
    outside = write_good_images(tmp_path / "elsewhere")
    (spec.unlabeled_dir / "link_file.png").symlink_to(outside["grey.png"].path)
    (spec.unlabeled_dir / "link_dir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (spec.unlabeled_dir / "inside.jpg").symlink_to(spec.unlabeled_dir / "photo.webp")
    (spec.unlabeled_dir / "loop").symlink_to(spec.unlabeled_dir, target_is_directory=True)
    manifest = build_manifest(spec)
    reasons = {s.path: s.reason for s in manifest.skipped}
    assert "outside the dataset root" in reasons["unlabeled/link_file.png"]
    assert "outside the dataset root" in reasons["unlabeled/link_dir"]
    assert reasons["unlabeled/photo.webp"] == "duplicate of unlabeled/inside.jpg"
    paths = [r.path for r in manifest.records]
    assert not any(p.startswith(("unlabeled/link", "unlabeled/loop")) for p in paths)


def test_empty_split_is_an_error_but_missing_labeled_means_no_labels(tmp_path):
    spec = write_dataset(tmp_path / "ds")
    write_bad_images(spec.unlabeled_dir)
    with pytest.raises(DatasetSpecError, match="no readable image in") as error:
        build_manifest(spec)
    assert str(spec.unlabeled_dir) in str(error.value)
    labeled = build_manifest(spec, "labeled")
    assert len(labeled) == 0 and labeled.records == ()
    (spec.labeled_dir / "cat").mkdir(parents=True)
    with pytest.raises(DatasetSpecError, match="no readable image"):
        build_manifest(spec, "labeled")


def test_labeled_split_labels_from_class_folders(tmp_path):
    spec = write_dataset(tmp_path / "ds")
    good = write_good_images(spec.unlabeled_dir)
    for index, name in enumerate(["photo.bmp", "grey.png", "photo.tiff"]):
        folder = spec.labeled_dir / CLASSES[index] / "sub"
        folder.mkdir(parents=True)
        shutil.copyfile(good[name].path, folder / f"labelled_{index}.png")
    shutil.copyfile(good["one_pixel.png"].path, spec.labeled_dir / "dog" / "held_out.png")
    shutil.copyfile(good["photo.bmp"].path, spec.labeled_dir / "stray.png")
    unlabeled, labeled = build_manifest(spec), build_manifest(spec, "labeled")
    assert {r.path: r.label for r in labeled.records} == {
        "labeled/cat/sub/labelled_0.png": 0,
        "labeled/dog/held_out.png": 1,
        "labeled/dog/sub/labelled_1.png": 1,
        "labeled/bird/sub/labelled_2.png": 2,
    }
    assert {s.path for s in labeled.skipped} == {"labeled/stray.png"}
    ids = {r.path: r.image_id for r in unlabeled.records}
    # one_pixel.png is in both splits, so its label is known too.
    assert known_labels(unlabeled, labeled) == {
        ids["unlabeled/photo.bmp"]: 0,
        ids["unlabeled/grey.png"]: 1,
        ids["unlabeled/one_pixel.png"]: 1,
        ids["unlabeled/photo.tiff"]: 2,
    }


def test_labeled_folders_match_classes_across_unicode_forms_and_flag_label_conflicts(tmp_path):
    spec = write_dataset(tmp_path / "ds", classes=("forêt", "rivière"))
    good = write_good_images(spec.unlabeled_dir)
    decomposed = unicodedata.normalize("NFD", "forêt")  # how macOS stores the folder name
    (spec.labeled_dir / decomposed).mkdir(parents=True)
    (spec.labeled_dir / "rivière").mkdir()
    shutil.copyfile(good["grey.png"].path, spec.labeled_dir / decomposed / "a.png")
    shutil.copyfile(good["grey.png"].path, spec.labeled_dir / "rivière" / "b.png")
    labeled = build_manifest(spec, "labeled")
    assert [r.label for r in labeled.records] == [0]
    assert [s.reason for s in labeled.skipped] == [
        f"duplicate of labeled/{decomposed}/a.png with a different label"
    ]


def test_labeled_folder_with_unknown_class_errors_naming_it(tmp_path):
    spec = write_dataset(tmp_path / "ds")
    write_good_images(spec.unlabeled_dir)
    (spec.labeled_dir / "cat").mkdir(parents=True)
    (spec.labeled_dir / "horse").mkdir()
    with pytest.raises(DatasetSpecError) as error:
        build_manifest(spec, "labeled")
    assert str(spec.labeled_dir / "horse") in str(error.value)
    assert "'cat', 'dog', 'bird'" in str(error.value)


def test_previous_manifest_avoids_rehashing_and_fingerprint_tracks_content(zoo, monkeypatch):
    spec, good, bad = zoo
    calls = []
    inspect = manifest_module._inspect_file

    def counting(path, max_pixels):
        calls.append(path.name)
        return inspect(path, max_pixels)

    monkeypatch.setattr(manifest_module, "_inspect_file", counting)

    def scan(previous=None):
        calls.clear()
        manifest = build_manifest(spec, previous=previous)
        return manifest, set(calls) - set(bad)  # unreadable files are always re-checked

    first, read = scan()
    assert read == set(good)

    again, read = scan(previous=first)
    assert again == first and read == set()

    touched = good["grey.png"].path
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after_touch, read = scan(previous=again)
    assert read == {"grey.png"}
    assert after_touch.fingerprint == first.fingerprint

    base_image().rotate(90, expand=True).save(spec.unlabeled_dir / "good" / "new.png")
    grown, read = scan(previous=after_touch)
    assert read == {"new.png"}
    assert grown.fingerprint != first.fingerprint
    assert len(grown) == len(first) + 1

    (spec.unlabeled_dir / "good" / "new.png").rename(spec.unlabeled_dir / "good" / "renamed.png")
    renamed, read = scan(previous=grown)
    assert read == {"renamed.png"}
    assert renamed.fingerprint == grown.fingerprint


def test_progress_is_reported(tmp_path):
    spec = write_dataset(tmp_path / "ds")
    good = write_good_images(spec.unlabeled_dir)
    seen = []
    build_manifest(spec, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, len(good)) for i in range(1, len(good) + 1)]


# ----------------------------------------------------------------------------- datasets


def test_dataset_and_collate_skip_a_file_deleted_or_changed_after_the_manifest(tmp_path):
    spec = write_dataset(tmp_path / "ds")
    good = write_good_images(spec.unlabeled_dir)
    manifest = build_manifest(spec)
    pre = Preprocess(16, CLIP_MEAN, CLIP_STD)
    dataset = ManifestImageDataset(spec.root, manifest.records, eval_transform(pre))
    position = {r.path: i for i, r in enumerate(manifest.records)}
    good["grey.png"].path.unlink()
    base_image().rotate(180).save(good["photo.bmp"].path)  # different picture, same path

    images, indices, failed = collate_skipping_failures([dataset[i] for i in range(len(dataset))])
    assert sorted(failed) == sorted(
        [position["unlabeled/grey.png"], position["unlabeled/photo.bmp"]]
    )
    assert images.shape == (len(dataset) - 2, 3, 16, 16)
    assert indices.dtype == torch.long
    assert set(indices.tolist()) | set(failed) == set(range(len(dataset)))

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4, collate_fn=collate_skipping_failures, num_workers=0
    )
    assert sum(len(batch[1]) for batch in loader) == len(dataset) - 2


def test_collate_stacks_views_and_handles_all_failed_batches(tmp_path):
    spec = write_dataset(tmp_path / "ds")
    write_good_images(spec.unlabeled_dir)
    records = build_manifest(spec).records
    pre = Preprocess(8, IMAGENET_MEAN, IMAGENET_STD)
    views = MultiView((weak_transform(pre), strong_transform(pre)))
    dataset = ManifestImageDataset(spec.root, records, views)
    (weak, strong), indices, failed = collate_skipping_failures([dataset[0], dataset[1]])
    assert weak.shape == strong.shape == (2, 3, 8, 8)
    assert indices.tolist() == [0, 1] and failed == []

    images, indices, failed = collate_skipping_failures([(None, 3), (None, 5)])
    assert images is None and indices.numel() == 0 and failed == [3, 5]
    missing = ManifestImageDataset(spec.root, [ImageRecord("0" * 64, "unlabeled/gone.png")], views)
    assert missing[0] == (None, 0)


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize(("mean", "std"), [(CLIP_MEAN, CLIP_STD), (IMAGENET_MEAN, IMAGENET_STD)])
def test_transforms_shape_and_normalisation(mean, std):
    pre = Preprocess(24, mean, std, crop_pct=0.875)
    colour = (200, 100, 30)
    flat = Image.new("RGB", (40, 30), colour)
    expected = (torch.tensor(colour) / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.manual_seed(0)
    for transform in (eval_transform(pre), weak_transform(pre), strong_transform(pre, jitter_p=0, second_jitter=None)):
        out = transform(flat)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32
        # Perspective may fill corners with black; compare the centre.
        centre = out[:, 8:16, 8:16].mean(dim=(1, 2))
        torch.testing.assert_close(centre, expected, atol=1e-3, rtol=0)


def test_weak_view_is_the_eval_view_up_to_crop_and_flip():
    pre = Preprocess(16, CLIP_MEAN, CLIP_STD)
    image = base_image().resize((20, 20))
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    torch.testing.assert_close(weak_transform(pre, flip_p=1.0)(image), eval_transform(pre)(flipped))
    torch.testing.assert_close(weak_transform(pre, flip_p=0.0)(image), eval_transform(pre)(image))


def test_strong_view_is_random_but_seedable():
    pre = Preprocess(32, CLIP_MEAN, CLIP_STD)
    strong = strong_transform(pre)
    image = base_image()

    def view(seed):
        torch.manual_seed(seed)
        return strong(image)

    assert view(1).shape == (3, 32, 32)
    assert not torch.equal(view(1), view(2))
    torch.testing.assert_close(view(3), view(3))


def test_preprocess_validates():
    assert Preprocess(224, CLIP_MEAN, CLIP_STD, crop_pct=0.875).resize_size == 256
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(224, CLIP_MEAN, CLIP_STD, interpolation="cubic")
    with pytest.raises(ValueError, match="crop_pct"):
        Preprocess(224, CLIP_MEAN, CLIP_STD, crop_pct=1.5)


# ----------------------------------------------------------------------------- demo data


def test_demo_dataset_is_complete_small_and_label_free_by_name():
    root = demo_dataset_path()
    spec = load_dataset_spec(root)
    assert spec.name == "fashion_mini"
    assert spec.classes == ("t-shirt", "trouser", "sneaker", "bag")
    assert spec.domain == "grayscale product photo"
    unlabeled, labeled = build_manifest(spec), build_manifest(spec, "labeled")
    assert len(unlabeled) == 120 and len(labeled) == 160
    assert not unlabeled.skipped and not labeled.skipped
    labels = known_labels(unlabeled, labeled)
    assert len(labels) == 120
    assert sorted(np.bincount(list(labels.values())).tolist()) == [30, 30, 30, 30]
    assert all(r.path.startswith("unlabeled/img_") for r in unlabeled.records)
    assert not any(c in r.path for r in unlabeled.records for c in spec.classes)
    with Image.open(root / unlabeled.records[0].path) as first:
        assert (first.mode, first.size) == ("L", (28, 28))
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 1_000_000
    assert (root / "README.md").is_file() and (root / "LICENSE-DATA.md").is_file()
