"""The `nola` commands that run the Dagster asset graph: run, demo, dev.

nola_core.cli is the `nola` command; where Dagster is installed (`pip install 'nola[dagster]'`)
it calls `add_commands` here. Dagster itself is imported inside the handlers, so listing the
commands stays cheap.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEMO_TUNING_EPOCHS = 10
"""`nola demo` tunes for 10 epochs unless told otherwise (--tuning-epochs, NOLA_TUNING_EPOCHS)."""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    _add_demo(subparsers)
    _add_run(subparsers)
    _add_dev(subparsers)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="materialize every asset for the bundled mini-world demo domain (trained mini models, about "
        "two minutes on CPU)",
        description="Copy the bundled fashion_blurred_small dataset (a shifted Fashion-MNIST domain of the mini "
        "world, docs/mini_world.md) under the data root (once), register it as a partition and materialize every "
        "asset on the local Dagster instance ($DAGSTER_HOME, default .dagster_home/) with the `mini` profile: a "
        "CLIP and a DINO trained by this project. Prints the per-stage table and where the artifacts are; "
        "`nola dev` then shows the run.",
    )
    _add_run_options(p, default_profile="mini")
    p.set_defaults(handler=_demo)


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="materialize every asset for dataset folders, registering each as a partition",
        description="For each folder (dataset.yaml, unlabeled/, optional labeled/): link it (or copy it, "
        "--copy) to <data root>/<name>, add the partition, and materialize every asset on the local "
        "Dagster instance, one run per dataset. A folder already under the data root is used in place.",
    )
    p.add_argument("paths", nargs="+", type=Path, help="dataset folders")
    p.add_argument("--copy", action="store_true", help="copy the folder under the data root instead of linking it")
    _add_run_options(p, default_profile=None)
    p.set_defaults(handler=_run)


def _add_dev(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dev",
        help="start `dagster dev` on the Dagster home `nola demo` and `nola run` use",
        description="Sets DAGSTER_HOME (default .dagster_home/) and runs `dagster dev -w workspace.yaml` "
        "(or `-m nola_assets.definitions` outside the project folder). Arguments after `--` go to dagster dev.",
    )
    p.add_argument("-p", "--port", type=int, help="webserver port (dagster dev's default: 3000)")
    p.add_argument("--profile", choices=("paper", "tiny", "mini"),
                   help="NOLA_MODEL_PROFILE for every run started from the UI, the sensor or the schedule")
    p.add_argument("dagster_args", nargs=argparse.REMAINDER, help="after --, passed to dagster dev")
    p.set_defaults(handler=_dev)


def _add_run_options(p: argparse.ArgumentParser, default_profile: str | None) -> None:
    p.add_argument("--profile", choices=("paper", "tiny", "mini"), default=default_profile,
                   help=f"model profile (default: {default_profile or 'NOLA_MODEL_PROFILE, else paper'})")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: NOLA_DEVICE, else auto)")
    p.add_argument("--tuning-epochs", type=int, help="prompt-tuning epochs (default: NOLA_TUNING_EPOCHS, else "
                   + (f"{DEMO_TUNING_EPOCHS} for the demo, " if default_profile == "mini" else "") + "50)")
    p.add_argument("--alignment-epochs", type=int, help="DL-network epochs (default: NOLA_ALIGNMENT_EPOCHS, else 50)")
    p.add_argument("--weights-dir", help="a `nola weights download` folder, read before any download "
                   "(default: NOLA_WEIGHTS_DIR)")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")


def _demo(args: argparse.Namespace) -> int:
    import shutil

    from nola_core.demo import MINI_DEMO_DATASET, MINI_WORLD_NOTE, bundled_dataset_path

    from nola_assets.resources import DatasetsResource

    if not _local_data_root("demo"):
        return 1
    target = DatasetsResource().root() / MINI_DEMO_DATASET
    if not target.exists():
        shutil.copytree(bundled_dataset_path(MINI_DEMO_DATASET), target)
        print(f"copied the demo dataset to {target}")
    status = _materialize([target], args, copy=False, launched_by="nola demo", demo=True)
    if args.profile == "mini":
        print(MINI_WORLD_NOTE)
    return status


def _run(args: argparse.Namespace) -> int:
    if not _local_data_root("run"):
        return 1
    return _materialize(args.paths, args, copy=args.copy, launched_by="nola run", demo=False)


def _local_data_root(command: str) -> bool:
    """False, with the reason printed, when the data root is a URL: `nola run` / `nola demo` link or
    copy dataset folders under a local data root and would leave the store without the dataset."""
    from nola_core.storage import is_remote

    from nola_assets.resources import DatasetsResource, env_name

    location = DatasetsResource().setting("data_root", "")
    if not is_remote(location):
        return True
    print(f"nola {command}: error: {env_name('data_root')}={location} is a URL; `nola {command}` links or copies "
          "dataset folders under a local data root only. Upload the dataset folder to "
          f"{location.rstrip('/')}/<dataset name>/ (the sensor registers it and requests its run), or unset "
          f"{env_name('data_root')} (the artifact root, {env_name('artifact_root')}, may stay a URL). Nothing was started.",
          file=sys.stderr)
    return False


def _resources_config(args: argparse.Namespace, demo: bool) -> dict[str, dict]:
    """Resource fields this command sets for its runs; everything else comes from NOLA_* or defaults."""
    from nola_assets.resources import env_name

    tuning_epochs = args.tuning_epochs
    if tuning_epochs is None and demo and env_name("tuning_epochs") not in os.environ:
        tuning_epochs = DEMO_TUNING_EPOCHS
    method = {"tuning_epochs": tuning_epochs, "alignment_epochs": args.alignment_epochs}
    models = {"model_profile": args.profile, "weights_dir": args.weights_dir}
    return {
        "models": {field: value for field, value in models.items() if value is not None},
        "compute": {"device": args.device} if args.device else {},
        "method": {field: value for field, value in method.items() if value is not None},
    }


def _preflight(paths: list[Path], args: argparse.Namespace, demo: bool) -> bool:
    """nola_core.preflight on what this command would run, before any Dagster run: its problems
    printed as a few lines (a traceback only with --verbose). True: go."""
    from nola_core.preflight import Environment, preflight

    from nola_assets.artifacts import ArtifactStore
    from nola_assets.preflight_asset import CLIP_FEATURE_TABLES
    from nola_assets.resources import DescriptionsResource, ModelsResource

    try:
        models = ModelsResource(**_resources_config(args, demo)["models"]).config()
        problems = preflight(paths, models, ArtifactStore().root(), DescriptionsResource().source(),
                             clip_tables=CLIP_FEATURE_TABLES, env=Environment.current(os.environ))
    except Exception as error:  # noqa: BLE001  (the check itself failed: say so in one line)
        if args.verbose:
            raise
        print(f"nola: error: the preflight check failed: {type(error).__name__}: {error} (--verbose: traceback)",
              file=sys.stderr)
        return False
    for problem in problems:
        print(f"nola: error: {problem.message()}", file=sys.stderr)
    if problems:
        print("nola: nothing was started.", file=sys.stderr)
    return not problems


def _materialize(paths: list[Path], args: argparse.Namespace, copy: bool, launched_by: str, demo: bool) -> int:
    """Check, register each dataset, run the whole graph for it, print the stage table and the artifacts."""
    if not _preflight(paths, args, demo):
        return 1
    from dagster import AssetKey

    from nola_core.data import DatasetSpecError
    from nola_core.eval import RANDOM_MODEL_NOTE, format_stage_table, split_counts
    from nola_core.progress import terminal_progress

    from nola_assets.artifacts import ArtifactStore
    from nola_assets.common import PREDICTIONS_FILE
    from nola_assets.local import evaluation_of, local_instance, materialize_dataset, register_dataset
    from nola_assets.resources import DatasetsResource

    instance, store = local_instance(), ArtifactStore()
    config = _resources_config(args, demo)
    for path in paths:
        try:
            name = register_dataset(instance, path, DatasetsResource().root(), copy=copy)
        except (DatasetSpecError, FileExistsError) as error:
            print(f"nola: error: {error}", file=sys.stderr)
            return 1
        started = time.perf_counter()
        with terminal_progress():  # bars for extraction and epochs, only when stdout is a terminal
            result = materialize_dataset(instance, name, config, {"nola/launched_by": launched_by})
        evaluation = evaluation_of(result, store)
        predictions = result.asset_value(AssetKey("predictions")).file(PREDICTIONS_FILE)
        print(f"\n{name}: every asset materialized in {time.perf_counter() - started:.1f} s (run {result.run_id})")
        print(format_stage_table(evaluation, RANDOM_MODEL_NOTE if evaluation["random_models"].any() else None))
        if not any(split_counts(evaluation).values()):
            print("(no labeled/ folder, or no image in it: accuracy cannot be reported)")
        print(f"artifacts:    {store.root() / name}")
        print(f"predictions:  {predictions}")
    dev = f"nola dev --profile {args.profile}" if args.profile else "nola dev"
    print(f"Dagster home: {instance.root_directory}; browse the runs with `{dev}` "
          f"(or DAGSTER_HOME={instance.root_directory} dagster dev)")
    return 0


def _dev(args: argparse.Namespace) -> None:
    """Replaces this process with `dagster dev`."""
    from nola_assets.local import dagster_home, local_instance
    from nola_assets.resources import env_name

    home = dagster_home()
    local_instance()  # fails runs a killed process left in progress, freeing their pool slots
    target = ["-w", "workspace.yaml"] if Path("workspace.yaml").is_file() else ["-m", "nola_assets.definitions"]
    print(f"DAGSTER_HOME={home}", file=sys.stderr)
    if args.profile is not None:
        os.environ[env_name("model_profile")] = args.profile
    port = ["-p", str(args.port)] if args.port is not None else []
    extra = args.dagster_args[1:] if args.dagster_args[:1] == ["--"] else args.dagster_args
    os.execv(sys.executable, [sys.executable, "-m", "dagster", "dev", *target, *port, *extra])
