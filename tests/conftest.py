import os

# Tests run tiny models on a 2-core machine beside DataLoader workers and subprocesses: with
# two intra-op threads, OpenMP's spinning threads fight those processes for the cores and small
# ops get tens of times slower (measured: the 10-epoch demo run took 42 s with 2 threads, 8.5 s
# with 1). One thread per process; subprocesses inherit it. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _offline_environment(monkeypatch):
    """No test may wait on the network or pick up a developer's real API keys."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    yield


# Module-level too: some libraries read these once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def labels_from_folders(dataset_dir) -> dict[str, str]:
    """Image id (SHA-256 of the file's bytes) → class folder name, for every file under
    `labeled/<class>/`: the ground truth read straight off the disk, not through the manifest code."""
    import hashlib
    from pathlib import Path

    labeled = Path(dataset_dir) / "labeled"
    return {hashlib.sha256(path.read_bytes()).hexdigest(): path.relative_to(labeled).parts[0]
            for path in labeled.rglob("*") if path.is_file()}


@pytest.fixture(scope="session")
def folder_labels():
    """`labels_from_folders`, for tests that compare a reported figure with one computed from disk."""
    return labels_from_folders
