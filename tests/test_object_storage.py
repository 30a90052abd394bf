"""nola_core.storage against an S3 server on localhost (moto) and a file:// root: write-once
publishing, a killed upload leaving nothing under its final key, listings without reads, and
feature tables read in ranged chunks into the local cache by key."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest
import torch

from nola_core import storage
from nola_core.features import FeatureTable, load_feature_table, save_feature_table
from nola_core.storage import STAGING_PREFIX, fetch_cached, open_storage

from tests.s3_server import s3_server  # noqa: F401  (module-scoped fixture)


@pytest.fixture(params=["s3", "file"])
def root(request, tmp_path):
    """A fresh storage root: a new bucket on the moto server, or a file:// URL of a temp folder."""
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        return f"s3://{server.new_bucket()}/artifacts"
    return (tmp_path / "store").as_uri()


def test_publish_writes_once_and_leaves_no_staging(root):
    store = open_storage(root)
    assert store.publish("ds/asset/d1/table.bin", b"first")
    assert not store.publish("ds/asset/d1/table.bin", b"second")  # a finished key is never rewritten
    assert store.read_bytes("ds/asset/d1/table.bin") == b"first"
    assert [(o.key, o.size) for o in store.listing()] == [("ds/asset/d1/table.bin", 5)]


def test_rewrite_sends_no_upload(s3_server):
    store = open_storage(f"s3://{s3_server.new_bucket()}/artifacts")
    store.publish("d/x.json", b"{}")
    mark = len(s3_server.requests)
    store.publish("d/x.json", b"{}")
    assert [r.method for r in s3_server.since(mark)] == ["HEAD"]  # one existence check, no PUT or copy


def test_listing_gives_sizes_and_etags_without_reading(s3_server):
    bucket = s3_server.new_bucket()
    store = open_storage(f"s3://{bucket}/data")
    for name, data in {"a/dataset.yaml": b"name: a\n", "a/unlabeled/x.png": b"x" * 10, "b/y.png": b"y"}.items():
        store.publish(name, data)
    mark = len(s3_server.requests)
    listing = store.listing("a")
    assert [(o.key, o.size) for o in listing] == [("dataset.yaml", 8), ("unlabeled/x.png", 10)]
    assert all(len(o.version) == 32 for o in listing)  # single-part ETags: the MD5 of the bytes
    assert store.folders() == ["a", "b"]
    requests = s3_server.since(mark, bucket)
    assert requests and not any(r.reads_object for r in requests)


_PUBLISH_STDIN = """
import sys
from nola_core.storage import open_storage
open_storage(sys.argv[1]).publish("ds/asset/d1/features.safetensors", sys.stdin.buffer)
"""


def test_killed_upload_leaves_nothing_under_the_final_key(root, request):
    """A publisher killed mid-stream (after a multipart part reached S3, or bytes reached the
    staging file) leaves the final key absent: readers see the whole object or none."""
    store = open_storage(root)
    child = subprocess.Popen([sys.executable, "-c", _PUBLISH_STDIN, root], stdin=subprocess.PIPE)
    try:
        child.stdin.write(b"\1" * (storage.CHUNK_BYTES + 1))  # one part's worth goes up, then it waits
        child.stdin.flush()
        deadline = time.monotonic() + 30
        while not _upload_under_way(store, root, request) and time.monotonic() < deadline:
            assert child.poll() is None, "the publisher ended before it was killed"
            time.sleep(0.05)
        assert _upload_under_way(store, root, request), "no sign of the upload within 30 s"
    finally:
        child.kill()
        child.wait()
    assert not store.exists("ds/asset/d1/features.safetensors")
    assert [o.key for o in store.listing() if not o.key.startswith(STAGING_PREFIX)] == []


def _upload_under_way(store, root, request) -> bool:
    if root.startswith("s3://"):
        return any("partNumber=1" in r.query and r.method == "PUT"
                   for r in request.getfixturevalue("s3_server").requests)
    return any(o.size > 0 for o in store.listing())


def test_feature_table_is_fetched_in_ranged_chunks_and_cached_by_key(s3_server, tmp_path, monkeypatch):
    bucket = s3_server.new_bucket()
    ids = tuple(f"{i:064x}" for i in range(1500))
    features = torch.randn(len(ids), 96).to(torch.float16)
    local = tmp_path / "features.safetensors"
    save_feature_table(FeatureTable(ids=ids, features=features, failed=("bad",)), local)
    url = f"s3://{bucket}/artifacts/ds/clip_features/abc/features.safetensors"
    open_storage(f"s3://{bucket}/artifacts").publish("ds/clip_features/abc/features.safetensors", local)
    monkeypatch.setattr(storage, "CHUNK_BYTES", 64 * 1024)
    cache = tmp_path / "cache"

    mark = len(s3_server.requests)
    table = load_feature_table(url, mmap=True, cache_dir=cache)
    reads = [r for r in s3_server.since(mark, bucket) if r.reads_object]
    size = local.stat().st_size
    assert len(reads) == math.ceil(size / (64 * 1024)) > 1
    spans = [tuple(map(int, r.range.removeprefix("bytes=").split("-"))) for r in reads]
    assert all(end - start + 1 <= 64 * 1024 for start, end in spans)  # never the whole object in one read
    assert table.ids == ids and table.failed == ("bad",) and torch.equal(table.features, features)
    cached = fetch_cached(url, cache)
    assert cached == cache / "s3" / bucket / "artifacts/ds/clip_features/abc/features.safetensors"
    assert _mapped_from(table.features, cached)  # paged in from the cached file, not held in RAM

    mark = len(s3_server.requests)
    again = load_feature_table(url, mmap=True, cache_dir=cache)
    assert torch.equal(again.features, features)
    assert s3_server.since(mark, bucket) == []  # a cached write-once key is not asked for again


def _mapped_from(tensor: torch.Tensor, path) -> bool:
    """Whether `tensor`'s memory lies in a mapping of the file `path` (/proc/self/maps)."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if len(fields) >= 6 and fields[5] == str(path) and start <= address < end:
            return True
    return False


def test_mirror_follows_versions_and_reads_nothing_when_unchanged(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    data = open_storage(f"s3://{bucket}/data")
    data.put("ds/dataset.yaml", b"name: ds\n")
    data.put("ds/unlabeled/a.png", b"aaaa")
    data.put("ds/unlabeled/b.png", b"bbbb")
    local = data.mirror("ds", tmp_path / "ds")
    assert (local / "unlabeled/a.png").read_bytes() == b"aaaa"

    mark = len(s3_server.requests)
    data.mirror("ds", local)
    assert [r.method for r in s3_server.since(mark, bucket)] == ["GET"]  # one listing, no object read

    data.put("ds/unlabeled/a.png", b"AAAA")  # same size, new bytes
    data.fs.rm_file(data.path("ds/unlabeled/b.png"))
    mark = len(s3_server.requests)
    data.mirror("ds", local)
    assert [r.key for r in s3_server.since(mark, bucket) if r.reads_object] == ["data/ds/unlabeled/a.png"]
    assert (local / "unlabeled/a.png").read_bytes() == b"AAAA" and not (local / "unlabeled/b.png").exists()
