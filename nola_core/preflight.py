"""Checks made before any work starts, so a run that cannot finish fails in seconds with one
short message (what, why, the fix) instead of a traceback an hour in.

What is checked, in this order, without loading any model or reading any image:

- the dataset: `dataset.yaml` is valid and `unlabeled/` holds image files (counted by name);
- every model of the configuration can be loaded: a checkpoint path exists, or the weights
  folder (`weights_dir`, which the edges set from NOLA_WEIGHTS_DIR; written by `nola weights
  download`) lists it and holds its file at the recorded size (the loader checks the SHA-256),
  or the pretrained weights are in the local caches open_clip and timm read (the Hugging Face
  hub cache, `~/.cache/clip`, torch hub's `checkpoints/`), or the network can fetch them (never
  when `HF_HUB_OFFLINE` is set); random models need nothing;
- the LLM provider's API key, when descriptions are to be written by a named provider;
- free disk under the artifact root for the feature tables: images x feature dims x 2 bytes
  (float16) per table, times `REWRITE_FACTOR` (a table is written beside the old one, then
  renamed).

Every check returns `Problem`s; `preflight` gathers them and `PreflightError` carries them. The
environment variables they read (HF_HUB_OFFLINE, the API keys) come in `Environment.environ`, which
the caller (an edge: the CLI, the preflight asset) passes in.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence
from urllib.parse import urlparse

from nola_core.data.images import is_image_path
from nola_core.data.spec import DatasetSpec, DatasetSpecError, load_dataset_spec
from nola_core.models.config import ModelConfig
from nola_core.models.weights import (
    WEIGHTS_DIR_ENV,
    WeightsUnavailableError,
    download_command,
    find_entry,
    resolve_weights_dir,
)

HF_HOST = "huggingface.co"
NETWORK_TIMEOUT_S = 3.0
"""How long the reachability probe of a model's weights hosts may take before the network counts as absent."""
FEATURE_BYTES = 2  # float16 feature tables (nola_core.features)
REWRITE_FACTOR = 2  # a table is rewritten beside the old one before the rename
OFFLINE_VALUES = ("1", "true", "yes", "on")
KEY_OF_PROVIDER = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}


@dataclass(frozen=True)
class Problem:
    what: str  # the thing that is missing or wrong
    why: str
    fix: str  # the exact command or variable that fixes it

    def message(self) -> str:
        return f"{self.what}: {self.why}.\n  fix: {self.fix}"


class PreflightError(RuntimeError):
    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(problem.message() for problem in self.problems))


@dataclass(frozen=True)
class Environment:
    """What the checks read from the machine; tests replace any part of it."""

    environ: Mapping[str, str]
    reachable: Callable[[Sequence[str]], bool]  # hosts -> can a TCP connection to one of them on 443 be opened
    free_bytes: Callable[[Path], int]

    @classmethod
    def current(cls, environ: Mapping[str, str]) -> "Environment":
        """This machine with the caller's environment variables; each host set is probed once per
        Environment."""
        seen: dict[frozenset, bool] = {}

        def reachable(hosts: Sequence[str]) -> bool:
            key = frozenset(hosts)
            if key not in seen:
                seen[key] = any_host_reachable(hosts)
            return seen[key]

        return cls(environ=environ, reachable=reachable, free_bytes=free_bytes_at)

    @property
    def offline(self) -> bool:
        return self.environ.get("HF_HUB_OFFLINE", "").strip().lower() in OFFLINE_VALUES


def any_host_reachable(hosts: Sequence[str], timeout_s: float = NETWORK_TIMEOUT_S, port: int = 443) -> bool:
    """Whether one of `hosts` accepts a TCP connection on `port` within `timeout_s` in all, DNS
    included: every host is probed at once, in threads, since name resolution ignores socket
    timeouts and can hang on an air-gapped machine."""
    found = threading.Event()

    def probe(host: str) -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            found.set()
        except OSError:
            pass

    threads = [threading.Thread(target=probe, args=(host,), daemon=True) for host in hosts]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if found.is_set():
            break
    return found.is_set()


def free_bytes_at(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def image_count(spec: DatasetSpec) -> int:
    """Image files (by name) under unlabeled/ and labeled/: what the feature tables will hold at most."""
    count = 0
    for folder in (spec.unlabeled_dir, spec.labeled_dir):
        for _, _, files in os.walk(folder, followlinks=True):
            count += sum(1 for name in files if not name.startswith(".") and is_image_path(name))
    return count


def check_dataset(root: str | Path) -> tuple[DatasetSpec | None, list[Problem]]:
    try:
        spec = load_dataset_spec(root)
    except DatasetSpecError as error:
        return None, [Problem(f"dataset {root}", str(error),
                              "fix dataset.yaml, or make the folder a dataset with `nola init FOLDER --classes ...`")]
    if not any(is_image_path(name) for _, _, files in os.walk(spec.unlabeled_dir, followlinks=True) for name in files):
        return spec, [Problem(f"dataset {spec.name}", f"no image file under {spec.unlabeled_dir}",
                              f"put the images to adapt on under {spec.unlabeled_dir}")]
    return spec, []


def check_models(config: ModelConfig, env: Environment) -> list[Problem]:
    """A problem per model whose weights are neither a file given, nor cached, nor downloadable."""
    return [p for p in (_check_clip(config, env), _check_dino(config, env)) if p is not None]


def _check_clip(config: ModelConfig, env: Environment) -> Problem | None:
    from open_clip import pretrained

    from nola_core.models.registry import register_tiny_clip_configs

    what = f"CLIP {config.clip_name}"
    fix = _download_fix(download_command("clip", config.clip_name, config.clip_pretrained), "NOLA_CLIP_CHECKPOINT")
    if config.clip_checkpoint is not None:
        return _missing_file(what, config.clip_checkpoint, "NOLA_CLIP_CHECKPOINT")
    if config.clip_pretrained is None:
        return None  # random weights
    if Path(config.clip_pretrained).is_file():
        return None  # open_clip takes a file as `pretrained`
    found, problem = _in_weights_dir(config, env, "clip", config.clip_name, config.clip_pretrained, what)
    if found:
        return problem
    register_tiny_clip_configs()
    cfg = pretrained.get_pretrained_cfg(config.clip_name, config.clip_pretrained)
    if not cfg:
        tags = pretrained.list_pretrained_tags_by_model(config.clip_name)
        return Problem(f"{what} / {config.clip_pretrained}", "open_clip knows no such pretrained tag",
                       f"set NOLA_CLIP_PRETRAINED to one of {', '.join(tags) or '(none: use NOLA_CLIP_CHECKPOINT)'}")
    candidates = []
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or pretrained.HF_WEIGHTS_NAME
        candidates += [(repo, name) for name in (*pretrained._get_safe_alternatives(filename), filename)]
    local = [os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))] if cfg.get("url") else []
    hosts = ([HF_HOST] if cfg.get("hf_hub") else []) + ([urlparse(cfg["url"]).hostname] if cfg.get("url") else [])
    return _cached_or_downloadable(f"{what} / {config.clip_pretrained}", candidates, local, hosts, env, fix)


def _check_dino(config: ModelConfig, env: Environment) -> Problem | None:
    import timm
    import torch.hub

    from nola_core.models.registry import DINO_CONFIGS, TimmModelSpec

    what = f"DINO {config.dino_name}"
    fix = _download_fix(download_command("dino", config.dino_name, None), "NOLA_DINO_CHECKPOINT")
    if config.dino_checkpoint is not None:
        return _missing_file(what, config.dino_checkpoint, "NOLA_DINO_CHECKPOINT")
    if not config.dino_pretrained:
        return None
    found, problem = _in_weights_dir(config, env, "dino", config.dino_name, None, what)
    if found:
        return problem
    timm_name = DINO_CONFIGS.get(config.dino_name, TimmModelSpec(timm_name=config.dino_name)).timm_name
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        return Problem(what, f"timm has no pretrained weights named {timm_name!r}",
                       "set NOLA_DINO_MODEL to a timm name with a tag (e.g. vit_base_patch16_224.dino) or "
                       "NOLA_DINO_CHECKPOINT to a weights file")
    candidates = []
    if cfg.hf_hub_id:
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
        candidates = [(cfg.hf_hub_id, name) for name in names]
    local = [os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url))] if cfg.url else []
    hosts = ([HF_HOST] if cfg.hf_hub_id else []) + ([urlparse(cfg.url).hostname] if cfg.url else [])
    return _cached_or_downloadable(what, candidates, local, hosts, env, fix)


def _download_fix(command: str, checkpoint_variable: str) -> str:
    return (f"on a connected machine run `{command} --to DIR`, bring DIR here and set {WEIGHTS_DIR_ENV}=DIR "
            f"(or {checkpoint_variable}=/path/to/the/file; `--profile mini` or `tiny` need none)")


def _in_weights_dir(config: ModelConfig, env: Environment, kind: str, name: str, tag: str | None,
                    what: str) -> tuple[bool, Problem | None]:
    """(whether the weights folder settles this model, its problem): a folder without a manifest
    or with a listed file missing or of another size is a problem; a model it does not list is
    left to the caches and the network."""
    folder = resolve_weights_dir(config.weights_dir)
    if folder is None:
        return False, None
    fix = f"run `{download_command(kind, name, tag)} --to {folder}` again on a connected machine"
    try:
        entry = find_entry(folder, kind, name, tag)
    except WeightsUnavailableError as error:
        return True, Problem(f"weights folder {folder}", str(error).split(";")[0], f"{fix}, or unset {WEIGHTS_DIR_ENV}")
    if entry is None:
        return False, None
    path = folder / entry.file
    if not path.is_file() or path.stat().st_size != entry.size:
        return True, Problem(what, f"{path} is missing or not the size its manifest records ({entry.size} bytes)", fix)
    return True, None


def _missing_file(what: str, path: str, variable: str) -> Problem | None:
    if Path(path).is_file() and os.access(path, os.R_OK):
        return None
    return Problem(what, f"weights file {path} does not exist or cannot be read",
                   f"set {variable} to the path of a readable weights file")


def _cached_or_downloadable(what: str, hub_files: list[tuple[str, str]], local_files: list[str],
                            hosts: list[str], env: Environment, fix: str) -> Problem | None:
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(repo, name), str) for repo, name in hub_files):
        return None
    if any(os.path.isfile(path) for path in local_files):
        return None
    if env.offline:
        return Problem(what, "weights not in the local caches, and HF_HUB_OFFLINE is set", fix)
    hosts = [host for host in hosts if host]
    if env.reachable(hosts):
        return None
    return Problem(what, f"weights not in the local caches, and {', '.join(hosts)} cannot be reached (no network?)",
                   fix)


def check_descriptions(source: str, spec: DatasetSpec, env: Environment) -> list[Problem]:
    """The key of a provider named explicitly (`auto` falls back to templates without one; a
    `dataset` source reads the dataset's own file or templates)."""
    variable = KEY_OF_PROVIDER.get(source)
    if variable is None or env.environ.get(variable, "").strip():
        return []
    return [Problem(f"descriptions for {spec.name} from {source}", f"{variable} is not set",
                    f"export {variable}=... (or NOLA_DESCRIPTIONS=dataset to use the dataset's descriptions "
                    "file or the templates)")]


def feature_dims(config: ModelConfig) -> tuple[int, int]:
    """(CLIP embedding dim, DINO feature dim), read from the architectures without building weights."""
    import open_clip
    import timm
    import torch

    from nola_core.models.registry import DINO_CONFIGS, TimmModelSpec, register_tiny_clip_configs

    register_tiny_clip_configs()
    clip_dim = int(open_clip.get_model_config(config.clip_name)["embed_dim"])
    spec = DINO_CONFIGS.get(config.dino_name, TimmModelSpec(timm_name=config.dino_name))
    with torch.device("meta"):
        dino_dim = int(timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.overrides).num_features)
    return clip_dim, dino_dim


def feature_table_bytes(images: int, table_dims: Sequence[int]) -> int:
    """Disk the feature tables of `images` images need, one table per entry of `table_dims`."""
    return images * sum(table_dims) * FEATURE_BYTES * REWRITE_FACTOR


def check_disk(artifact_root: str | Path, needed: int, env: Environment) -> list[Problem]:
    free = env.free_bytes(Path(artifact_root))
    if free >= needed:
        return []
    return [Problem(f"disk under {artifact_root}", f"{_size(free)} free, the feature tables need about {_size(needed)}",
                    "free some space, or set NOLA_ARTIFACT_ROOT to a folder on a larger disk")]


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024:
            return f"{count:.0f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"


def preflight(
    dataset_dirs: Sequence[str | Path],
    models: ModelConfig,
    artifact_root: str | Path,
    descriptions_source: str = "dataset",
    clip_tables: int = 1,
    *,
    env: Environment,
) -> list[Problem]:
    """Every problem that would stop a run on these datasets (empty: go). `clip_tables` is how
    many CLIP-dimension feature tables a dataset gets (the image features, plus one per tuned
    encoder whose features are stored); DINO has one."""
    problems: list[Problem] = []
    specs = []
    for root in dataset_dirs:
        spec, found = check_dataset(root)
        problems += found
        if spec is not None:
            specs.append(spec)
            problems += check_descriptions(descriptions_source, spec, env)
    problems += check_models(models, env)
    if specs and not problems:
        clip_dim, dino_dim = feature_dims(models)
        images = sum(image_count(spec) for spec in specs)
        problems += check_disk(artifact_root, feature_table_bytes(images, [clip_dim] * clip_tables + [dino_dim]), env)
    return problems
