"""Asset checks: finite artifacts (error, blocking), pseudo-labels for every class (warn), and
the tuned model not worse than zero-shot on a labelled split: the held-out split where there is
one, else the transductive one (`nola_core.eval.comparison_split`), named in the check's
metadata. That judgement also gates the export: on a run started by a sensor or a schedule,
`exported_classifier` refuses a tuned model worse than zero-shot (`export_blocked`; the check's
severity is then ERROR), unless `NOLA_EXPORT_WORSE_THAN_ZERO_SHOT=allow`.

Each check reads the artifact of the materialization it evaluates (`checked_ref`: the one this
run made, else the partition's latest before the run: `artifacts.materialized_ref`), found through the materialization's `artifact_digest`,
never through the refs/ pointer another run may have moved since. The judgement itself is a
plain function of the artifact, tested on crafted input.
"""


import math
import warnings
from pathlib import Path

import polars as pl
import torch
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetChecksDefinition,
    AssetKey,
    AssetRecordsFilter,
    AssetsDefinition,
    DagsterEventType,
    MetadataValue,
    PreviewWarning,
    asset_check,
)
from safetensors import safe_open

from nola_core.eval import comparison_split, split_column, stage_value
from nola_core.stage_names import NOLA_TUNED_STAGE, ZERO_SHOT_STAGE

from nola_assets import assets
from nola_assets.common import METHOD_EVALUATION_FILE, REPORT_FILE
from nola_assets.artifacts import ArtifactRef, ArtifactStore, materialized_ref
from nola_assets.partitions import datasets_partitions
from nola_assets.resources import EXPORT_POLICIES, MethodResource

CHECK_CHUNK_ELEMENTS = 2**24
"""Values read at once per tensor (32 MB of float16): a 2 GB feature table is checked in slices."""


FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

AUTOMATED_RUN_TAGS = ("dagster/sensor_name", "dagster/schedule_name")  # set by Dagster on runs a sensor or schedule requested


def export_blocked(run_tags: dict, policy: str) -> bool:
    """Whether this run may not export a tuned model that is worse than zero-shot: runs nobody
    watched (sensor, schedule) may not, unless the policy is `allow`; a person's run exports with a warning."""
    if policy not in EXPORT_POLICIES:
        raise ValueError(f"NOLA_EXPORT_WORSE_THAN_ZERO_SHOT={policy!r}: expected one of {EXPORT_POLICIES}")
    return policy == "block" and any(tag in run_tags for tag in AUTOMATED_RUN_TAGS)


def checked_ref(context: AssetCheckExecutionContext, artifacts: ArtifactStore, asset_name: str) -> ArtifactRef:
    """The artifact of the materialization this check evaluates: the one this run made, else (a
    check run on its own) the partition's latest before the run (`materialized_ref`)."""
    return materialized_ref(context.instance, context.run.run_id, artifacts, asset_name, context.partition_key)


def nonfinite_counts(artifact_dir: Path) -> dict[str, int]:
    """NaN/Inf count of every float tensor (safetensors) and float column (parquet) in a folder."""
    counts: dict[str, int] = {}
    for path in sorted(artifact_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_slice(name)
                if tensor.get_dtype() not in FLOAT_DTYPES:
                    continue
                shape = tensor.get_shape()
                if not shape:  # a scalar
                    counts[f"{path.name}:{name}"] = int(~torch.isfinite(handle.get_tensor(name)))
                    continue
                row = max(1, math.prod(shape[1:]))
                step = max(1, CHECK_CHUNK_ELEMENTS // row)
                counts[f"{path.name}:{name}"] = sum(int((~torch.isfinite(tensor[start : start + step])).sum())
                                                    for start in range(0, shape[0], step))
    for path in sorted(artifact_dir.glob("*.parquet")):
        frame = pl.read_parquet(path)
        for name, dtype in frame.schema.items():
            if dtype.is_float():
                counts[f"{path.name}:{name}"] = int(frame[name].is_nan().sum() + frame[name].is_infinite().sum())
    return counts


def finite_result(ref: ArtifactRef) -> AssetCheckResult:
    counts = nonfinite_counts(Path(ref.path))
    bad = {name: count for name, count in counts.items() if count}
    return AssetCheckResult(
        passed=not bad,
        severity=AssetCheckSeverity.ERROR,
        description=f"NaN/Inf values in {', '.join(bad)}" if bad else f"{len(counts)} float arrays, all finite",
        metadata={"arrays_checked": len(counts), "nonfinite": MetadataValue.json(bad)},
    )


def coverage_result(report: dict) -> AssetCheckResult:
    empty = [name for name, count in report["per_class"].items() if count == 0]
    return AssetCheckResult(
        passed=not empty,
        severity=AssetCheckSeverity.WARN,
        description=(f"no pseudo-label for {', '.join(empty)}: the DL network never sees these classes"
                     if empty else f"every class has pseudo-labels (k = {report['k']})"),
        metadata={"classes_without_pseudo_labels": MetadataValue.json(empty),
                  "short_classes": MetadataValue.json(report["short_classes"])},
    )


def tuned_vs_zero_shot_result(evaluation: pl.DataFrame, blocks_export: bool = False) -> AssetCheckResult:
    """Judge the `evaluation` asset's table (`EVALUATION_SCHEMA` rows) on `comparison_split`; a
    failure is an ERROR when it `blocks_export` of this run, else a WARN."""
    split = comparison_split(evaluation)
    random_models = bool(evaluation["random_models"].any())
    if split is None:
        return AssetCheckResult(passed=True, severity=AssetCheckSeverity.WARN,
                                description="no labelled split: nothing to compare", metadata={"split": "none"})
    tuned = stage_value(evaluation, NOLA_TUNED_STAGE, split_column(split, "top1"))
    zero_shot = stage_value(evaluation, ZERO_SHOT_STAGE, split_column(split, "top1"))
    images = stage_value(evaluation, NOLA_TUNED_STAGE, split_column(split, "n"))
    passed = tuned >= zero_shot
    return AssetCheckResult(
        passed=passed,
        severity=AssetCheckSeverity.ERROR if blocks_export and not passed else AssetCheckSeverity.WARN,
        description=f"{split} split ({images} images): tuned top-1 {100 * tuned:.1f}% vs zero-shot "
        f"{100 * zero_shot:.1f}%" + (" (random models: expected to be noise)" if random_models else "")
        + ("; this run does not export it" if blocks_export and not passed else ""),
        metadata={"split": split, "images": images, "tuned_top1": tuned, "zero_shot_top1": zero_shot,
                  "random_models": random_models, "blocks_export": blocks_export and not passed},
    )


def _check(asset_def: AssetsDefinition, name: str, description: str, blocking: bool = False):
    """`@asset_check` for a dataset-partitioned asset (partitioned checks are a Dagster preview)."""
    def decorate(function):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PreviewWarning)
            return asset_check(asset=asset_def, name=name, description=description, blocking=blocking,
                               partitions_def=datasets_partitions)(function)

    return decorate


def finite_check(asset_def: AssetsDefinition) -> AssetChecksDefinition:
    asset_name = asset_def.key.path[-1]

    @_check(asset_def, "no_nan_or_inf", "Every float tensor and table column of the artifact is finite; "
            "a failure stops the assets downstream in the same run.", blocking=True)
    def _no_nan_or_inf(context: AssetCheckExecutionContext, artifacts: ArtifactStore) -> AssetCheckResult:
        return finite_result(checked_ref(context, artifacts, asset_name))

    return _no_nan_or_inf


@_check(assets.cde_pseudo_labels, "every_class_has_pseudo_labels",
        "Each class got at least one top-k pseudo-label (a class with none is never learnt).")
def every_class_has_pseudo_labels(context: AssetCheckExecutionContext, artifacts: ArtifactStore) -> AssetCheckResult:
    ref = checked_ref(context, artifacts, "cde_pseudo_labels")
    return coverage_result(artifacts.read_json(ref, REPORT_FILE))


@_check(assets.evaluation, "tuned_not_worse_than_zero_shot",
        "On the held-out split (else the transductive one), the prompt-tuned model's top-1 accuracy is "
        "at least zero-shot CLIP's; the split is in the metadata. When not, runs started by a sensor or "
        "a schedule do not export the model (error), unless NOLA_EXPORT_WORSE_THAN_ZERO_SHOT=allow.")
def tuned_not_worse_than_zero_shot(context: AssetCheckExecutionContext, artifacts: ArtifactStore,
                                   method: MethodResource) -> AssetCheckResult:
    ref = checked_ref(context, artifacts, "evaluation")
    blocks = export_blocked(context.run.tags, method.setting("export_worse_than_zero_shot", EXPORT_POLICIES[0]))
    return tuned_vs_zero_shot_result(artifacts.read_table(ref, METHOD_EVALUATION_FILE), blocks)


FINITE_CHECKED = [
    assets.cde_classifier,
    assets.clip_features,
    assets.dino_features,
    assets.cde_pseudo_labels,
    assets.alignment_checkpoint,
    assets.prompt_tuned_encoder,
    assets.predictions,
]
NOLA_CHECKS = [finite_check(a) for a in FINITE_CHECKED] + [every_class_has_pseudo_labels, tuned_not_worse_than_zero_shot]
