"""The one code location: every NoLA asset, check, job, sensor and schedule, and their resources.

Resources are built with no values here: each field is read from its `NOLA_*` environment
variable when a run uses it (see nola_assets/README.md), or set per run in the Launchpad.
"""

from dagster import Definitions

from nola_assets.artifacts import ArtifactRefIOManager, ArtifactStore
from nola_assets.assets import NOLA_ASSETS
from nola_assets.common import REFS_IO_MANAGER
from nola_assets.checks import NOLA_CHECKS
from nola_assets.method_assets import METHOD_ASSETS
from nola_assets.export_assets import EXPORT_ASSETS
from nola_assets.preflight_asset import preflight
from nola_assets.resources import (
    ComputeResource,
    DatasetsResource,
    DescriptionsResource,
    MethodResource,
    ModelsResource,
)
from nola_assets.schedules import full_refresh_schedule
from nola_assets.sensors import nola_job, unlabeled_images_sensor


def nola_resources() -> dict:
    artifacts = ArtifactStore()
    return {
        "artifacts": artifacts,
        REFS_IO_MANAGER: ArtifactRefIOManager(store=artifacts),
        "compute": ComputeResource(),
        "models": ModelsResource(),
        "method": MethodResource(),
        "descriptions": DescriptionsResource(),
        "data": DatasetsResource(),
    }


defs = Definitions(
    assets=[preflight, *NOLA_ASSETS, *METHOD_ASSETS, *EXPORT_ASSETS],
    asset_checks=NOLA_CHECKS,
    jobs=[nola_job],
    sensors=[unlabeled_images_sensor],
    schedules=[full_refresh_schedule],
    resources=nola_resources(),
)
