"""Many nodes (nola_assets.cluster): the PyTorchJob the asset launches, and the Pipes round trip.

The manifest is checked against the Training Operator's published API models (the
`kubeflow-training` SDK's `KubeflowOrgV1PyTorchJob`, OpenAPI-generated from the operator's
types, whose replica templates are the `kubernetes` client's `V1PodTemplateSpec`): every key
must be a field of its model (camelCase as the API server takes it), nested all the way down,
and each model is built with client-side validation (required fields).

The round trip: `prompt_tuned_encoder` with `nodes=2` and `node_launcher="local"` writes its job to
the artifact's folder, builds the PyTorchJob and hands it, through Dagster's
PipesSubprocessClient, to a local stand-in for the operator that starts the two pods' commands
(torchrun, one gloo process each, static rendezvous on localhost); rank 0 reports its progress
and result through Pipes. The tuned tensors match the one-node run's within the tolerance of
tests/test_assets_distributed.py (1e-5: only the gradient summation order differs). The same on
s3:// artifact and data roots served by moto, each pod in its own working directory with its own
cache: the job, the images, the messages and the result go through the bucket (rank 0 not
uploading its result fails it; so do ranks keeping the asset's paths instead of their own copies,
and ranks not mirroring the images). Feature extraction on the s3:// roots: each rank uploads its
shard under the job's staging prefix and the asset merges them; the CLIP and DINO tables equal
the one-node tables (same ids in the same order, values within the tolerance of
tests/test_assets_distributed.py, 2e-3: float16 rows of different batch compositions; same digest).
A rank not uploading its shard fails it, naming the shard; so do shards merged in rank order
instead of record order, and the asset keeping the shards it downloaded.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from dagster import AssetKey, AssetSelection, DagsterInstance, materialize

from assets_helpers import copy_demo, materialize_partition, resources_for_test
from nola_assets.artifacts import ArtifactRefIOManager, ArtifactStore
from nola_assets.assets import NOLA_ASSETS
from nola_assets import cluster
from nola_assets.cluster import (
    JOB_FILE,
    JOB_NAME_LABEL,
    STAGING_FOLDER,
    pytorchjob_manifest,
    rank_command,
    staging_prefix,
)
from nola_assets.cluster_rank import RESULT_FILE
from nola_assets.common import FEATURES_FILE, REFS_IO_MANAGER, RESUME_DIR, TRAINABLE_FILE
from nola_assets.feature_assets import clip_features, dino_features
from nola_assets.partitions import DATASETS
from nola_assets.pytorchjob_standin import PODS_DIR_ENV, expand, replica_environments
from nola_assets.resources import ComputeResource, DatasetsResource
from nola_assets.tuning_assets import prompt_tuned_encoder
from nola_core.distributed import merge_shards, shard_path
from nola_core.features import load_feature_table
from nola_core.storage import DEFAULT_CACHE_DIR, open_storage
from nola_core.tuning import RESUME_FILE
from tests.s3_server import s3_server  # noqa: F401  (module-scoped fixture)

TRAINED_TOLERANCE = 1e-5
FEATURE_TOLERANCE = 2e-3
FEATURES = ("clip_features", "dino_features")
NUM_IMAGES = 11  # odd: the last step splits unevenly over the two ranks
DATASET = "nodes"
ROOT = Path(__file__).resolve().parents[1]

RUN_POD = {  # a run pod as the Kubernetes API returns it (camelCase): what the job's pods copy
    "metadata": {"name": "dagster-run-1234", "namespace": "nola"},
    "spec": {
        "containers": [{
            "name": "dagster", "image": "registry.example/nola-user-code:abc1234", "imagePullPolicy": "IfNotPresent",
            "args": ["dagster", "api", "execute_run", "{}"],
            "env": [{"name": "NOLA_MODEL_PROFILE", "value": "paper"},
                    {"name": "DAGSTER_PG_PASSWORD",
                     "valueFrom": {"secretKeyRef": {"name": "dagster-postgresql-secret", "key": "postgresql-password"}}}],
            "envFrom": [{"secretRef": {"name": "nola-secrets"}}],
            "volumeMounts": [{"name": "nola-artifacts", "mountPath": "/artifacts"}, {"name": "dshm", "mountPath": "/dev/shm"}],
            "resources": {"requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "4"},
                          "limits": {"memory": "32Gi", "nvidia.com/gpu": "4"}},
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }],
        "volumes": [{"name": "nola-artifacts", "persistentVolumeClaim": {"claimName": "nola-artifacts"}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
        "serviceAccountName": "dagster",
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "restartPolicy": "Never",
        "nodeName": "gpu-node-7",
    },
    "status": {"phase": "Running"},
}


def _model_class(type_name: str):
    from kubeflow.training import models as kubeflow_models
    from kubernetes import client

    return getattr(kubeflow_models, type_name, None) or getattr(client, type_name)


def _strict(type_name: str, value, where: str):
    """`value` as the OpenAPI type `type_name`: unknown keys and missing required fields raise."""
    if value is None:
        return None
    if type_name.startswith("list["):
        assert isinstance(value, list), f"{where}: expected a list"
        return [_strict(type_name[5:-1], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if type_name.startswith(("dict(", "dict[")):  # dict(str, V) in the kubeflow models, dict[str, V] in kubernetes'
        assert isinstance(value, dict), f"{where}: expected a mapping"
        inner = type_name[5:-1].split(",", 1)[1].strip()
        return {key: _strict(inner, item, f"{where}.{key}") for key, item in value.items()}
    primitive = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if type_name in primitive:
        assert isinstance(value, primitive[type_name]), f"{where}: {value!r} is not {type_name}"
        return value
    model = _model_class(type_name)
    assert isinstance(value, dict), f"{where}: expected a {type_name} mapping"
    fields = {camel: snake for snake, camel in model.attribute_map.items()}
    unknown = set(value) - set(fields)
    assert not unknown, f"{where}: {sorted(unknown)} are not fields of {type_name}"
    return model(**{fields[key]: _strict(model.openapi_types[fields[key]], item, f"{where}.{key}")
                    for key, item in value.items()})


def test_the_pytorchjob_is_a_valid_kubeflow_pytorchjob_of_copies_of_the_run_pod():
    from kubeflow.training.constants import constants

    manifest = pytorchjob_manifest("nola-prompt-tuned-encoder-1a2b3c4d", "nola", RUN_POD, nodes=3, nproc_per_node=4,
                                   command=rank_command("/artifacts/x/cluster_job.pt"),
                                   env={"DAGSTER_PIPES_CONTEXT": "e30=", "NOLA_MODEL_PROFILE": "tiny"})
    job = _strict(constants.PYTORCHJOB_MODEL, manifest, "PyTorchJob")
    assert (job.api_version, job.kind) == (constants.API_VERSION, constants.PYTORCHJOB_KIND)
    specs = job.spec.pytorch_replica_specs
    assert {name: spec.replicas for name, spec in specs.items()} == {
        constants.REPLICA_TYPE_MASTER: 1, constants.REPLICA_TYPE_WORKER: 2}
    assert job.spec.nproc_per_node == "4" and job.spec.run_policy.backoff_limit == 0
    for spec in specs.values():
        pod = spec.template.spec
        [container] = pod.containers
        assert container.name == constants.PYTORCHJOB_CONTAINER  # where the operator sets the rank variables
        assert container.image == RUN_POD["spec"]["containers"][0]["image"]
        assert container.resources.limits["nvidia.com/gpu"] == "4"  # each pod: the run pod's GPUs
        assert [m.mount_path for m in container.volume_mounts] == ["/artifacts", "/dev/shm"]
        assert [v.name for v in pod.volumes] == ["nola-artifacts", "dshm"] and pod.service_account_name == "dagster"
        assert pod.node_name is None and spec.restart_policy == "Never"  # not pinned to the run pod's node
        env = {e.name: e for e in container.env}
        assert env["NOLA_MODEL_PROFILE"].value == "tiny" and [e.name for e in container.env].count("NOLA_MODEL_PROFILE") == 1
        assert env["DAGSTER_PG_PASSWORD"].value_from.secret_key_ref.name == "dagster-postgresql-secret"
        assert env["DAGSTER_PIPES_CONTEXT"].value == "e30="
        assert container.command[:3] == ["python", "-m", "torch.distributed.run"]
        assert container.command[-3:] == ["--module", "nola_assets.cluster_rank", "/artifacts/x/cluster_job.pt"]
    assert manifest["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "nola"
    assert JOB_NAME_LABEL == constants.JOB_NAME_LABEL  # how the pods' logs are found
    assert set(pytorchjob_manifest("n", "ns", RUN_POD, 1, 1, ["x"])["spec"]["pytorchReplicaSpecs"]) == {"Master"}

    broken = pytorchjob_manifest("n", "ns", RUN_POD, 2, 1, ["x"])
    broken["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["gpus"] = 4
    with pytest.raises(AssertionError, match="gpus"):
        _strict(constants.PYTORCHJOB_MODEL, broken, "PyTorchJob")


def test_the_stand_in_gives_each_pod_the_operators_variables_and_expands_the_command():
    manifest = pytorchjob_manifest("n", "ns", RUN_POD, nodes=3, nproc_per_node=2, command=rank_command("/j.pt"))
    environments = replica_environments(manifest, master_port=29511)
    assert [e["PET_NODE_RANK"] for e in environments] == ["0", "1", "2"]
    assert {(e["PET_NNODES"], e["PET_NPROC_PER_NODE"], e["WORLD_SIZE"], e["MASTER_PORT"]) for e in environments} == {
        ("3", "2", "6", "29511")}
    command = [expand(a, environments[1]) for a in manifest["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
               ["spec"]["containers"][0]["command"]]
    assert "--master-addr=127.0.0.1" in command and "--master-port=29511" in command
    assert expand("$$(MASTER_PORT) $(UNSET)", environments[0]) == "$(MASTER_PORT) $(UNSET)"  # the kubelet's rules


def _tuning_resources(data, artifacts, **compute) -> dict:
    resources = resources_for_test(data, artifacts, tuning_epochs=1, tuning_batch_size=6, micro_batch_size=2,
                                   tuning_lr=1.0)
    resources["compute"] = ComputeResource(device="cpu", num_workers=0, **compute)
    return resources


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """(data root, artifact root): the upstream artifacts and the one-node tuned encoder, made once."""
    folder = tmp_path_factory.mktemp("one_node")
    unlabeled = copy_demo(folder / "data", DATASET, labeled=False) / "unlabeled"
    for path in sorted(unlabeled.iterdir())[NUM_IMAGES:]:
        path.unlink()
    one = _tuning_resources(folder / "data", folder / "one")
    materialize_partition(one, AssetSelection.assets(prompt_tuned_encoder).upstream(), DATASET)
    return folder / "data", folder / "one"


def _tune_on_two_nodes(resources: dict):
    """`prompt_tuned_encoder` alone, its artifact removed first: (result, instance, seconds)."""
    started = time.perf_counter()
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASETS, [DATASET])
    result = materialize(NOLA_ASSETS, selection=[prompt_tuned_encoder], instance=instance, partition_key=DATASET,
                         resources=resources)
    return result, instance, time.perf_counter() - started


def _assert_tuned_like_one_node(result, instance, store, single) -> None:
    assert result.success
    tuned, reference = (s.require_ref("prompt_tuned_encoder", DATASET) for s in (store, single))
    assert tuned.digest == reference.digest  # the node count is not in the key
    ours, theirs = store.read_tensors(tuned, TRAINABLE_FILE), single.read_tensors(reference, TRAINABLE_FILE)
    assert set(ours) == set(theirs)
    difference = max((ours[name] - theirs[name]).abs().max().item() for name in ours)
    print(f"tuned tensors, two nodes vs one: max |difference| {difference:.3g}")
    assert difference <= TRAINED_TOLERANCE
    logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("[pipes] external process successfully opened dagster pipes" in m for m in logs)
    assert any(re.search(r"prompt tuning: 1/1 epochs", m) for m in logs), "rank 0's progress came through Pipes"
    assert any("2 ranks on 2 node(s)" in m for m in logs), "rank 0's result message came through Pipes"
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey("prompt_tuned_encoder")]
    assert event.materialization.metadata["training_images"].value == NUM_IMAGES
    files = [sorted(p.name for p in Path(ref.path).iterdir()) for ref in (tuned, reference)]
    assert files[0] == files[1], "the job's files are gone from the artifact"
    assert not torch.distributed.is_initialized()  # the ranks ran elsewhere


@pytest.mark.slow
def test_two_nodes_through_pipes_tune_the_encoder_one_node_tunes(one_node, tmp_path):
    data, reference_root = one_node
    shutil.copytree(reference_root, tmp_path / "two")  # the same upstream artifacts
    two = _tuning_resources(data, tmp_path / "two", nodes=2, node_launcher="local")
    store = two["artifacts"]
    shutil.rmtree(store.require_ref("prompt_tuned_encoder", DATASET).path)
    store.ref_path("prompt_tuned_encoder", DATASET).unlink()
    result, instance, seconds = _tune_on_two_nodes(two)
    print(f"two nodes (local PyTorchJob stand-in) through Pipes: {seconds:.1f} s")
    _assert_tuned_like_one_node(result, instance, store, _tuning_resources(data, reference_root)["artifacts"])


def _two_nodes_on_s3(one_node, bucket: str, made_here: set[str], tmp_path, monkeypatch) -> dict:
    """Resources of a two-node run on s3:// artifact and data roots in `bucket`: the data and the
    one-node artifacts but those of the assets `made_here` uploaded there; the asset's cache is
    `tmp_path/asset`, each pod's its own default one under `tmp_path/pods/<pod>`."""
    data, reference_root = one_node
    root, images = open_storage(f"s3://{bucket}/artifacts"), open_storage(f"s3://{bucket}/data")
    for path in sorted(reference_root.rglob("*")):  # <dataset>/<asset>/<digest>/… and refs/<dataset>/<asset>.json
        relative = path.relative_to(reference_root)
        if path.is_file() and not made_here & {*relative.parts, relative.stem}:
            root.put(relative.as_posix(), path)
    for path in sorted(data.rglob("*")):
        if path.is_file():
            images.put(path.relative_to(data).as_posix(), path)
    monkeypatch.delenv("NOLA_CACHE_DIR", raising=False)
    monkeypatch.setenv(PODS_DIR_ENV, str(tmp_path / "pods"))
    two = _tuning_resources(data, f"s3://{bucket}/artifacts", nodes=2, node_launcher="local")
    store = ArtifactStore(artifact_root=f"s3://{bucket}/artifacts", cache_dir=str(tmp_path / "asset"))
    two["artifacts"] = store
    two[REFS_IO_MANAGER] = ArtifactRefIOManager(store=store)
    two["data"] = DatasetsResource(data_root=f"s3://{bucket}/data", cache_dir=str(tmp_path / "asset"))
    return two


@pytest.mark.slow
def test_two_nodes_on_an_s3_root_share_no_folder_with_each_other_or_the_asset(one_node, s3_server, tmp_path,
                                                                              monkeypatch):
    """On an s3:// artifact root the job, the Pipes messages and rank 0's result travel through the
    bucket, and the images from an s3:// data root: each pod (its own working directory,
    NOLA_CACHE_DIR unset: the default cache under it) downloads them into its own cache, and the
    asset's cache is a third folder."""
    data, reference_root = one_node
    bucket = s3_server.new_bucket()
    root = open_storage(f"s3://{bucket}/artifacts")
    tuned_folder = _tuning_resources(data, reference_root)["artifacts"].require_ref("prompt_tuned_encoder", DATASET)
    two = _two_nodes_on_s3(one_node, bucket, {"prompt_tuned_encoder"}, tmp_path, monkeypatch)
    store = two["artifacts"]
    result, instance, seconds = _tune_on_two_nodes(two)
    print(f"two nodes on s3:// (local PyTorchJob stand-in) through Pipes: {seconds:.1f} s")
    _assert_tuned_like_one_node(result, instance, store, _tuning_resources(data, reference_root)["artifacts"])

    pods = sorted((tmp_path / "pods").iterdir())
    assert [p.name.rsplit("-", 2)[1:] for p in pods] == [["master", "0"], ["worker", "0"]]
    for pod in pods:  # each pod read the job from its own cache, under its own working directory
        [job_copy] = (pod / DEFAULT_CACHE_DIR).rglob(JOB_FILE)
        assert job_copy.relative_to(pod / DEFAULT_CACHE_DIR).parts[:2] == ("s3", bucket)
        own_images = pod / DEFAULT_CACHE_DIR / "s3" / bucket / "data" / DATASET / "unlabeled"
        assert len([p for p in own_images.iterdir() if not p.name.startswith(".")]) == NUM_IMAGES
    # rank 0 kept its per-epoch resume state under its own copy of the artifact, not the asset's
    assert [p.parent.name for p in (pods[0] / DEFAULT_CACHE_DIR).rglob(RESUME_FILE)] == [RESUME_DIR]
    assert not list((tmp_path / "asset").rglob(RESULT_FILE)) and not list((tmp_path / "asset").rglob(JOB_FILE))
    assert not root.listing(f"{DATASET}/prompt_tuned_encoder/{tuned_folder.digest}/{STAGING_FOLDER}"), \
        "the job's staging prefix is removed from the bucket"
    assert root.exists(f"{DATASET}/prompt_tuned_encoder/{tuned_folder.digest}/ref.json")


@pytest.mark.slow
def test_two_nodes_on_an_s3_root_extract_the_feature_tables_of_one_node(one_node, s3_server, tmp_path, monkeypatch):
    """Each rank uploads its feature shard under the job's staging prefix; the asset downloads
    them next to the table it makes and merges them: the one-node tables, the prefix gone, and
    the asset's cache holds the shards only while it merges them (none of them in any pod's)."""
    data, reference_root = one_node
    bucket = s3_server.new_bucket()
    root = open_storage(f"s3://{bucket}/artifacts")
    two = _two_nodes_on_s3(one_node, bucket, set(FEATURES), tmp_path, monkeypatch)
    store, single = two["artifacts"], _tuning_resources(data, reference_root)["artifacts"]
    asset_cache = tmp_path / "asset"
    at_merge, merged = [], []  # the shard files in the asset's cache when each merge starts; its tables

    def watched_merge(output, records, world_size):
        at_merge.append(sorted(p.name for p in asset_cache.rglob("*.rank*-of-*")))
        merged.append(merge_shards(output, records, world_size))
        return merged[-1]

    monkeypatch.setattr(cluster, "merge_shards", watched_merge)
    started = time.perf_counter()
    materialize_partition(two, [clip_features, dino_features], DATASET)
    print(f"CLIP and DINO features on two nodes on s3:// (local PyTorchJob stand-in): "
          f"{time.perf_counter() - started:.1f} s")

    for asset in FEATURES:
        ours, theirs = store.require_ref(asset, DATASET), single.require_ref(asset, DATASET)
        assert ours.digest == theirs.digest, "the node count is not in the key"
        table = load_feature_table(ours.file(FEATURES_FILE))
        reference = load_feature_table(theirs.file(FEATURES_FILE))
        # the merged new rows (all of them: no previous table) as one node writes them, before the
        # asset's own merge with the previous table (which orders them again)
        assert merged[FEATURES.index(asset)].ids == reference.ids, f"{asset}: shards merged out of record order"
        assert table.ids == reference.ids, f"{asset}: the rows are not in the one-node order"
        assert len(table.ids) == NUM_IMAGES and table.failed == reference.failed
        difference = (table.features.float() - reference.features.float()).abs().max().item()
        print(f"{asset}, two nodes vs one: max |difference| {difference:.3g}")
        assert difference <= FEATURE_TOLERANCE
        assert [o.key for o in root.listing(f"{DATASET}/{asset}/{ours.digest}")] == [
            FEATURES_FILE, "key.json", "ref.json"], "the job's staging prefix is removed, only the artifact is there"
    shards = [shard_path(Path(f".new-{FEATURES_FILE}"), rank, 2).name for rank in range(2)]
    assert at_merge == [shards, shards], "the asset merged both ranks' shards of each table, and only them"
    assert not list(asset_cache.rglob("*.rank*-of-*")) and not list(asset_cache.rglob(STAGING_FOLDER))
    for pod in (tmp_path / "pods").iterdir():
        assert not list(pod.rglob("*.rank*-of-*")), f"{pod.name} deleted its shard after uploading it"


def test_the_rbac_manifest_lets_run_pods_do_what_the_client_calls():
    """deploy/k8s/pytorchjob-rbac.yaml against the kubernetes models, and the calls of PipesPyTorchJobClient."""
    documents = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "pytorchjob-rbac.yaml").read_text())}
    role, binding = _strict("V1Role", documents["Role"], "Role"), _strict("V1RoleBinding", documents["RoleBinding"], "RoleBinding")
    allowed = {(group, resource, verb) for rule in role.rules for group in rule.api_groups
               for resource in rule.resources for verb in rule.verbs}
    source = (ROOT / "nola_assets" / "cluster.py").read_text()
    calls = {"create_namespaced_custom_object": ("kubeflow.org", "pytorchjobs", "create"),
             "get_namespaced_custom_object": ("kubeflow.org", "pytorchjobs", "get"),
             "delete_namespaced_custom_object": ("kubeflow.org", "pytorchjobs", "delete"),
             "read_namespaced_pod(": ("", "pods", "get"), "list_namespaced_pod(": ("", "pods", "list"),
             "read_namespaced_pod_log": ("", "pods/log", "get")}
    assert all(call in source for call in calls), "every API call the client makes is listed here"
    assert set(calls.values()) == allowed, "exactly what the client calls"
    assert binding.role_ref.name == role.metadata.name
    # the chart's user-deployment service account for the release `dagster` (deploy/k8s/README.md)
    assert [s.name for s in binding.subjects] == ["dagster-dagster-user-deployments"]


def test_nodes_is_read_from_its_variable_and_checked(monkeypatch):
    monkeypatch.delenv("NOLA_NODES", raising=False)
    assert ComputeResource().node_count() == 1
    monkeypatch.setenv("NOLA_NODES", "3")
    assert ComputeResource().node_count() == 3 and ComputeResource(nodes=2).node_count() == 2  # run config wins
    with pytest.raises(ValueError, match=r"nodes=0 \(env NOLA_NODES\): must be at least 1"):
        ComputeResource(nodes=0).node_count()


def test_an_object_storage_root_takes_only_s3(tmp_path):
    """Pipes messages travel through S3 only."""
    memory = ArtifactStore(artifact_root="memory://nola/artifacts", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="through S3 only"):
        staging_prefix(None, memory, memory.remote(), memory.root() / "d" / "a" / "x")
