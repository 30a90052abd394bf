"""Materialize the demo asset graph onto a given Dagster instance, for the deployment tests.

Used by tests/test_postgres.py (an instance on a real PostgreSQL server) and
tests/test_browser.py (the instance the webserver then shows). Uses the project's one
`Definitions` (nola_assets.definitions) with the tiny model profile and few epochs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DEMO_PARTITION = "fashion_mini"


def apt_install(*packages: str) -> str | None:
    """`apt-get install -y PACKAGES` (one `apt-get update` and a second try if the first fails).
    Returns None when it worked, else why not: not root, no apt-get, or apt's own error."""
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return f"not root, so `apt-get install {' '.join(packages)}` is not possible"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:  # stale or missing package lists: update once, try again
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        return f"apt-get install {' '.join(packages)} failed: {(result.stderr or result.stdout)[-400:]}"
    return None


@dataclass(frozen=True)
class DemoOutcome:
    success: bool
    run_id: str
    asset_names: tuple[str, ...]
    # metadata keys each named asset's latest materialization must carry
    metadata_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)


# Tiny random models, few epochs, CPU: the whole graph in well under a minute on 2 cores.
DEMO_ENV = {
    "NOLA_MODEL_PROFILE": "tiny",
    "NOLA_DEVICE": "cpu",
    "NOLA_NUM_WORKERS": "0",
    "NOLA_ALIGNMENT_EPOCHS": "3",
    "NOLA_TUNING_EPOCHS": "1",
    "NOLA_DESCRIPTIONS": "dataset",
    "HF_HUB_OFFLINE": "1",
}


def demo_environment(workdir: Path) -> dict[str, str]:
    """The NOLA_* variables for a demo run whose data root and artifacts live under `workdir`;
    copies the bundled demo dataset there (package data is read-only)."""
    from nola_core.demo import demo_dataset_path

    data_root = workdir / "data"
    if not (data_root / DEMO_PARTITION).exists():
        shutil.copytree(demo_dataset_path(), data_root / DEMO_PARTITION)
    return {**DEMO_ENV, "NOLA_DATA_ROOT": str(data_root), "NOLA_ARTIFACT_ROOT": str(workdir / "artifacts")}


def materialize_demo(instance, workdir: Path) -> DemoOutcome:
    """The project's own job over every asset, for the demo partition, in this process.
    The caller sets `demo_environment(workdir)` in os.environ first (resources read it)."""
    from nola_assets.definitions import defs

    job = defs.resolve_job_def("nola_job")
    instance.add_dynamic_partitions("datasets", [DEMO_PARTITION])
    result = job.execute_in_process(instance=instance, partition_key=DEMO_PARTITION,
                                    raise_on_error=True)
    names = tuple(sorted(key.to_user_string() for key in defs.resolve_asset_graph().materializable_asset_keys))
    return DemoOutcome(
        success=result.success,
        run_id=result.run_id,
        asset_names=names,
        # every asset that stores an artifact; the preflight stores none (it only checks)
        metadata_keys={name: ("seconds", "artifact") for name in names if name != "preflight"},
    )
