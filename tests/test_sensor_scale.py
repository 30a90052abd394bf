"""One sensor tick over a large data root: within its time budget, every dataset registered, no
image opened.

Opens are counted with a Python audit hook on the "open" event, which `open`, `io.open`,
`os.open`, pathlib and PIL all raise, so no way of reading a file escapes the count.
"""

import os
import sys
import time
from pathlib import Path

from dagster import DagsterInstance

from nola_assets.partitions import DATASETS
from nola_assets.sensors import build_unlabeled_images_sensor
from test_sensor import Daemon

BUDGET_SECONDS = 10.0
BIG_FILES = 20_000
SMALL_DATASETS = 200

_opened: list[str] | None = None  # paths opened while a count is on


def _count_opens(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _opened.append(str(args[0]))


sys.addaudithook(_count_opens)  # audit hooks cannot be removed; it records only while _opened is a list


def _dataset(root: Path, name: str, images: int) -> None:
    unlabeled = root / name / "unlabeled"
    unlabeled.mkdir(parents=True)
    (root / name / "dataset.yaml").write_text(f"name: {name}\nclasses: [cat, dog]\n")
    first = unlabeled / "00000.jpg"  # not a real image: the sensor must not look inside any file
    first.write_bytes(b"\xff\xd8 not decoded by the sensor")
    for i in range(1, images):  # hard links: a directory entry each, created much faster than files
        os.link(first, unlabeled / f"{i:05d}.jpg")


def test_one_tick_over_20000_files_and_200_datasets_registers_all_and_opens_no_image(tmp_path):
    global _opened
    data_root = tmp_path / "data"
    _dataset(data_root, "big", BIG_FILES)
    for i in range(SMALL_DATASETS):
        _dataset(data_root, f"small_{i:03d}", 3)
    daemon = Daemon(build_unlabeled_images_sensor("scale"), DagsterInstance.ephemeral(), data_root,
                    tmp_path / "artifacts", tick_budget_seconds=BUDGET_SECONDS)
    _opened = []
    try:
        started = time.monotonic()
        result = daemon.tick()
        seconds = time.monotonic() - started
    finally:
        opened, _opened = _opened, None
    assert seconds < BUDGET_SECONDS, seconds
    assert len(daemon.instance.get_dynamic_partitions(DATASETS)) == SMALL_DATASETS + 1
    assert len(result.run_requests) == SMALL_DATASETS + 1  # every folder walked in this one tick
    assert sum(path.endswith("dataset.yaml") for path in opened) >= SMALL_DATASETS + 1  # the count sees opens
    assert [path for path in opened if "/unlabeled/" in path or path.endswith((".jpg", ".png"))] == []
    print(f"tick: {seconds:.2f} s for {BIG_FILES + 3 * SMALL_DATASETS} files in {SMALL_DATASETS + 1} datasets")
