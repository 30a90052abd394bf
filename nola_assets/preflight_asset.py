"""The first step of every graph run: `nola_core.preflight`, the same check `nola run` makes.

`dataset_manifest` and `class_descriptions` depend on `preflight`, so a run that cannot finish
(weights neither given, nor in a weights folder, nor cached, nor downloadable; an LLM key
missing; a disk too small) fails here, in seconds, with the short messages as the failure's
description, and no step after it starts. It holds no pool slot and loads no model. Its data
version is constant: passing it again never makes anything downstream stale.
"""

import os

from dagster import AssetExecutionContext, DataVersion, Failure, MaterializeResult, asset

from nola_core.preflight import Environment, preflight as check_before_run

from nola_assets.artifacts import ArtifactStore
from nola_assets.partitions import datasets_partitions
from nola_assets.resources import DatasetsResource, DescriptionsResource, ModelsResource

CLIP_FEATURE_TABLES = 4
"""CLIP-dimension feature tables a run stores per dataset (for the preflight's disk estimate): the
image features, and the tuned features of NoLA, LaFTer and LatteCLIP."""


@asset(partitions_def=datasets_partitions, group_name="dataset", code_version="1", kinds={"python"})
def preflight(
    context: AssetExecutionContext,
    data: DatasetsResource,
    models: ModelsResource,
    descriptions: DescriptionsResource,
    artifacts: ArtifactStore,
) -> MaterializeResult:
    """Dataset spec, every model's weights, the LLM key, free disk: checked before any work."""
    problems = check_before_run([data.dataset_dir(context.partition_key)], models.config(), artifacts.root(),
                                descriptions.source(), clip_tables=CLIP_FEATURE_TABLES,
                                env=Environment.current(os.environ))
    if problems:
        raise Failure(description="\n".join(problem.message() for problem in problems), allow_retries=False)
    return MaterializeResult(metadata={"checked": "dataset, model weights, LLM key, disk"},
                             data_version=DataVersion("passed"))
