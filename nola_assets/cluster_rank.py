"""What every process of a multi-node job runs (nola_assets.cluster):

    python -m torch.distributed.run [torchrun's options] --module nola_assets.cluster_rank JOB_FILE

It joins the group torchrun describes (`nola_core.distributed.init_distributed`), loads the stage
and its job from JOB_FILE (written by `cluster.on_nodes` into the artifact's folder) and runs
`stage(context, job, progress)`, the same call `nola_core.distributed.launch` makes on one node.
Rank 0 alone opens Dagster Pipes (one writer per message file): its progress goes to the step as
log lines while it runs, its result to a file next to JOB_FILE, announced by a custom message. The
other ranks log to their stderr (the pod's log). Imports `dagster_pipes`, never `dagster`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from dagster_pipes import open_dagster_pipes

from nola_core.distributed import init_distributed, shutdown
from nola_core.jobs import PromptTuningJob
from nola_core.progress import progress_callback

RESULT_FILE = "cluster_result.pt"  # rank 0's return value, next to the job file (cluster.on_nodes reads it)


def rank_progress(job: object, log: Callable[[str], None]) -> Callable:
    """The stage's progress callback, as the asset's own would print it, into `log`."""
    if isinstance(job, PromptTuningJob):
        epochs_done = progress_callback("prompt tuning", "epochs", log)
        return lambda stats: epochs_done(stats.epoch, job.config.epochs, loss=stats.loss,
                                         agreement=stats.agreement, entropy=stats.mean_entropy)
    return progress_callback(f"{getattr(job, 'which', 'image')} features", "images", log)


def main(argv: Sequence[str] | None = None) -> None:
    [job_file] = list(sys.argv[1:] if argv is None else argv)
    job_file = Path(job_file)
    # Our own file, written by the asset into the artifact's folder: full unpickling, as launch() does.
    payload = torch.load(job_file, weights_only=False)
    stage, job = payload["stage"], payload["job"]
    context = init_distributed(payload["device"])
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s rank {context.rank}/{context.world_size} %(name)s: %(message)s")
    logging.getLogger("nola_core").setLevel(logging.INFO)
    try:
        if not context.is_main:
            stage(context, job, None)
            return
        with open_dagster_pipes() as pipes:
            result = stage(context, job, rank_progress(job, pipes.log.info))
            result_file = job_file.with_name(RESULT_FILE)
            torch.save(result, result_file)
            pipes.report_custom_message({"result_file": str(result_file), "world_size": context.world_size})
    finally:
        shutdown(context)


if __name__ == "__main__":
    main()
