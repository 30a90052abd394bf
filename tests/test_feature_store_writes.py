"""Writing feature tables without holding them: extraction and merges stream rows to the file.

Memory: a scaled-down table of 512 images × 65,536 dims float16 (64 MiB; at 1.3 M × 768 a
table is 2 GB) is extracted batch by batch into a store file, then merged with new rows into a
second file. Each must grow the process's anonymous memory (RssAnon, measured as in
tests/test_feature_store.py, in a fresh process) by less than 16 MiB, a quarter of the table;
the same work kept in RAM grows it by at least the table's size, which shows the measurement
would catch a regression.
"""

import functools
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open
from safetensors.torch import load_file
from torchvision import transforms

from nola_core.data import ImageRecord, build_manifest, load_dataset_spec
from nola_core.demo import demo_dataset_path
from nola_core.features import (
    FeatureConfig,
    FeatureTable,
    FeatureTableWriter,
    extract_features,
    load_feature_table,
    save_feature_table,
    update_feature_table,
    write_feature_table,
)
from nola_core.runtime import ComputeSettings

IMAGES, DIM, BATCH = 512, 65536, 16
TABLE_BYTES = IMAGES * DIM * 2
MEMORY_BOUND = 16 * 2**20


def _wide_encoder(images: torch.Tensor) -> torch.Tensor:
    """[B, DIM] rows that depend on the image (its mean) and on the column."""
    return images.mean(dim=(1, 2, 3))[:, None] + torch.arange(DIM, dtype=torch.float32)[None] / DIM


def _write_images(folder: Path, count: int) -> None:
    """`count` PNG files of the demo's real photos (cycled); a text chunk makes each file, and so
    each content id, unique."""
    demo = build_manifest(load_dataset_spec(demo_dataset_path()), "unlabeled").records
    folder.mkdir(parents=True)
    for i in range(count):
        info = PngImagePlugin.PngInfo()
        info.add_text("copy", str(i))
        Image.open(demo_dataset_path() / demo[i % len(demo)].path).save(folder / f"{i:04d}.png", pnginfo=info)


def _records(folder: Path) -> list[ImageRecord]:
    return [ImageRecord(image_id=hashlib.sha256(path.read_bytes()).hexdigest(), path=path.name)
            for path in sorted(folder.glob("*.png"))]


def _extract(folder: Path, records, output=None) -> FeatureTable:
    return extract_features(_wide_encoder, folder, records,
                            transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()]),
                            FeatureConfig(batch_size=BATCH,
                                          compute=ComputeSettings(num_workers=0)), "cpu", output=output)


def measure(folder: str) -> dict:
    """In a fresh process: memory growth of streamed and in-RAM extraction and merging."""
    from test_feature_store import PeakAnonymousMemory

    folder = Path(folder)
    images = folder / "images"
    every = _records(images)
    records, new = every[:IMAGES], every[IMAGES:]
    extract = functools.partial(_extract, images)
    extract(records[:BATCH], folder / "warm-up.safetensors")  # one-time buffers (decoders, kernels)
    extract(records[:BATCH])
    with PeakAnonymousMemory() as streamed:
        table = extract(records, folder / "features.safetensors")
    with PeakAnonymousMemory() as in_ram:  # the control
        kept = extract(records)
    first_rows_equal = bool(torch.equal(table.features[:3], kept.features[:3]))
    del kept
    fresh = extract(new)
    with PeakAnonymousMemory() as merged_streamed:
        merged, _ = update_feature_table(table, records + new, lambda todo: fresh, folder / "merged.safetensors")
    with PeakAnonymousMemory() as merged_in_ram:  # the control
        merged_kept, _ = update_feature_table(table, records + new, lambda todo: fresh)
    return {
        "extract": streamed.growth, "extract_in_ram": in_ram.growth,
        "merge": merged_streamed.growth, "merge_in_ram": merged_in_ram.growth,
        "first_rows_equal": first_rows_equal,
        "merged_equal": bool(torch.equal(merged.features, merged_kept.features)),
        "merged_ids": list(merged.ids) == [r.image_id for r in records + new],
        "rows": len(table),
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_extraction_and_merges_write_the_table_in_bounded_memory(tmp_path):
    from test_feature_store import measure_in_fresh_process

    _write_images(tmp_path / "images", IMAGES + BATCH)
    result = measure_in_fresh_process("test_feature_store_writes", tmp_path)
    assert (tmp_path / "features.safetensors").stat().st_size > TABLE_BYTES
    assert result["rows"] == IMAGES and result["first_rows_equal"]  # every image was read
    for streamed, in_ram in (("extract", "extract_in_ram"), ("merge", "merge_in_ram")):
        assert result[streamed] < MEMORY_BOUND, f"{streamed} grew anonymous memory by {result[streamed] / 2**20:.0f} MiB"
        assert result[in_ram] >= TABLE_BYTES * 0.9  # the measurement does see a table held in RAM
    assert result["merged_equal"] and result["merged_ids"]


def test_written_tables_are_plain_safetensors(tmp_path):
    """safetensors' own reader validates the layout (contiguous offsets, header padding)."""
    for dtype in (torch.float16, torch.float32, torch.bfloat16):
        features = torch.randn(5, 3).to(dtype)
        path = tmp_path / f"{dtype}.safetensors"
        save_feature_table(FeatureTable(("a", "bb", "é"), features[:3], failed=("x", "yyyy")), path)
        tensors = load_file(str(path))
        assert torch.equal(tensors["features"], features[:3]) and tensors["ids"].dtype == torch.uint8
        with safe_open(str(path), framework="pt") as handle:
            assert json.loads(json.dumps(handle.metadata()))["format"] == "nola-features/3"
        for mmap in (False, True):
            loaded = load_feature_table(path, mmap=mmap)
            assert loaded.ids == ("a", "bb", "é") and loaded.failed == ("x", "yyyy")
            assert loaded.features.dtype == dtype and torch.equal(loaded.features, features[:3])


def test_rows_appended_in_pieces_equal_the_whole(tmp_path):
    features = torch.randn(10, 4)
    ids = [f"id{i}" for i in range(10)]
    with FeatureTableWriter(tmp_path / "t.safetensors", torch.float32) as writer:
        for start, end in ((0, 3), (3, 3), (3, 7), (7, 10)):  # an empty piece too
            writer.append(ids[start:end], features[start:end])
    table = load_feature_table(tmp_path / "t.safetensors", mmap=True)
    assert table.ids == tuple(ids) and torch.equal(table.features, features) and table.failed == ()


def test_a_failed_write_leaves_the_previous_table_and_no_temporary(tmp_path):
    path = tmp_path / "features.safetensors"
    save_feature_table(FeatureTable(("a",), torch.ones(1, 2, dtype=torch.float16)), path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with FeatureTableWriter(path) as writer:
            writer.append(["b"], torch.zeros(1, 2))
            raise RuntimeError("disk full")
    with pytest.raises(ValueError, match=r"rows of shape \(3,\) after rows of shape \(2,\)"):
        with FeatureTableWriter(path) as writer:
            writer.append(["b"], torch.zeros(1, 2))
            writer.append(["c"], torch.zeros(1, 3))
    with pytest.raises(ValueError, match="2 ids for rows of shape"):
        with FeatureTableWriter(path) as writer:
            writer.append(["b", "c"], torch.zeros(1, 2))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["features.safetensors"]


def test_merging_takes_each_row_from_the_first_table_that_holds_it(tmp_path):
    old = FeatureTable(("a", "b", "c"), torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float16))
    new = FeatureTable(("d", "b"), torch.tensor([[4.0], [20.0]], dtype=torch.float16), failed=("e",))
    table = write_feature_table(tmp_path / "m.safetensors", ["d", "b", "a"], [old, new], new.failed)
    assert table.ids == ("d", "b", "a") and table.features[:, 0].tolist() == [4.0, 2.0, 1.0]
    assert table.failed == ("e",)
    with pytest.raises(KeyError, match="1 id"):
        write_feature_table(tmp_path / "m.safetensors", ["a", "z"], [old, new])
    assert load_feature_table(tmp_path / "m.safetensors").ids == ("d", "b", "a")  # the failed merge changed nothing
