"""A folder of pretrained weights for machines without internet, and the SHA-256 check of any
weights file before it is loaded.

`nola weights download --to DIR` (on a connected machine) writes

    DIR/manifest.json              {"format": 1, "models": [entry, ...]}
    DIR/clip/<name>/<tag>/<file>   open_clip checkpoints (architecture, pretrained tag)
    DIR/dino/<name>/<file>         timm checkpoints (the DINO name carries its tag)

where an entry is a `WeightsEntry`: kind, name, tag, file (relative to DIR), sha256, size and
the source it was fetched from. Every loader consults the folder first (`weights_dir` of the
model config, which the Dagster resources and the CLI fill from `NOLA_WEIGHTS_DIR`): a model it
holds is loaded from it, after its SHA-256 is checked against the manifest; a model it does not
hold is fetched as usual.

The fetch is open_clip's and timm's own: `open_clip.pretrained.download_pretrained` on the tag's
pretrained config, and timm's source resolution (`_resolve_pretrained_source`, as its
`load_pretrained` does) with its hub or URL download, into the libraries' usual caches (a model
already cached is not downloaded again), then copied into the folder. Both libraries honour a
config whose `file` names a local file; given one, the fetch copies that file (how the tests
write a folder offline, through the same code).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

WEIGHTS_DIR_ENV = "NOLA_WEIGHTS_DIR"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
DOWNLOAD_FIX = "nola weights download"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched (offline, unknown tag, unreadable file)."""


class CheckpointHashError(WeightsUnavailableError):
    """A checkpoint whose SHA-256 is not the one expected (corrupt or replaced)."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(path: str | None, expected_sha256: str | None,
                      remedy: str = "retrain with `python -m nola_core.mini.train`") -> None:
    """Refuse a checkpoint file whose content is not the expected one (no-op without a hash)."""
    if path is None or expected_sha256 is None:
        return
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise CheckpointHashError(
            f"{path}: SHA-256 {actual} differs from the expected {expected_sha256}; "
            f"the file is corrupt or was replaced ({remedy})"
        )


@dataclass(frozen=True)
class WeightsEntry:
    kind: str  # "clip" or "dino"
    name: str  # open_clip architecture, or the DINO name of the model config
    tag: str | None  # open_clip pretrained tag; None for DINO
    file: str  # relative to the weights folder
    sha256: str
    size: int
    source: str  # where it was fetched from

    @property
    def key(self) -> tuple[str, str, str | None]:
        return self.kind, self.name, self.tag


def resolve_weights_dir(configured: str | None) -> Path | None:
    """The weights folder of a model config, else none. NOLA_WEIGHTS_DIR is read at the edges
    (`ModelsResource.weights_dir`, the CLI), which put it in `ModelConfig.weights_dir`."""
    return Path(configured).expanduser() if configured else None


def read_manifest(folder: Path) -> list[WeightsEntry]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights folder {folder} has no {MANIFEST}; write it with `{DOWNLOAD_FIX} ... --to {folder}` "
            f"on a connected machine, or unset {WEIGHTS_DIR_ENV}")
    return [WeightsEntry(**entry) for entry in json.loads(path.read_text(encoding="utf-8"))["models"]]


def find_entry(folder: Path, kind: str, name: str, tag: str | None) -> WeightsEntry | None:
    return next((e for e in read_manifest(folder) if e.key == (kind, name, tag)), None)


def local_weights(folder: Path | None, kind: str, name: str, tag: str | None) -> str | None:
    """The file of this model in the weights folder, its SHA-256 checked; None when the folder
    (or no folder) holds it."""
    if folder is None:
        return None
    entry = find_entry(folder, kind, name, tag)
    if entry is None:
        return None
    path = Path(folder) / entry.file
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: listed in {Path(folder) / MANIFEST} but missing; "
                                      f"download it again with `{download_command(kind, name, tag)} --to {folder}`")
    verify_checkpoint(str(path), entry.sha256, remedy=f"download it again with `{download_command(kind, name, tag)} "
                      f"--to {folder}`")
    return str(path)


def download_command(kind: str, name: str, tag: str | None) -> str:
    return f"{DOWNLOAD_FIX} --clip {name}:{tag}" if kind == "clip" else f"{DOWNLOAD_FIX} --dino {name}"


# ── the fetch: open_clip's and timm's own download functions ──────────────────────────────────


def clip_source(name: str, tag: str) -> dict[str, Any]:
    """open_clip's pretrained config of `name` / `tag`."""
    from open_clip import pretrained

    from nola_core.models.registry import register_tiny_clip_configs

    register_tiny_clip_configs()
    cfg = pretrained.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = pretrained.list_pretrained_tags_by_model(name)
        raise ValueError(f"open_clip knows no pretrained tag {tag!r} for {name!r}; known: {', '.join(tags) or 'none'}")
    return cfg


def dino_source(name: str) -> dict[str, Any]:
    """timm's pretrained config of a DINO name (ours, or a timm `arch.tag`)."""
    import timm

    from nola_core.models.registry import DINO_CONFIGS, TimmModelSpec

    timm_name = DINO_CONFIGS.get(name, TimmModelSpec(timm_name=name)).timm_name
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        raise ValueError(f"timm has no pretrained weights named {timm_name!r} (a name with a tag, e.g. "
                         "vit_base_patch16_224.dino)")
    return cfg.to_dict()


def fetch_clip(cfg: Mapping[str, Any]) -> tuple[str, str]:
    """(local file, where it came from) for an open_clip pretrained config, by open_clip's download."""
    from open_clip import pretrained

    path = pretrained.download_pretrained(dict(cfg))
    if not path:
        raise WeightsUnavailableError(f"open_clip found nothing to download in {dict(cfg)}")
    if cfg.get("file"):
        return path, str(cfg["file"])
    if cfg.get("hf_hub") and pretrained.has_hf_hub():  # open_clip prefers the hub to the URL
        return path, f"hf-hub:{os.path.split(cfg['hf_hub'])[0]}/{os.path.basename(path)}"
    return path, cfg.get("url", "")


def fetch_dino(cfg: Mapping[str, Any]) -> tuple[str, str]:
    """(local file, where it came from) for a timm pretrained config, resolved as timm's
    `load_pretrained` does: a file, else the Hugging Face hub (safetensors first), else the URL."""
    from huggingface_hub.errors import RemoteEntryNotFoundError
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives, download_cached_file, download_from_hf

    load_from, location = _resolve_pretrained_source(dict(cfg))
    if load_from == "file":
        return location, location
    if load_from == "url":
        return download_cached_file(location, check_hash=True), location
    if load_from == "hf-hub":
        repo, filename = location if isinstance(location, (tuple, list)) else (location, HF_WEIGHTS_NAME)
        for name in (*_get_safe_alternatives(filename), filename):
            try:
                return download_from_hf(repo, name), f"hf-hub:{repo}/{name}"
            except RemoteEntryNotFoundError:  # not in the repository: the next name
                continue
        raise WeightsUnavailableError(f"no weights file in the Hugging Face repository {repo}")
    raise WeightsUnavailableError(f"timm's pretrained config names no weights to download: {dict(cfg)}")


@dataclass(frozen=True)
class WeightsRequest:
    """One model to write into a weights folder; `cfg` is its library's pretrained config
    (`clip_source`, `dino_source`, or one with `file` naming a local file)."""

    kind: str
    name: str
    tag: str | None
    cfg: Mapping[str, Any]


def clip_request(name: str, tag: str, cfg: Mapping[str, Any] | None = None) -> WeightsRequest:
    return WeightsRequest("clip", name, tag, cfg if cfg is not None else clip_source(name, tag))


def dino_request(name: str, cfg: Mapping[str, Any] | None = None) -> WeightsRequest:
    return WeightsRequest("dino", name, None, cfg if cfg is not None else dino_source(name))


def download_weights(folder: str | Path, requests: Iterable[WeightsRequest], log=print) -> list[WeightsEntry]:
    """Fetch every request (into the libraries' caches) and copy it into `folder`, recorded in the
    manifest (entries of other models kept, the same model replaced)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = {e.key: e for e in (read_manifest(folder) if (folder / MANIFEST).is_file() else [])}
    written = []
    for request in requests:
        fetched, source = (fetch_clip if request.kind == "clip" else fetch_dino)(request.cfg)
        parts = [request.kind, request.name] + ([request.tag] if request.tag is not None else [])
        relative = Path(*parts) / os.path.basename(fetched)  # the snapshot's name: a hub blob is named by its hash
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.realpath(fetched), target)
        entry = WeightsEntry(request.kind, request.name, request.tag, relative.as_posix(), file_sha256(target),
                             target.stat().st_size, source)
        entries[entry.key] = entry
        written.append(entry)
        _write_manifest(folder, entries.values())  # after each file: an interrupted download keeps the others
        log(f"{entry.kind} {entry.name}{':' + entry.tag if entry.tag else ''}: {relative} "
            f"({entry.size / 2**20:.1f} MiB, sha256 {entry.sha256[:12]}) from {source}")
    return written


def _write_manifest(folder: Path, entries: Iterable[WeightsEntry]) -> None:
    manifest = {"format": MANIFEST_FORMAT, "models": [asdict(e) for e in entries]}
    partial = folder / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, folder / MANIFEST)

