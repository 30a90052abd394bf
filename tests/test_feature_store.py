"""The feature store at scale: float16, memory-mapped, streamed top-k selection in bounded memory.

A scaled-down stand-in for 1.3 M × 768: 131,072 × 768 float16 (192 MiB on disk, 384 MiB as
float32). Selecting the top-k per class from the memory-mapped table, in chunks of 4,096 rows,
must grow the process's anonymous memory (RssAnon: the heap, not the file's page cache) by less
than 48 MiB, a quarter of the store; materialising the table in RAM grows it by the store's
size, which shows the measurement would catch a regression. The measurement runs in a fresh
process with glibc's mmap threshold fixed at 128 KiB, so freed buffers leave RSS at once and
RssAnon follows live memory.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nola_core.alignment import alignment_network, class_log_odds, predict_alignment, select_top_k
from nola_core.features import FeatureTable, load_feature_table, save_feature_table

ROWS, DIM, CLASSES, K = 131_072, 768, 10, 50
CHUNK = 4096
MEMORY_BOUND = 48 * 2**20

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def _anonymous_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakAnonymousMemory:
    """Samples RssAnon every millisecond in a thread; `.growth` is the peak minus the start."""

    def __enter__(self):
        self.start = self.peak = _anonymous_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _anonymous_rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anonymous_rss())
        self.growth = self.peak - self.start


def _classifier() -> torch.Tensor:
    return torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1))


def measure(path: str) -> dict:
    """In a fresh process: memory growth of streamed selection and prediction on the mapped store."""
    table = load_feature_table(Path(path), mmap=True)
    classifier, network = _classifier(), alignment_network(DIM, CLASSES)
    select_top_k(class_log_odds(table.features[: 2 * CHUNK], classifier, chunk_size=CHUNK), k=K)  # warm-up:
    predict_alignment(network, table.features[: 2 * CHUNK], chunk_size=CHUNK)  # one-time kernel buffers
    with PeakAnonymousMemory() as selecting:
        selection = select_top_k(class_log_odds(table.features, classifier, chunk_size=CHUNK), k=K)
    with PeakAnonymousMemory() as predicting:
        probabilities = predict_alignment(network, table.features, chunk_size=CHUNK)
    with PeakAnonymousMemory() as materialising:  # the control
        copy = table.features.clone()
    del copy
    return {
        "select": selecting.growth, "predict": predicting.growth, "materialise": materialising.growth,
        "indices": selection.indices.tolist(), "labels": selection.labels.tolist(),
        "probability_rows": probabilities.shape[0],
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(ROWS, DIM, generator=generator).to(torch.float16)
    ids = tuple(f"{i:064x}" for i in range(ROWS))  # content hashes are 64 hex characters
    path = tmp_path_factory.mktemp("store") / "features.safetensors"
    save_feature_table(FeatureTable(ids, features, failed=("f" * 64,)), path)
    expected = select_top_k(class_log_odds(features, _classifier(), chunk_size=CHUNK), k=K)
    return path, expected


def measure_in_fresh_process(module: str, argument) -> dict:
    """`<module>.measure(str(argument))` in a new interpreter (no earlier allocations in the heap;
    glibc returns freed chunks above 128 KiB to the kernel, so RssAnon follows live memory)."""
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024), PYTHONPATH=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", f"import json, {module} as t; "
                           f"print(json.dumps(t.measure({str(argument)!r})))"],
                          env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_top_k_streams_over_a_memory_mapped_store_in_bounded_memory(store):
    path, expected = store
    assert path.stat().st_size > 4 * MEMORY_BOUND
    result = measure_in_fresh_process("test_feature_store", path)
    assert result["select"] < MEMORY_BOUND, f"streamed top-k grew anonymous memory by {result['select'] / 2**20:.0f} MiB"
    assert result["predict"] < MEMORY_BOUND, f"streamed prediction grew it by {result['predict'] / 2**20:.0f} MiB"
    assert result["materialise"] > 3 * MEMORY_BOUND  # the measurement does see a full copy
    assert result["indices"] == expected.indices.tolist() and result["labels"] == expected.labels.tolist()
    assert result["probability_rows"] == ROWS


def test_mapped_table_rows_views_and_copy_on_write(store):
    path, _ = store
    table = load_feature_table(path, mmap=True)
    assert table.features.dtype == torch.float16 and table.features.shape == (ROWS, DIM)
    assert len(table) == ROWS and table.failed == ("f" * 64,) and table.ids[5] == f"{5:064x}"
    prefix = table.rows_for(table.ids[: ROWS - 5])  # e.g. the unlabeled images before held-out ones
    assert prefix.data_ptr() == table.features.data_ptr() and prefix.shape[0] == ROWS - 5
    picked = table.rows_for([table.ids[7], table.ids[3]])
    assert torch.equal(picked, torch.stack([table.features[7], table.features[3]]))
    original = table.features[0].clone()
    table.features[0] += 1  # copy-on-write: the file never changes
    assert torch.equal(load_feature_table(path, mmap=True).features[0], original)


def test_tables_written_by_the_first_format_still_load(tmp_path):
    features = torch.randn(3, 4).to(torch.float16)
    path = tmp_path / "v1.safetensors"
    save_file({"features": features}, str(path), metadata={"ids": json.dumps(["a", "b", "c"]), "failed": "[]"})
    for mmap in (False, True):
        table = load_feature_table(path, mmap=mmap)
        assert table.ids == ("a", "b", "c") and torch.equal(table.features, features)


def test_empty_and_unusual_ids_round_trip(tmp_path):
    for ids in [(), ("é/ü", "x" * 70, "a")]:
        table = FeatureTable(ids, torch.zeros(len(ids), 2, dtype=torch.float16))
        save_feature_table(table, tmp_path / "t.safetensors")
        for mmap in (False, True):
            loaded = load_feature_table(tmp_path / "t.safetensors", mmap=mmap)
            assert loaded.ids == ids and loaded.features.shape == (len(ids), 2)
