"""What every process of a multi-node job runs (nola_assets.cluster):

    python -m torch.distributed.run [torchrun's options] --module nola_assets.cluster_rank JOB_FILE

It joins the group torchrun describes (`nola_core.distributed.init_distributed`), loads the stage
and its job from JOB_FILE (written by `cluster.on_nodes` into the artifact's folder) and runs
`stage(context, job, progress)`, the same call `nola_core.distributed.launch` makes on one node.
Rank 0 alone opens Dagster Pipes (one writer per message file): its progress goes to the step as
log lines while it runs, its result to a file next to JOB_FILE, announced by a custom message. The
other ranks log to their stderr (the pod's log). Imports `dagster_pipes`, never `dagster`.

On an object-storage artifact root JOB_FILE is a URL (`s3://…/<artifact>/.cluster/<run id>/`):
every rank downloads it into its own cache (env NOLA_CACHE_DIR, default `.nola_cache/objects` under
the pod's working directory), reads and writes the job's paths under a URL root (the resume state;
the images of a URL data root, mirrored first) under its own copy of that root, rank 0 sends its
Pipes messages as S3 chunks under that prefix (dagster-pipes' S3 writer) and uploads its result
next to JOB_FILE; for features every rank uploads its shard under it (the job's `shard_store`,
set by `cluster.on_nodes`, which merges them). No folder is shared.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from dagster_pipes import open_dagster_pipes

from nola_core.distributed import init_distributed, shutdown
from nola_core.jobs import PromptTuningJob
from nola_core.progress import progress_callback
from nola_core.artifact_refs import cache_dir
from nola_core.storage import fetch_cached, is_remote, local_root, open_storage

RESULT_FILE = "cluster_result.pt"  # rank 0's return value, next to the job file (cluster.on_nodes reads it)
MESSAGE_SECONDS = 1.0  # how often rank 0 uploads, and the asset polls, Pipes message chunks on a URL root


def rebased(job: object, remote_roots: dict[str, str], cache: str) -> object:
    """`job` with each path field under the asset's local copy of a URL root (`remote_roots`: local
    copy -> URL) moved under this pod's copy in `cache`, that folder first brought up to date
    from the store (a dataset's images; nothing yet for the resume state)."""
    moved = {}
    for field in dataclasses.fields(job):
        value = getattr(job, field.name)
        for asset_root, url in remote_roots.items():
            if isinstance(value, Path) and value.is_relative_to(asset_root):
                relative = value.relative_to(asset_root)
                moved[field.name] = open_storage(url).mirror(relative.as_posix(), local_root(url, cache) / relative)
    return dataclasses.replace(job, **moved)


def rank_progress(job: object, log: Callable[[str], None]) -> Callable:
    """The stage's progress callback, as the asset's own would print it, into `log`."""
    if isinstance(job, PromptTuningJob):
        epochs_done = progress_callback("prompt tuning", "epochs", log)
        return lambda stats: epochs_done(stats.epoch, job.config.epochs, loss=stats.loss,
                                         agreement=stats.agreement, entropy=stats.mean_entropy)
    return progress_callback(f"{getattr(job, 'which', 'image')} features", "images", log)


def main(argv: Sequence[str] | None = None) -> None:
    [job_location] = list(sys.argv[1:] if argv is None else argv)
    cache = cache_dir(os.environ)  # this pod's cache of objects, read as ArtifactStore reads it
    job_file = fetch_cached(job_location, cache) if is_remote(job_location) else Path(job_location)
    # Our own file, written by the asset for this job: full unpickling, as launch() does.
    payload = torch.load(job_file, weights_only=False)
    stage, job = payload["stage"], payload["job"]
    job = rebased(job, payload["remote_roots"], cache)
    context = init_distributed(payload["device"])
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s rank {context.rank}/{context.world_size} %(name)s: %(message)s")
    logging.getLogger("nola_core").setLevel(logging.INFO)
    try:
        if not context.is_main:
            stage(context, job, None)
            return
        remote = is_remote(job_location)
        with open_dagster_pipes(message_writer=_s3_message_writer() if remote else None) as pipes:
            result = stage(context, job, rank_progress(job, pipes.log.info))
            result_file = job_file.with_name(RESULT_FILE)
            torch.save(result, result_file)
            result_location = str(result_file)
            if remote:  # next to the job's URL, where cluster.on_nodes downloads it from
                staging = open_storage(job_location.rsplit("/", 1)[0])
                staging.put(RESULT_FILE, result_file)
                result_file.unlink()
                result_location = staging.url(RESULT_FILE)
            pipes.report_custom_message({"result_file": result_location, "world_size": context.world_size})
    finally:
        shutdown(context)


def _s3_message_writer():
    import boto3
    from dagster_pipes import PipesS3MessageWriter

    return PipesS3MessageWriter(boto3.client("s3"), interval=MESSAGE_SECONDS)


if __name__ == "__main__":
    main()
