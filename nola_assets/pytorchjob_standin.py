"""A local stand-in for the Training Operator: `python -m nola_assets.pytorchjob_standin MANIFEST.json`
runs a PyTorchJob's pods as local processes.

Each replica (the Master, then the Workers) is one process running its container's command, with
the environment the operator gives that pod (v1 controller, no elastic policy): MASTER_ADDR,
MASTER_PORT, WORLD_SIZE (pods x nprocPerNode), RANK (the pod's index, Master 0), PET_NNODES,
PET_NODE_RANK and PET_NPROC_PER_NODE, plus the container's own `env` values, on top of this
process's environment (which carries the Pipes bootstrap variables). `$(VAR)` in the command is
expanded as the kubelet does; `python` is this interpreter (the image's). Each pod has its own
working directory, as a pod has its own disk (a relative NOLA_CACHE_DIR, or its default, is then
the pod's own cache): a temporary folder removed at the end, or `<NOLA_STANDIN_PODS_DIR>/<pod>`,
kept, when that variable is set. The first replica to fail ends the others, as a failed
PyTorchJob does. Used by `cluster.on_nodes` with `node_launcher="local"`, under Dagster's
`PipesSubprocessClient`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Mapping, Sequence


def replica_environments(manifest: Mapping, master_port: int) -> list[dict[str, str]]:
    """The variables the operator sets in each pod of `manifest`, Master first."""
    specs = manifest["spec"]["pytorchReplicaSpecs"]
    per_node = int(manifest["spec"].get("nprocPerNode", "1"))
    nodes = sum(spec["replicas"] for spec in specs.values())
    environments = []
    for node_rank in range(nodes):
        environments.append({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port),
                             "WORLD_SIZE": str(nodes * per_node), "RANK": str(node_rank),
                             "PET_NNODES": str(nodes), "PET_NODE_RANK": str(node_rank),
                             "PET_NPROC_PER_NODE": str(per_node), "PYTHONUNBUFFERED": "0"})
    return environments


PODS_DIR_ENV = "NOLA_STANDIN_PODS_DIR"


def pod_names(manifest: Mapping) -> list[str]:
    """The pods' names, Master first, as the operator names them: `<job>-master-0`, `<job>-worker-<i>`."""
    specs = manifest["spec"]["pytorchReplicaSpecs"]
    return [f"{manifest['metadata']['name']}-{kind.lower()}-{i}" for kind in ("Master", "Worker")
            for i in range(specs.get(kind, {}).get("replicas", 0))]


def expand(argument: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion of a command argument: defined names are replaced, `$$` is `$`."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), argument)


def main(argv: Sequence[str] | None = None) -> int:
    [path] = list(sys.argv[1:] if argv is None else argv)
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    container = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    own = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kept = os.environ.get(PODS_DIR_ENV)
    processes, disks = [], []
    for name, operator_env in zip(pod_names(manifest), replica_environments(manifest, port)):
        env = {**os.environ, **own, **operator_env}
        command = [expand(a, env) for a in container["command"]]
        command = [sys.executable if i == 0 and a == "python" else a for i, a in enumerate(command)]
        disk = os.path.join(kept, name) if kept else tempfile.mkdtemp(prefix=f"{name}-")
        os.makedirs(disk, exist_ok=True)
        disks.append(disk)
        processes.append(subprocess.Popen(command, env=env, cwd=disk))

    def stop(*_) -> None:
        for process in processes:
            if process.poll() is None:
                process.terminate()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while any(p.poll() is None for p in processes):
        if any(p.poll() not in (None, 0) for p in processes):
            stop()
        time.sleep(0.2)
    for disk in disks if not kept else []:
        shutil.rmtree(disk, ignore_errors=True)
    return next((p.returncode for p in processes if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
