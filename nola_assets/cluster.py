"""One dataset's feature extraction or prompt tuning over several nodes: a Kubeflow Training
Operator `PyTorchJob` launched from the asset through Dagster Pipes.

With `nodes` N > 1 (ComputeResource, env NOLA_NODES) `on_nodes` does, in the asset's step:

1. writes the stage and its job (`nola_core.jobs`: a frozen, picklable job; models load in each
   rank from their configs) to a file in the artifact's folder, which every pod mounts (on an
   `s3://` root: uploads it, see below);
2. builds a `PyTorchJob` (`pytorchjob_manifest`): a Master and N-1 Workers, each pod a copy of
   the run pod's container (image, env, secrets, volumes, GPU request) running
   `python -m torch.distributed.run --module nola_assets.cluster_rank JOB_FILE`, with
   `nprocPerNode` processes per pod (`nproc_per_node`). The Training Operator gives each pod
   PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE (read by torchrun), MASTER_ADDR and MASTER_PORT
   (passed to torchrun through Kubernetes' `$(VAR)` expansion);
3. opens a Pipes session (context in the pods' environment, messages through a file next to the
   job file), creates the PyTorchJob and waits for it (`PipesPyTorchJobClient`). Rank 0 sends its
   progress as log lines while it runs and, at the end, writes its result next to the job file
   and announces it with a custom message (`nola_assets.cluster_rank`); every pod's log is copied
   into the step's compute log when the job ends, whether it succeeded or not;
4. reads rank 0's result file (the trained tensors and epoch statistics; None for features, whose
   table rank 0 merged from the ranks' shards in the artifact's folder; on an `s3://` root the
   asset merges them, below) and removes the job's files.

`node_launcher="local"` (env NOLA_NODE_LAUNCHER) runs the same manifest's replicas as local
processes with the environment the operator would give each pod (`nola_assets.pytorchjob_standin`),
launched by Dagster's `PipesSubprocessClient`: a machine without a cluster (tests, a workstation)
runs the whole path but the Kubernetes API calls.

The ranks run the stage functions of `nola_core.jobs` over `nola_core.distributed`'s plumbing,
as `launch` does on one node, so the result equals one process's up to float summation order
(tests/test_cluster.py). On a local artifact root the job's files live in the artifact's folder:
the root must be a file system every pod mounts at the same path (deploy/k8s: the
`nola-artifacts` volume). Rank 0's Pipes messages are appended to a file there that the run pod
tails; on NFS they arrive after the client's attribute-cache delay (seconds): progress lines may
lag, the result is read from its file.

On an `s3://` artifact root (ArtifactStore) no folder is shared: the job file is uploaded under the
artifact's prefix, `<dataset>/<asset>/<digest>/.cluster/<run id>/` (a hidden name, never part of
the artifact), and the pods get its URL as their argument. Each rank downloads it into its own
cache (the pods' NOLA_CACHE_DIR: the run pod's env, copied; a relative one is under the pod's
working directory) and keeps the job's artifact paths (the resume state) under its own copy of the
root; rank 0 sends its Pipes messages as chunks under that prefix (Dagster's S3 reader and writer,
dagster-aws / dagster-pipes) and uploads its result there, which the asset downloads; the prefix is
removed when the step ends. The images of a URL data root (DatasetsResource) are mirrored by each
rank into its own cache too (`cluster_rank.rebased`); a local data root must be mounted by every
pod at the same path. Feature extraction: each rank uploads its shard of the table under
`<run id>/shards/` instead of leaving it for rank 0 (`ImageFeaturesJob.shard_store`), and the
asset downloads the shards next to the table it is making and merges them as rank 0 would on a
shared folder (`gather_shards`, `nola_core.distributed.merge_shards`): the same table, written
into the artifact's local copy and uploaded with it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Mapping, Sequence

import torch
from dagster import (
    AssetExecutionContext,
    Failure,
    PipesClient,
    PipesClientCompletedInvocation,
    PipesEnvContextInjector,
    PipesFileMessageReader,
    PipesSubprocessClient,
    open_pipes_session,
)

from nola_core.distributed import merge_shards, shard_path
from nola_core.jobs import ImageFeaturesJob
from nola_core.storage import Storage, download, is_remote

from nola_assets.artifacts import ArtifactStore
from nola_assets.cluster_rank import MESSAGE_SECONDS, RESULT_FILE
from nola_assets.resources import ComputeResource, DatasetsResource

PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
PYTORCHJOB_CONTAINER = "pytorch"  # the container the operator sets the rank variables in
PYTORCHJOB_PORT_NAME, PYTORCHJOB_PORT = "pytorchjob-port", 23456  # the operator's default port name
JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # the label the operator puts on the job's pods
RANK_MODULE = "nola_assets.cluster_rank"
JOB_FILE = "cluster_job.pt"  # {"stage", "job", "device"}: what every rank loads
MESSAGES_FILE = "cluster_messages.jsonl"  # rank 0's Pipes messages
STAGING_FOLDER = ".cluster"  # on a URL root: <artifact>/.cluster/<run id>/ holds the job, result, messages
SHARDS_FOLDER = "shards"  # under it, the ranks' feature shards (ImageFeaturesJob.shard_store)
JOB_TTL_SECONDS = 86400  # the PyTorchJob (and its pods' logs) stays a day after it ends, as run Jobs do
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_CONTAINER_FIELDS = ("image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "resources", "securityContext",
                     "workingDir")
LOCAL_RUN_POD = {"spec": {"containers": [{"name": "run", "image": "local"}]}}
"""The run pod `node_launcher="local"` copies: the stand-in's processes inherit this one's environment."""
_POD_FIELDS = ("volumes", "securityContext", "serviceAccountName", "imagePullSecrets", "nodeSelector", "tolerations",
               "affinity")


def rank_command(job_file: Path | str) -> list[str]:
    """What every pod runs: torchrun (its node count, node rank and processes per node come from
    the operator's PET_* variables) around `nola_assets.cluster_rank`."""
    return ["python", "-m", "torch.distributed.run", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)",
            "--module", RANK_MODULE, str(job_file)]


def pytorchjob_manifest(name: str, namespace: str, run_pod: Mapping[str, Any], nodes: int, nproc_per_node: int,
                        command: Sequence[str], env: Mapping[str, str] | None = None,
                        labels: Mapping[str, str] | None = None) -> dict:
    """A `kubeflow.org/v1` PyTorchJob of `nodes` pods (one Master, `nodes - 1` Workers), each a copy of
    `run_pod`'s first container (a pod as the Kubernetes API returns it, camelCase) running `command`
    with `env` added, `nproc_per_node` processes per pod. Restarts are Dagster's business, as for
    run Jobs: no pod restarts, no job retries."""
    if nodes < 1 or nproc_per_node < 1:
        raise ValueError(f"nodes={nodes}, nproc_per_node={nproc_per_node}: both must be at least 1")
    source_spec = run_pod["spec"]
    source = source_spec["containers"][0]
    container = {key: copy.deepcopy(source[key]) for key in _CONTAINER_FIELDS if source.get(key) is not None}
    container.update(name=PYTORCHJOB_CONTAINER, command=list(command),
                     ports=[{"name": PYTORCHJOB_PORT_NAME, "containerPort": PYTORCHJOB_PORT}])
    added = dict(env or {})
    container["env"] = [e for e in container.get("env", []) if e["name"] not in added] + [
        {"name": key, "value": value} for key, value in added.items()]
    pod_spec = {key: copy.deepcopy(source_spec[key]) for key in _POD_FIELDS if source_spec.get(key) is not None}
    pod_spec["containers"] = [container]
    pod_labels = {"app.kubernetes.io/managed-by": "nola", **(labels or {})}

    def replicas(count: int) -> dict:
        return {"replicas": count, "restartPolicy": "Never",
                "template": {"metadata": {"labels": dict(pod_labels)}, "spec": copy.deepcopy(pod_spec)}}

    replica_specs = {"Master": replicas(1)}
    if nodes > 1:
        replica_specs["Worker"] = replicas(nodes - 1)
    return {
        "apiVersion": f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace, "labels": pod_labels},
        "spec": {
            "nprocPerNode": str(nproc_per_node),
            "pytorchReplicaSpecs": replica_specs,
            # Pods are kept (their logs are copied after the end) until the job's TTL removes them.
            "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None", "ttlSecondsAfterFinished": JOB_TTL_SECONDS},
        },
    }


def job_name(context: AssetExecutionContext) -> str:
    """A DNS-1035 name (pods and services are named `<it>-master-0`): `nola-<asset>-<run id>`."""
    asset = re.sub(r"[^a-z0-9]+", "-", context.asset_key.path[-1].lower()).strip("-")
    return f"nola-{asset[:36]}-{context.run.run_id[:8]}".strip("-")


def on_nodes(context: AssetExecutionContext, compute: ComputeResource, stage: Callable, job: Any,
             workdir: Path, artifacts: ArtifactStore | None = None, data: DatasetsResource | None = None) -> Any:
    """`stage(context, job, progress)` on `compute.node_count()` pods of `compute.processes()`
    processes each; rank 0's result. `workdir`: a folder of the artifact being made (under
    `artifacts.root()`); the job's files there (and, on a URL root, under its staging prefix in
    the store) are removed before this returns. The job's paths under a URL root's local copy
    (artifacts, `data`) are read and written by each rank under its own copy."""
    nodes, per_node = compute.node_count(), compute.processes()
    workdir.mkdir(parents=True, exist_ok=True)
    job_file, result_file = workdir / JOB_FILE, workdir / RESULT_FILE
    remote = artifacts.remote() if artifacts is not None else None
    remote_roots = {str(artifacts.root()): artifacts.location()} if remote is not None else {}
    data_location = str(data.setting("data_root") or "") if data is not None else ""
    if is_remote(data_location):
        remote_roots[str(data.root())] = data_location
    staging = staging_prefix(context, artifacts, remote, workdir) if remote is not None else None
    shards = f"{staging}/{SHARDS_FOLDER}" if staging is not None and isinstance(job, ImageFeaturesJob) else None
    if shards is not None:  # no folder shared with rank 0: the shards come back through the store
        job = dataclasses.replace(job, shard_store=remote.url(shards))
    payload = {"stage": stage, "job": job, "device": compute.rank_device(), "remote_roots": remote_roots}
    torch.save(payload, job_file)
    launcher = compute.setting("node_launcher", "pytorchjob")
    context.log.info(f"{stage.__name__}: {nodes} node(s) x {per_node} process(es), launched as a PyTorchJob "
                     f"({launcher}); rank 0 reports here, every pod's log goes to the compute log")
    if staging is None:
        job_location, reader = str(job_file), PipesFileMessageReader(str(workdir / MESSAGES_FILE))
    else:
        remote.put(f"{staging}/{JOB_FILE}", job_file)
        job_location, reader = remote.url(f"{staging}/{JOB_FILE}"), _s3_message_reader(remote, staging)
    started = time.perf_counter()
    try:
        if launcher == "local":
            manifest = pytorchjob_manifest(job_name(context), "local", LOCAL_RUN_POD, nodes, per_node,
                                           rank_command(job_location))
            manifest_file = workdir / "pytorchjob.json"
            manifest_file.write_text(json.dumps(manifest, indent=1))
            invocation = PipesSubprocessClient(context_injector=PipesEnvContextInjector(), message_reader=reader).run(
                context=context, command=[sys.executable, "-m", "nola_assets.pytorchjob_standin", str(manifest_file)])
        elif launcher == "pytorchjob":
            invocation = PipesPyTorchJobClient(message_reader=reader).run(
                context=context, nodes=nodes, nproc_per_node=per_node, command=rank_command(job_location))
        else:
            raise ValueError(f"node_launcher={launcher!r} (env NOLA_NODE_LAUNCHER): expected pytorchjob or local")
        if staging is not None and remote.exists(f"{staging}/{RESULT_FILE}"):
            download(remote.url(f"{staging}/{RESULT_FILE}"), result_file)
        if not result_file.is_file():
            where = result_file if staging is None else remote.url(f"{staging}/{RESULT_FILE}")
            raise Failure(f"{stage.__name__}: the PyTorchJob ended without rank 0's result {where}")
        if shards is not None:
            gather_shards(remote, shards, job, nodes * per_node)
        reported = [m["world_size"] for m in invocation.get_custom_messages() if isinstance(m, dict) and "world_size" in m]
        context.log.info(f"{stage.__name__}: {reported[-1] if reported else 'all'} ranks on {nodes} node(s) in "
                         f"{time.perf_counter() - started:.1f} s")
        # Our own file, written by rank 0 of this job: full unpickling, as launch() does.
        return torch.load(result_file, weights_only=False)
    finally:
        for leftover in (job_file, result_file, workdir / "pytorchjob.json"):
            leftover.unlink(missing_ok=True)
        if staging is not None:
            remote.fs.rm(remote.path(staging), recursive=True)


def staging_prefix(context: AssetExecutionContext, artifacts: ArtifactStore, remote: Storage, workdir: Path) -> str:
    """The key prefix, under the artifact's own prefix, that a URL root's job travels through:
    `<dataset>/<asset>/<digest>/.cluster/<run id>` (a hidden name: `save_ref` never uploads it)."""
    protocols = (remote.fs.protocol,) if isinstance(remote.fs.protocol, str) else remote.fs.protocol
    if "s3" not in protocols:
        raise ValueError(f"nodes > 1 on {artifacts.location()}: Pipes messages travel through S3 only "
                         "(an s3:// root, or a folder every pod mounts)")
    return f"{workdir.relative_to(artifacts.root()).as_posix()}/{STAGING_FOLDER}/{context.run.run_id}"


def gather_shards(remote: Storage, prefix: str, job: ImageFeaturesJob, world_size: int) -> None:
    """The table `job.output` from the `world_size` ranks' shards uploaded under `prefix`: each
    downloaded next to it, where rank 0 finds them on a shared folder, and merged as rank 0
    merges them (`merge_shards`, which deletes them; so does a failure)."""
    names = [shard_path(job.output, rank, world_size).name for rank in range(world_size)]
    missing = sorted(set(names) - {item.key for item in remote.listing(prefix)})
    if missing:
        raise Failure(f"{job.which} features: no shard {', '.join(missing)} under {remote.url(prefix)}: "
                      f"{len(missing)} of {world_size} ranks did not upload their share")
    try:
        for name in names:
            download(remote.url(f"{prefix}/{name}"), job.output.with_name(name))
        merge_shards(job.output, job.records, world_size)
    finally:
        for name in names:
            job.output.with_name(name).unlink(missing_ok=True)


def _s3_message_reader(remote: Storage, staging: str):
    """Dagster's S3 message reader (dagster-aws) with its chunks under the job's staging prefix,
    not at the bucket's top; rank 0 writes them with the matching writer (`cluster_rank`)."""
    import boto3
    from dagster_aws.pipes import PipesS3MessageReader

    class StagedReader(PipesS3MessageReader):
        @contextmanager
        def get_params(self):
            with super().get_params() as params:
                yield {**params, "key_prefix": key_prefix}

    bucket, _, key_prefix = remote.path(f"{staging}/messages").partition("/")
    return StagedReader(bucket=bucket, client=boto3.client("s3"), interval=MESSAGE_SECONDS)


class PipesPyTorchJobClient(PipesClient):
    """Creates a PyTorchJob inside a Pipes session from the run pod this step runs in, waits for it,
    copies its pods' logs into the compute log, and deletes it if the step is interrupted.

    Run pods need a service account allowed to create, get and delete `pytorchjobs.kubeflow.org`,
    and to read their own pod and the job's pods' logs (deploy/k8s/README.md)."""

    def __init__(self, message_reader: PipesFileMessageReader, poll_seconds: float = 10.0):
        self.message_reader = message_reader
        self.poll_seconds = poll_seconds

    def run(self, *, context: AssetExecutionContext, nodes: int, nproc_per_node: int,  # type: ignore[override]
            command: Sequence[str], extras: Mapping[str, Any] | None = None) -> PipesClientCompletedInvocation:
        import kubernetes

        kubernetes.config.load_incluster_config()
        core, custom = kubernetes.client.CoreV1Api(), kubernetes.client.CustomObjectsApi()
        namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        # The run pod's own spec (HOSTNAME is the pod's name): same image, env, secrets, volumes, GPUs.
        run_pod = core.api_client.sanitize_for_serialization(core.read_namespaced_pod(os.environ["HOSTNAME"], namespace))
        name = job_name(context)
        with open_pipes_session(context, PipesEnvContextInjector(), self.message_reader, extras) as session:
            manifest = pytorchjob_manifest(name, namespace, run_pod, nodes, nproc_per_node, command,
                                           env=session.get_bootstrap_env_vars(),
                                           labels={"dagster/run-id": context.run.run_id})
            custom.create_namespaced_custom_object(PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, namespace,
                                                   PYTORCHJOB_PLURAL, manifest)
            context.log.info(f"PyTorchJob {namespace}/{name} created")
            state = None
            try:
                while state is None:
                    time.sleep(self.poll_seconds)
                    job = custom.get_namespaced_custom_object(PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, namespace,
                                                              PYTORCHJOB_PLURAL, name)
                    state = finished_state(job)
            except BaseException:  # interrupted (run terminated, time limit): the pods must not run on
                custom.delete_namespaced_custom_object(PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, namespace,
                                                       PYTORCHJOB_PLURAL, name, propagation_policy="Foreground")
                raise
            finally:
                _copy_pod_logs(core, namespace, name)
            if state[0] != "Succeeded":
                raise Failure(f"PyTorchJob {namespace}/{name} {state[0]}: {state[1]}")
        return PipesClientCompletedInvocation(session)


def _copy_pod_logs(core, namespace: str, name: str) -> None:
    """Every pod's log of the job into this step's stderr (the compute log), rank by rank."""
    from kubernetes.client import ApiException

    try:
        pods = core.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={name}").items
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            log = core.read_namespaced_pod_log(pod.metadata.name, namespace, container=PYTORCHJOB_CONTAINER)
            sys.stderr.write(f"----- {pod.metadata.name} -----\n{log}\n")
    except ApiException as error:  # never hide why the job ended
        sys.stderr.write(f"PyTorchJob {namespace}/{name}: pod logs not read ({error.status} {error.reason})\n")


def finished_state(job: Mapping[str, Any]) -> tuple[str, str] | None:
    """(`Succeeded` | `Failed`, message) once the PyTorchJob's status has that condition true, else None."""
    for condition in job.get("status", {}).get("conditions", []) or []:
        if condition.get("type") in ("Succeeded", "Failed") and condition.get("status") == "True":
            return condition["type"], condition.get("message", "")
    return None
