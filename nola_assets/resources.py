"""Resources: compute, models, method settings, description source, and the data root.

Every field left unset (None) is read at run time from the environment variable
`NOLA_<FIELD NAME IN CAPITALS>` (e.g. `device` ← `NOLA_DEVICE`), else it takes the default of
the matching `nola_core` config dataclass, so the defaults live in one place. A value given in
the run config (Launchpad, `nola demo`) wins over the environment. Environment variables are
read only here, when a run uses a resource, never when the code location is imported.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Optional

import torch
from dagster import ConfigurableResource
from pydantic import Field

from nola_core.alignment import AlignmentConfig
from nola_core.data import DatasetSpec, check_dataset_name, load_dataset_spec
from nola_core.features import FeatureConfig
from nola_core.llm import DEFAULT_PROMPT_SET, CleanRules
from nola_core.models import ClipModel, DinoModel, ModelConfig, load_clip, load_dino
from nola_core.methods.nola import nola_tuning_config
from nola_core.runtime import ComputeSettings, resolve_device
from nola_core.storage import DEFAULT_CACHE_DIR, is_remote, local_root, open_storage
from nola_core.tuning import TuningConfig

ENV_PREFIX = "NOLA_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class EnvSettings(ConfigurableResource):
    """Base: `setting(name, default)` = the field if set, else `NOLA_<NAME>`, else `default`."""

    def setting(self, name: str, default: Any = None) -> Any:
        value = getattr(self, name)
        if value is not None:
            return value
        raw = os.environ.get(env_name(name), "").strip()
        if not raw:
            return default
        return _parse(raw, _field_type(type(self), name), env_name(name))


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _field_type(cls: type, name: str) -> type:
    annotation = cls.model_fields[name].annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _parse(raw: str, kind: type, variable: str) -> Any:
    if kind is bool:
        if raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(f"{variable}={raw!r}: expected one of {sorted(_TRUE | _FALSE)}")
    try:
        return kind(raw)
    except ValueError as error:
        raise ValueError(f"{variable}={raw!r}: expected {kind.__name__}") from error


def env_field(name: str, help: str, default: Any = None, note: str = "") -> Any:
    """A field left unset (None) in code: its description ends with the variable it is read from,
    `NOLA_<NAME>`, and the default it takes otherwise. Pass the default from where the code takes it
    (a core config's field, a constant used by the code), never retyped, so the text cannot drift."""
    where = [f"env {env_name(name)}"] + ([f"default {default}"] if default is not None else []) + ([note] if note else [])
    return Field(default=None, description=f"{help} ({'; '.join(where)})")


_FEATURES = FeatureConfig()
_ALIGNMENT = AlignmentConfig()
_TUNING = nola_tuning_config()
DEFAULT_DEVICE = "auto"
DEFAULT_PROFILE = "paper"
DEFAULT_DESCRIPTIONS = "dataset"
DEFAULT_DESCRIPTIONS_COUNT = 10
DEFAULT_DESCRIPTIONS_CACHE = ".nola_cache/descriptions"
DEFAULT_DATA_ROOT = "data"
EXPORT_POLICIES = ("block", "allow")  # MethodResource.export_worse_than_zero_shot; the first is the default


def _overrides(resource: EnvSettings, mapping: dict[str, str]) -> dict[str, Any]:
    """Core-config field → value, for the resource fields that are set (here or in the environment)."""
    values = {core: resource.setting(field) for field, core in mapping.items()}
    return {core: value for core, value in values.items() if value is not None}


class ComputeResource(EnvSettings):
    """Where and how tensors are computed. Shared by every GPU-bound asset."""

    device: Optional[str] = env_field("device", "auto | cpu | cuda | cuda:N", DEFAULT_DEVICE)
    precision: Optional[str] = env_field(
        "precision", "auto | fp32 | bf16 | fp16", _FEATURES.compute.precision,
        "auto = bf16 on CUDA and, for feature extraction, on CPUs with native bf16; fp32 otherwise")
    batch_size: Optional[int] = env_field("batch_size", "feature-extraction batch", _FEATURES.batch_size)
    num_workers: Optional[int] = env_field("num_workers", "data-loader worker processes",
                                           _FEATURES.compute.num_workers, "on the CPU at most a quarter of the cores")
    cpu_threads: Optional[int] = env_field(
        "cpu_threads", "torch threads on the CPU for feature extraction, the DL network and tuning",
        _FEATURES.compute.cpu_threads, "unset = the CPUs this process may use, less loader workers and other ranks")
    nproc_per_node: Optional[int] = env_field(
        "nproc_per_node", "processes for feature extraction and prompt tuning (DDP), one per GPU, or gloo processes "
        "on the CPU", 1, "1 = in the run worker; per node with `nodes`")
    nodes: Optional[int] = env_field(
        "nodes", "nodes for feature extraction and prompt tuning of one dataset: N > 1 launches a Kubeflow "
        "PyTorchJob of N pods like the run pod, nproc_per_node processes each, through Dagster Pipes "
        "(nola_assets/cluster.py)", 1, "1 = this run's pod")
    node_launcher: Optional[str] = env_field(
        "node_launcher", "pytorchjob | local: local runs the PyTorchJob's pods as local processes, a stand-in for "
        "the Training Operator", "pytorchjob")

    def torch_device(self) -> torch.device:
        return resolve_device(self.setting("device", DEFAULT_DEVICE))

    def processes(self) -> int:
        """`nproc_per_node`, checked: at least 1; on CUDA one GPU per process, so at most the
        visible GPUs and no single named GPU (`cuda:N`)."""
        count = self.setting("nproc_per_node", 1)  # the default its description names
        where = f"nproc_per_node={count} (env {env_name('nproc_per_node')})"
        if count < 1:
            raise ValueError(f"{where}: must be at least 1")
        if count == 1:
            return 1
        device, named = self.torch_device(), self.setting("device", DEFAULT_DEVICE)
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"{where}: several processes need CUDA GPUs or the CPU, not {device.type}")
        if device.type == "cuda":
            gpus = torch.cuda.device_count()
            if count > gpus:
                raise ValueError(f"{where}: more processes than the {gpus} visible GPU(s); one process per GPU")
            if device.index is not None:
                raise ValueError(f"{where} with device {named!r} (env {env_name('device')}): each process takes "
                                 "its own GPU; set the device to auto or cuda")
        return count

    def node_count(self) -> int:
        """`nodes`, checked: at least 1."""
        count = self.setting("nodes", 1)
        if count < 1:
            raise ValueError(f"nodes={count} (env {env_name('nodes')}): must be at least 1")
        return count

    def rank_device(self) -> str:
        """The device of every process: `cpu` (gloo), else `auto` (NCCL, process r on GPU r)."""
        return "cpu" if self.torch_device().type == "cpu" else "auto"

    def feature_config(self) -> FeatureConfig:
        return dataclasses.replace(FeatureConfig(), **_overrides(self, {"batch_size": "batch_size"}),
                                   **self.loader_overrides())

    def compute_settings(self) -> ComputeSettings:
        """What feature extraction, prompt tuning and LatteCLIP share: workers, precision, CPU threads."""
        return ComputeSettings(**_overrides(self, {"num_workers": "num_workers", "precision": "precision",
                                                   "cpu_threads": "cpu_threads"}))

    def loader_overrides(self) -> dict[str, Any]:
        """`compute_settings` as the `compute` field of a core config."""
        return {"compute": self.compute_settings()}


class ModelsResource(EnvSettings):
    """Which CLIP and DINO: a profile (`paper`, `mini` or `tiny`) plus optional overrides."""

    model_profile: Optional[str] = env_field("model_profile", "paper | mini | tiny", DEFAULT_PROFILE)
    clip_model: Optional[str] = env_field("clip_model", "open_clip architecture, e.g. ViT-B-32")
    clip_pretrained: Optional[str] = env_field("clip_pretrained",
                                               "open_clip pretrained tag, e.g. openai, or 'none' for random weights")
    clip_checkpoint: Optional[str] = env_field("clip_checkpoint", "local CLIP weights file")
    dino_model: Optional[str] = env_field("dino_model", "timm name, e.g. vit_base_patch16_224.dino")
    dino_checkpoint: Optional[str] = env_field("dino_checkpoint", "local DINO weights file")
    init_seed: Optional[int] = env_field("init_seed", "seed of randomly initialised models")
    weights_dir: Optional[str] = env_field("weights_dir", "a `nola weights download` folder, read before any download")

    def config(self) -> ModelConfig:
        pretrained = self.setting("clip_pretrained")
        config = ModelConfig.from_profile(
            self.setting("model_profile", DEFAULT_PROFILE),
            clip_name=self.setting("clip_model"),
            clip_pretrained=pretrained,
            clip_checkpoint=self.setting("clip_checkpoint"),
            dino_name=self.setting("dino_model"),
            dino_checkpoint=self.setting("dino_checkpoint"),
            init_seed=self.setting("init_seed"),
            weights_dir=self.setting("weights_dir"),
        )
        if pretrained is not None and pretrained.lower() == "none":
            config = dataclasses.replace(config, clip_pretrained=None)
        return config

    def load_clip(self, device: torch.device | str) -> ClipModel:
        return load_clip(self.config(), device)

    def load_dino(self, device: torch.device | str) -> DinoModel:
        return load_dino(self.config(), device)


_ALIGNMENT_FIELDS = {
    "k_min": "k_min",
    "k_fraction": "k_fraction",
    "hidden_dim": "hidden_dim",
    "alignment_lr": "lr",
    "alignment_batch_size": "batch_size",
    "alignment_epochs": "epochs",
    "seed": "seed",
}
_TUNING_FIELDS = {
    "num_prompts": "num_prompts",
    "deep_prompts": "deep_prompts",
    "tuning_lr": "lr",
    "tuning_batch_size": "batch_size",
    "micro_batch_size": "micro_batch_size",
    "tuning_epochs": "epochs",
    "seed": "seed",
    "fixed_pseudo_labels": "fixed_pseudo_labels",
    "wiseft_alpha": "wiseft_alpha",
}


class MethodResource(EnvSettings):
    """NoLA's hyper-parameters; unset fields keep the reference's values (`AlignmentConfig`,
    `methods.nola.nola_tuning_config`)."""

    k_min: Optional[int] = env_field("k_min", "k = max(k_min, floor(k_fraction·N/C))", _ALIGNMENT.k_min)
    k_fraction: Optional[float] = env_field("k_fraction", "see k_min", _ALIGNMENT.k_fraction)
    hidden_dim: Optional[int] = env_field("hidden_dim", "DL network hidden width", _ALIGNMENT.hidden_dim)
    alignment_lr: Optional[float] = env_field("alignment_lr", "DL network Adam lr", _ALIGNMENT.lr)
    alignment_batch_size: Optional[int] = env_field("alignment_batch_size", "DL network batch", _ALIGNMENT.batch_size)
    alignment_epochs: Optional[int] = env_field("alignment_epochs", "DL network epochs", _ALIGNMENT.epochs)
    num_prompts: Optional[int] = env_field("num_prompts", "visual prompt tokens", _TUNING.num_prompts)
    deep_prompts: Optional[bool] = env_field("deep_prompts", "prompts in every layer", _TUNING.deep_prompts)
    tuning_lr: Optional[float] = env_field("tuning_lr", f"AdamW lr at batch {_TUNING.batch_size}", _TUNING.lr)
    tuning_batch_size: Optional[int] = env_field("tuning_batch_size", "effective batch", _TUNING.batch_size)
    micro_batch_size: Optional[int] = env_field("micro_batch_size", "images per forward/backward",
                                                _TUNING.micro_batch_size)
    tuning_epochs: Optional[int] = env_field("tuning_epochs", "prompt-tuning epochs", _TUNING.epochs)
    seed: Optional[int] = env_field("seed", "training seed of both stages", _TUNING.seed)
    wiseft_alpha: Optional[float] = env_field("wiseft_alpha", "WiSE-FT weight on the tuned tensors, unset = off",
                                              _TUNING.wiseft_alpha)
    fixed_pseudo_labels: Optional[bool] = env_field(
        "fixed_pseudo_labels", "DL-network labels computed once per image from the stored DINO features of the "
        "evaluation view, as NoLA's reference labels its deterministic view; false runs a DINO forward per random "
        "weak view", _TUNING.fixed_pseudo_labels)
    export_worse_than_zero_shot: Optional[str] = env_field(
        "export_worse_than_zero_shot", "block: a run started by a sensor or a schedule does not export a tuned model "
        "whose top-1 is below zero-shot's (check tuned_not_worse_than_zero_shot); allow: it exports it with a warning",
        EXPORT_POLICIES[0])

    def alignment_config(self) -> AlignmentConfig:
        return dataclasses.replace(AlignmentConfig(), **_overrides(self, _ALIGNMENT_FIELDS))

    def tuning_config(self, compute: ComputeResource) -> TuningConfig:
        return dataclasses.replace(nola_tuning_config(), **compute.loader_overrides(), **_overrides(self, _TUNING_FIELDS))

    def lafter_config(self, compute: ComputeResource, dataset: str):
        """LaFTer's config for `dataset` (50 prompts, its reference's text-classifier iterations and
        template set for that dataset) with the shared tuning knobs (`tuning_epochs`, `tuning_lr`,
        batch sizes, `seed`, loader settings); `num_prompts` and `deep_prompts` stay LaFTer's own;
        `fixed_pseudo_labels` is NoLA's (LaFTer has no DINO)."""
        from nola_core.methods import lafter_config_for

        base = lafter_config_for(dataset)
        shared = {k: v for k, v in _TUNING_FIELDS.items()
                  if k not in ("num_prompts", "deep_prompts", "fixed_pseudo_labels", "wiseft_alpha")}
        tuning = dataclasses.replace(base.tuning, **compute.loader_overrides(), **_overrides(self, shared))
        text = dataclasses.replace(base.text, **_overrides(self, {"seed": "seed"}))
        return dataclasses.replace(base, tuning=tuning, text=text)

    def latteclip_config(self, compute: ComputeResource, dataset: str):
        """LatteCLIP's config for `dataset` (the paper's per-dataset lr) with `tuning_epochs` as its
        epoch cap, `seed`, and the loader settings."""
        from nola_core.methods import latteclip_config_for

        config = latteclip_config_for(dataset)
        return dataclasses.replace(config, **compute.loader_overrides(),
                                   **_overrides(self, {"tuning_epochs": "max_epochs", "seed": "seed"}))


class DescriptionsResource(EnvSettings):
    """Where class descriptions come from.

    `dataset` (default): the file named by `descriptions:` in dataset.yaml, else templates only
    (exactly what `run_nola` does). Any provider of `nola_core.llm` otherwise: `auto`, `anthropic`,
    `openai`, `openai-compatible` (with base URL and model), `file` (with a path), `templates`.
    """

    descriptions: Optional[str] = env_field(
        "descriptions", "dataset | auto | anthropic | openai | openai-compatible | file | templates", DEFAULT_DESCRIPTIONS)
    descriptions_path: Optional[str] = env_field("descriptions_path",
                                                 "file for `file`, absolute or relative to the dataset folder")
    descriptions_model: Optional[str] = env_field("descriptions_model", "LLM name")
    descriptions_base_url: Optional[str] = env_field("descriptions_base_url", "OpenAI-compatible server URL")
    prompt_set: Optional[str] = env_field("prompt_set", "prompts/<name>.yaml", DEFAULT_PROMPT_SET)
    descriptions_count: Optional[int] = env_field("descriptions_count", "answers per question",
                                                  DEFAULT_DESCRIPTIONS_COUNT)
    descriptions_prefix_class: Optional[bool] = env_field(
        "descriptions_prefix_class", "prepend '<class>: ' to an LLM line that does not name its class",
        CleanRules().prefix_class_name, "files are used as written")
    descriptions_cache: Optional[str] = env_field("descriptions_cache", "per-class LLM answer cache",
                                                  DEFAULT_DESCRIPTIONS_CACHE)
    prompts_dir: Optional[str] = env_field("prompts_dir", "folder of prompt sets",
                                           note="else the checkout's or the installed prompts/")

    def source(self) -> str:
        return self.setting("descriptions", DEFAULT_DESCRIPTIONS)

    def describe(self, spec: DatasetSpec) -> tuple[dict[str, list[str]], dict[str, Any]]:
        """(class → descriptions for every class of `spec`, provenance)."""
        from nola_core.llm import describe_classes, load_description_set, make_provider
        from nola_core.text.dataset import resolve_descriptions

        source = self.source()
        if source == "dataset":
            provenance: dict[str, Any] = {"provider": "dataset", "file": None}
            if spec.descriptions is not None:
                provenance = {**load_description_set(spec.descriptions).provenance, "file": str(spec.descriptions)}
            return resolve_descriptions(spec, None), provenance
        path = self.setting("descriptions_path")
        provider = make_provider(
            source,
            model=self.setting("descriptions_model"),
            base_url=self.setting("descriptions_base_url"),
            path=spec.root / path if path is not None else None,
        )
        result = describe_classes(
            spec.classes,
            provider=provider,
            prompt_set=self.setting("prompt_set", DEFAULT_PROMPT_SET),
            domain=spec.domain,
            count=self.setting("descriptions_count", DEFAULT_DESCRIPTIONS_COUNT),
            cache_dir=self.setting("descriptions_cache", DEFAULT_DESCRIPTIONS_CACHE),
            rules=CleanRules(prefix_class_name=self.setting("descriptions_prefix_class", CleanRules().prefix_class_name)),
            prompts_dir=self.setting("prompts_dir"),
        )
        return resolve_descriptions(spec, result.descriptions), result.provenance


class DatasetsResource(EnvSettings):
    """The data root: one folder per dataset (dataset.yaml, unlabeled/, optional labeled/)."""

    data_root: Optional[str] = env_field("data_root", "folder or URL (s3://…, gs://…) of the dataset folders", f"{DEFAULT_DATA_ROOT}/",
                                         "relative to the working directory")
    sensor_quiet_seconds: Optional[float] = Field(
        default=None, description="env NOLA_SENSOR_QUIET_SECONDS; default 60: the sensor requests a run for a dataset "
        "only once its files have not changed for this long (or a .ready file is in its folder)")
    sensor_tick_budget_seconds: Optional[float] = Field(
        default=None, description="env NOLA_SENSOR_TICK_BUDGET_SECONDS; default 20: stat walking stops for this tick "
        "after this long (the next tick goes on where it stopped)")

    cache_dir: Optional[str] = env_field(
        "cache_dir", "the local copy of a data root at a URL, which the images are decoded from", DEFAULT_CACHE_DIR)

    def root(self) -> Path:
        """The local folder of the dataset folders (a URL root's copy in the cache)."""
        return local_root(self.setting("data_root", DEFAULT_DATA_ROOT), self.setting("cache_dir", DEFAULT_CACHE_DIR))

    def dataset_dir(self, name: str) -> Path:
        """`<data root>/<name>`; a name that could lead elsewhere ('..', '/') is refused. Under a URL
        root, the folder's local copy, first brought up to date (`nola_core.storage.Storage.mirror`)."""
        folder = self.root() / check_dataset_name(name)
        location = str(self.setting("data_root", DEFAULT_DATA_ROOT))
        if is_remote(location):
            open_storage(location).mirror(name, folder)
        return folder

    def spec(self, name: str) -> DatasetSpec:
        return load_dataset_spec(self.dataset_dir(name))

    def names(self) -> list[str]:
        """Folders of the data root holding a dataset.yaml, sorted; hidden folders ignored."""
        root = self.root()
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir()
                      if not p.name.startswith(".") and (p / "dataset.yaml").is_file())
