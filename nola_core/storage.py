"""Artifacts and data in object storage: a root URL (`s3://bucket/prefix`, `gs://…`, `file://…`, or a
plain local path) opened through fsspec; pure Python, no Dagster.

What the rest of the code needs from object storage:

- `Storage.listing(prefix)`: every object under a prefix with its size and version (the ETag on
  S3 and GCS, the mtime on a file system), from listing requests alone: no object is opened.
  It is how the sensor sees a data root.
- `Storage.put(key, source)`: the bytes go to a staging key under `<root>/.staging/` and are
  then moved onto `key` (one server-side copy on S3, a rename on a file system), so an upload
  killed mid-way leaves nothing under `key`. `Storage.publish` is the write-once form: an object
  already at `key` is never rewritten (keys are content-addressed). A reader knows a multi-object
  artifact is finished by an object written last (the artifact store's ref.json).
- `fetch_cached(url, cache_dir)`: a local copy of a write-once object, kept on disk by its key
  under `cache_dir/<protocol>/<bucket>/<key>`, downloaded (`download`) in ranged reads straight
  into a temporary file (RAM holds one chunk), renamed into place when complete. A cached key is
  used without asking the server again. Feature tables are memory-mapped from this copy
  (`nola_core.features.load_feature_table`).
- `Storage.mirror(prefix, folder)`: a local copy of mutable objects (a dataset folder of a data
  root, the evaluation tables of an artifact root), brought up to date by version: the images are
  decoded from it, `nola report` queries it. `local_copy(location, cache_dir)` is the same for a
  whole root given as a URL or a local path.

Credentials and endpoints come from the usual places of each fsspec backend (for S3: the AWS
environment variables or profile, `AWS_ENDPOINT_URL` for an S3-compatible server such as MinIO);
the `s3` extra installs s3fs (`pip install 'nola[s3]'`), gcsfs serves `gs://`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import fsspec
from fsspec import AbstractFileSystem

CHUNK_BYTES = 8 * 2**20
"""Bytes asked for by one ranged read when an object is copied into the local cache."""
STAGING_PREFIX = ".staging"
"""Where `publish` uploads before moving an object onto its final key (a lifecycle rule may
expire what a killed upload left there)."""
VERSIONS_FILE = ".nola-versions.json"
"""What `Storage.mirror` keeps in its local copy: the version of every object it copied."""
DEFAULT_CACHE_DIR = ".nola_cache/objects"
"""The local cache of remote objects, relative to the working directory (env NOLA_CACHE_DIR in
the Dagster resources)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object of a listing: `key` relative to the listed prefix ('/'-separated)."""

    key: str
    size: int
    version: str  # ETag on object stores, mtime in ns on a file system: changes when the bytes do


def is_remote(location: str | os.PathLike) -> bool:
    """Whether `location` is a URL of a store other than the local file system."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


@dataclass(frozen=True)
class Storage:
    """A root on one fsspec file system; keys are '/'-separated paths under it."""

    fs: AbstractFileSystem
    root: str

    def path(self, key: str = "") -> str:
        key = key.strip("/")  # `mirror("")` (a whole root) joins its keys as "/<key>"
        return f"{self.root}/{key}" if key else self.root

    def url(self, key: str = "") -> str:
        return self.fs.unstrip_protocol(self.path(key))

    def listing(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under `prefix` (recursively), sorted by key; listing requests only."""
        base = self.path(prefix).rstrip("/")
        self.fs.invalidate_cache(base)  # a listing cached by fsspec would hide new objects between ticks
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return []
        infos = []
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            version = info.get("ETag") or info.get("etag") or str(int(float(info.get("mtime", 0)) * 1e9))
            infos.append(ObjectInfo(path[len(base) + 1:], int(info["size"]), str(version).strip('"')))
        return sorted(infos, key=lambda item: item.key)

    def folders(self, prefix: str = "") -> list[str]:
        """Names of the folders (common prefixes) directly under `prefix`: one delimited listing."""
        base = self.path(prefix).rstrip("/")
        self.fs.invalidate_cache(base)
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries
                      if entry.get("type") == "directory")

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def put(self, key: str, source: bytes | Path | BinaryIO) -> None:
        """Write `source` (bytes, a local file or a binary stream, sent in parts of `CHUNK_BYTES`)
        at `key`, replacing what is there: to a staging key first, then one move onto `key`."""
        final = self.path(key)
        staging = self.path(f"{STAGING_PREFIX}/{uuid.uuid4().hex}-{key.rsplit('/', 1)[-1]}")
        for folder in {self.fs._parent(staging), self.fs._parent(final)}:  # file systems need them; object stores ignore them
            self.fs.makedirs(folder, exist_ok=True)
        try:
            if isinstance(source, bytes):
                self.fs.pipe_file(staging, source)
            else:
                with contextlib.ExitStack() as stack:
                    stream = stack.enter_context(open(source, "rb")) if isinstance(source, Path) else source
                    shutil.copyfileobj(stream, stack.enter_context(self.fs.open(staging, "wb", block_size=CHUNK_BYTES)),
                                       CHUNK_BYTES)
            self.fs.mv(staging, final)
        finally:
            if self.fs.exists(staging):
                self.fs.rm_file(staging)

    def publish(self, key: str, source: bytes | Path | BinaryIO) -> bool:
        """`put` unless an object is already at `key` (write-once); returns whether it wrote."""
        if self.exists(key):
            return False
        self.put(key, source)
        return True

    def mirror(self, prefix: str, target: Path, chunk_bytes: int | None = None) -> Path:
        """`target` made a copy of the (mutable) objects under `prefix`: objects new or changed
        since the last call (by version, kept in `target/VERSIONS_FILE`) are downloaded,
        local files whose object is gone are deleted. One listing when nothing changed."""
        record = target / VERSIONS_FILE
        known = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
        listing = {o.key: o.version for o in self.listing(prefix)}
        for key in sorted(set(known) - set(listing)):
            (target / key).unlink(missing_ok=True)
        for key, version in listing.items():
            if known.get(key) != version or not (target / key).is_file():
                download(self.url(f"{prefix}/{key}"), target / key, chunk_bytes)
        if listing != known:
            target.mkdir(parents=True, exist_ok=True)
            temporary = record.with_name(f".{record.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps(listing, sort_keys=True), encoding="utf-8")
            os.replace(temporary, record)
        return target


def join(location: str | os.PathLike, name: str) -> str | Path:
    """`name` under `location`: a URL stays a URL, a path a `Path`."""
    return f"{os.fspath(location).rstrip('/')}/{name}" if is_remote(location) else Path(location) / name


def open_storage(location: str | os.PathLike) -> Storage:
    """The `Storage` at `location`: a URL of any fsspec protocol, or a local path."""
    fs, root = fsspec.url_to_fs(os.fspath(location))
    return Storage(fs, root.rstrip("/") or root)


def local_root(location: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """The local folder a root is read and written through: the folder itself, or for a URL its
    copy in the cache (`cache_path`)."""
    location = os.fspath(location)
    if is_remote(location):
        return cache_path(location, cache_dir).resolve()
    return Path(fsspec.url_to_fs(location)[1] if "://" in location else location).resolve()  # a plain path as it is


def local_copy(location: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """The local folder to read the folder at `location` from: the folder itself for a local path
    or file:// URL; for a URL its copy in the cache (`local_root`), brought up to date by `mirror`,
    and FileNotFoundError naming the URL when no object is under it."""
    target = local_root(location, cache_dir)
    if not is_remote(location):
        return target
    open_storage(location).mirror("", target)
    if not any(p.is_file() and p.name != VERSIONS_FILE for p in target.rglob("*")):
        raise FileNotFoundError(f"no object under {os.fspath(location)}")
    return target


def cache_path(url: str, cache_dir: str | os.PathLike) -> Path:
    """Where `fetch_cached` keeps the object at `url`: `<cache_dir>/<protocol>/<bucket>/<key>`."""
    fs, path = fsspec.url_to_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    parts = [part for part in path.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise ValueError(f"{url}: '.' and '..' are not allowed in an object key")
    return Path(cache_dir, protocol, *parts)


def fetch_cached(url: str, cache_dir: str | os.PathLike, chunk_bytes: int | None = None) -> Path:
    """The local copy of the write-once object at `url` (a local path or file:// URL is returned
    as it is), kept under `cache_path(url, cache_dir)`: downloaded once (`download`), then used
    without asking the server again."""
    if not is_remote(url):
        return Path(fsspec.url_to_fs(url)[1])
    target = cache_path(url, cache_dir)
    return target if target.is_file() else download(url, target, chunk_bytes)


def download(url: str, target: Path, chunk_bytes: int | None = None) -> Path:
    """Copy the object at `url` to the local file `target` in ranged reads of `chunk_bytes`
    (default `CHUNK_BYTES`) into a temporary file next to it, renamed onto `target` when complete:
    RAM holds one chunk, and `target` is never half written."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    fs, path = fsspec.url_to_fs(url)
    size = int(fs.info(path)["size"])
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as out:
            for start in range(0, size, chunk_bytes):
                out.write(fs.cat_file(path, start=start, end=min(start + chunk_bytes, size)))
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target
