"""A dataset folder as the methods read it: its manifests, the images they evaluate and train on,
and their embeddings.

`load_dataset` reads the spec and the manifests; `evaluation_records` lists the images every
stage is scored on (unlabeled first, then held-out labelled ones); `training_ids` the unlabeled
images every feature table could read; `image_features` (CLIP or DINO) and
`tuned_image_features` (a prompt-tuned encoder) embed them. Every method recipe and the Dagster
assets use these, so no method owns them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import torch

from nola_core.data.manifest import ImageRecord, Manifest, build_manifest
from nola_core.data.spec import DatasetSpec, load_dataset_spec
from nola_core.data.transforms import eval_transform
from nola_core.features import FeatureConfig, FeatureTable, extract_features
from nola_core.models import ClipModel, DinoModel, PromptTunedClassifier

logger = logging.getLogger(__name__)


def load_dataset(dataset_dir: str | Path) -> tuple[DatasetSpec, Manifest, Manifest | None]:
    """The spec, the unlabeled manifest, and the labelled one when `labeled/` exists."""
    spec = load_dataset_spec(dataset_dir)
    manifest = build_manifest(spec, "unlabeled")
    labeled = build_manifest(spec, "labeled") if spec.labeled_dir.is_dir() else None
    logger.info("%s: %d images (%d skipped), %d classes", spec.name, len(manifest), len(manifest.skipped),
                len(spec.classes))
    return spec, manifest, labeled


def evaluation_records(unlabeled: Manifest, labeled: Manifest | None) -> list[ImageRecord]:
    """Unlabeled images first, then labelled images that are not also unlabeled (held-out)."""
    records = list(unlabeled.records)
    if labeled is not None:
        seen = set(unlabeled.ids)
        records += [r for r in labeled.records if r.image_id not in seen]
    return records


def training_ids(manifest: Manifest, *tables: FeatureTable) -> list[str]:
    """Unlabeled image ids, in manifest order, that every feature table holds (readable by all)."""
    usable = set.intersection(*(set(table.ids) for table in tables))
    return [image_id for image_id in manifest.ids if image_id in usable]


def image_features(
    model: ClipModel | DinoModel,
    root: Path,
    records: Sequence[ImageRecord],
    config: FeatureConfig,
    device,
    progress: Callable[[int, int], None] | None = None,
    output: Path | None = None,
) -> FeatureTable:
    """The model's float16 image embeddings of `records`; with `output`, written there batch by
    batch and returned memory-mapped (`features.extract_features`)."""
    tower = model.visual if isinstance(model, ClipModel) else model.model  # what encode_image runs
    return extract_features(model.encode_image, root, records, eval_transform(model.preprocess), config, device,
                            progress, module=tower, output=output, decode_min_side=model.preprocess.resize_size)


def tuned_image_features(
    classifier: PromptTunedClassifier,
    clip: ClipModel,
    root: Path,
    records: Sequence[ImageRecord],
    config: FeatureConfig,
    device,
    output: Path | None = None,
) -> FeatureTable:
    """Projected image embeddings of the tuned encoder (eval view), unnormalised, float32.

    One pass serves both the tuned head (`tuned_head_probabilities`, which reads them as training
    did) and the forgetting guard (the same embeddings, normalised, scored by the untouched
    zero-shot template classifier). With `output`, rows go to that store file as
    they are computed and the table comes back memory-mapped (`features.extract_features`).
    """
    return extract_features(classifier.image_features, root, records, eval_transform(clip.preprocess),
                            config, device, dtype=torch.float32, module=classifier, output=output,
                            decode_min_side=clip.preprocess.resize_size)
