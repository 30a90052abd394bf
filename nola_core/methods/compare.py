"""Every method on one dataset folder, computed the same way, and one evaluation table.

The shared inputs are computed once (the dataset manifests, the class descriptions, the CLIP
and DINO feature tables, the zero-shot and CDE classifiers) and handed to each recipe, as the
Dagster graph hands its shared upstream assets to the method assets. Labels are read only by
`EvaluationLabels.from_manifests`, after every method has finished, for the evaluation table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import polars as pl

from nola_core.data.loading import evaluation_records, image_features, load_dataset, training_ids
from nola_core.features import FeatureConfig
from nola_core.methods.cde import CDEConfig, cde_weights, run_cde
from nola_core.methods.common import MethodRun
from nola_core.methods.evaluation import EvaluationLabels, evaluate_runs
from nola_core.methods.lafter import LaFTerConfig, lafter_config_for, lafter_text_set, run_lafter
from nola_core.methods.latteclip import (
    LatteCLIPConfig,
    LatteTexts,
    generate_latteclip_texts,
    latteclip_config_for,
    latteclip_zero_shot,
    run_latteclip,
)
from nola_core.methods.nola import NolaConfig, nola_config_with_seed, run_nola_method
from nola_core.methods.zero_shot import ZeroShotConfig, run_zero_shot, zero_shot_weights
from nola_core.models import ModelConfig, load_clip, load_dino
from nola_core.runtime import resolve_device
from nola_core.text.dataset import resolve_descriptions

logger = logging.getLogger(__name__)

METHOD_NAMES = ("zero-shot", "cde", "lafter", "latteclip", "nola")


@dataclass(frozen=True)
class ComparisonConfig:
    """Which methods, which seeds, and each recipe's config (each defaults to its paper's).

    `models`, `features` and `device` are shared by every method (NolaConfig's own are ignored).
    Zero-shot and CDE are deterministic and run once, with a null seed.
    """

    methods: tuple[str, ...] = METHOD_NAMES
    seeds: tuple[int, ...] = (0,)
    models: ModelConfig = field(default_factory=ModelConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    cde: CDEConfig = field(default_factory=CDEConfig)
    lafter: LaFTerConfig | None = None  # None: the reference's, with its per-dataset settings
    latteclip: LatteCLIPConfig | None = None  # None: the paper's, with its per-dataset lr
    nola: NolaConfig = field(default_factory=NolaConfig)
    device: str = "auto"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHOD_NAMES))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHOD_NAMES)}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")


@dataclass
class Comparison:
    dataset: str
    runs: list[MethodRun]
    evaluation: pl.DataFrame  # EVALUATION_SCHEMA, one row per method × stage × seed


def compare_methods(
    dataset_dir: str | Path,
    config: ComparisonConfig = ComparisonConfig(),
    descriptions: Mapping[str, Sequence[str]] | None = None,
    latte_texts: LatteTexts | None = None,
    lmm=None,
    lmm_cache_dir: str | Path | None = None,
) -> Comparison:
    """Run `config.methods` over `config.seeds` on one dataset folder and evaluate them all.

    `descriptions`: class → LLM descriptions (default: the dataset's descriptions file).
    `latte_texts`: LatteCLIP's LMM image/group texts; or `lmm`, a `nola_core.llm` chat provider
    that sees images, to write them here (`generate_latteclip_texts`, cached in
    `lmm_cache_dir`). With neither, LatteCLIP runs on class descriptions only, and says so.
    """
    device = resolve_device(config.device)
    spec, manifest, labeled = load_dataset(dataset_dir)
    texts = resolve_descriptions(spec, descriptions)
    clip = load_clip(config.models, device)
    records = evaluation_records(manifest, labeled)
    clip_table = image_features(clip, spec.root, records, config.features, device)
    tables = [clip_table]
    dino = dino_table = None
    if "nola" in config.methods:
        dino = load_dino(config.models, device)
        dino_table = image_features(dino, spec.root, records, config.features, device)
        tables.append(dino_table)
    train_ids = training_ids(manifest, *tables)
    if not train_ids:
        raise RuntimeError(f"{spec.unlabeled_dir}: no image could be read at feature extraction")
    by_id = {r.image_id: r for r in manifest.records}
    train_records = [by_id[i] for i in train_ids]

    zero_shot = zero_shot_weights(clip, spec.classes, config.zero_shot.templates or spec.templates, device)
    cde = cde_weights(clip, spec.classes, config.cde.templates or spec.templates, texts, device)
    runs: list[MethodRun] = []
    if "zero-shot" in config.methods:
        runs.append(run_zero_shot(clip_table, zero_shot, train_ids, config.zero_shot))
    if "cde" in config.methods:
        runs.append(run_cde(clip_table, cde, train_ids, config.cde))
    text_set = None
    latte = config.latteclip or latteclip_config_for(spec.name)
    lafter = config.lafter or lafter_config_for(spec.name)
    if "latteclip" in config.methods and latte_texts is None and lmm is not None:
        _, _, zs_labels = latteclip_zero_shot(clip, spec.classes, clip_table, train_ids, latte, device)
        latte_texts = generate_latteclip_texts(lmm, spec.root, train_records, zs_labels.labels, domain=spec.domain,
                                               group_size=latte.group_size, seed=latte.seed, cache_dir=lmm_cache_dir)
    if "latteclip" in config.methods and latte_texts is None:
        logger.warning("%s: no LMM texts for LatteCLIP; it runs on class descriptions only (the paper's "
                       "T_class-only ablation). Pass latte_texts from generate_latteclip_texts.", spec.name)
    for seed in config.seeds:
        if "lafter" in config.methods:
            if text_set is None:
                text_set = lafter_text_set(clip, spec.classes, lafter.templates or spec.templates, texts, device)
            runs.append(run_lafter(clip, text_set, len(spec.classes), spec.root, train_records, records, clip_table,
                                   lafter.with_seed(seed), config.features, device))
        if "latteclip" in config.methods:
            runs.append(run_latteclip(clip, spec.classes, spec.root, train_records, records, clip_table,
                                      latte_texts or LatteTexts(), latte.with_seed(seed), config.features, device))
        if "nola" in config.methods:
            runs.append(run_nola_method(clip, dino, spec.root, train_records, records, clip_table, dino_table,
                                        zero_shot, cde, nola_config_with_seed(config.nola, seed), config.features,
                                        device))
    # Labels enter here, after training, for reporting only.
    evaluation = evaluate_runs(
        runs, dataset=spec.name, classes=spec.classes, unlabeled_ids=train_ids,
        labels=EvaluationLabels.from_manifests(manifest, labeled),
        random_models=config.models.clip_is_random or ("nola" in config.methods and config.models.dino_is_random),
    )
    return Comparison(spec.name, runs, evaluation)
