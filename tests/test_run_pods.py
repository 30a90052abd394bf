"""Many GPUs per run on Kubernetes (nola_assets.run_pods): the run pod the Helm values and a run's
tags render to.

No chart and no `helm` binary are reachable offline, and the Dagster chart's values schema ships
with the chart only, so the run pod is rendered the way `K8sRunLauncher.launch_run` builds it, with
dagster-k8s's own code: the launcher's context from the values' `runK8sConfig`, merged with the
code location's context (`includeConfigInLaunchedRuns`: the chart passes the deployment's env,
secrets, volumes, mounts and resources, as its `dagsterUserDeployments.k8sContainerContext`
template does), merged with the run's `dagster-k8s/config` tag; then `construct_dagster_k8s_job`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey

from nola_assets.run_pods import RUN_GPUS_ENV, run_gpus, run_pod_tags
from nola_assets.schedules import refresh_requests
from nola_assets.sensors import JOB_ASSETS, nola_job

VALUES = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "values.yaml"
CPU_ONLY = [AssetKey("dataset_manifest"), AssetKey("class_descriptions")]


def render_run_pod(tags: dict[str, str]):
    """The V1Job K8sRunLauncher creates for a run with `tags`, under deploy/k8s/values.yaml."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    values = yaml.safe_load(VALUES.read_text())
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    snake = {"containerConfig": "container_config", "podSpecConfig": "pod_spec_config",
             "jobSpecConfig": "job_spec_config", "podTemplateSpecMetadata": "pod_template_spec_metadata",
             "jobMetadata": "job_metadata"}  # the chart's instance template writes run_k8s_config so
    launcher_context = K8sContainerContext(
        image_pull_policy=launcher["imagePullPolicy"],
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
            {snake[key]: value for key, value in launcher["runK8sConfig"].items()}))
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"]
    code_location = K8sContainerContext.create_from_config({"k8s": {
        "image_pull_policy": deployment["image"]["pullPolicy"],
        "env_secrets": [secret["name"] for secret in deployment["envSecrets"]],
        "volume_mounts": deployment["volumeMounts"], "volumes": deployment["volumes"],
        "resources": deployment["resources"], "namespace": "nola", "env": deployment["env"],
        "run_k8s_config": {"pod_spec_config": {"automount_service_account_token": True}}}})
    run = K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags))
    context = launcher_context.merge(code_location.merge(run))  # K8sContainerContext.create_for_run's order
    job_config = DagsterK8sJobConfig(job_image="registry.example/nola-user-code:abc1234", dagster_home="/opt/dagster/dagster_home",
                                     instance_config_map="dagster-instance", postgres_password_secret="dagster-postgresql-secret")
    return construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_run", "{}"], "dagster-run-1234",
                                     user_defined_k8s_config=context.run_k8s_config, component="run_worker")


def _gpus_and_env(job) -> tuple[dict, dict, dict]:
    pod = job.spec.template.spec
    [container] = pod.containers
    env = {}
    for variable in container.env or []:  # the last definition of a name wins in Kubernetes
        env[variable.name] = variable.value
    resources = container.resources
    gpus = {part: (getattr(resources, part) or {}).get("nvidia.com/gpu") for part in ("requests", "limits")}
    return gpus, env, pod.node_selector or {}


@pytest.mark.parametrize("gpus", [1, 4])
def test_a_run_of_gpu_assets_gets_a_pod_with_the_gpus_it_asks_for_and_as_many_processes(gpus):
    tags = run_pod_tags(JOB_ASSETS, env={RUN_GPUS_ENV: str(gpus)})
    job = render_run_pod(tags)
    requested, env, selector = _gpus_and_env(job)
    assert requested == {"requests": str(gpus), "limits": str(gpus)}
    assert env["NOLA_NPROC_PER_NODE"] == str(gpus)  # ComputeResource.processes() reads it
    assert selector == {"nvidia.com/gpu.present": "true"}
    assert any(t.key == "nvidia.com/gpu" for t in job.spec.template.spec.tolerations)
    container = job.spec.template.spec.containers[0]
    assert container.resources.requests["memory"] == "16Gi"  # the GPU steps' CPU and memory too
    assert env["NOLA_RUN_GPUS"] == "1" and env["NOLA_MODEL_PROFILE"] == "paper"  # the code location's env stays
    assert {m.mount_path for m in container.volume_mounts} >= {"/data", "/artifacts", "/models"}


def test_a_run_of_cpu_only_assets_asks_for_no_gpu_and_no_gpu_node():
    tags = run_pod_tags(JOB_ASSETS, CPU_ONLY, env={RUN_GPUS_ENV: "4"})
    requested, env, selector = _gpus_and_env(render_run_pod(tags))
    assert requested == {"requests": None, "limits": None}
    assert "nvidia.com/gpu.present" not in selector and env["NOLA_NPROC_PER_NODE"] == "1"
    # The values alone (a run without the tag, e.g. launched from the asset graph) ask for no GPU either.
    requested, _, selector = _gpus_and_env(render_run_pod({}))
    assert requested == {"requests": None, "limits": None} and not selector


def test_the_job_the_sensor_and_the_schedule_tag_their_runs(monkeypatch):
    gpu = json.loads(nola_job.tags["dagster-k8s/config"])
    assert gpu["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == str(run_gpus({}))
    monkeypatch.setenv(RUN_GPUS_ENV, "2")
    selection_tags = run_pod_tags(JOB_ASSETS, [AssetKey("prompt_tuned_encoder")])
    assert json.loads(selection_tags["dagster-k8s/config"])["container_config"]["env"] == [
        {"name": "NOLA_NPROC_PER_NODE", "value": "2"}]
    from dagster import DagsterInstance

    from nola_assets.schedules import REFRESHED_ASSETS

    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", ["d"])
    monkeypatch.setattr("nola_assets.schedules.stale_assets", lambda instance, assets, name: list(CPU_ONLY))
    [request] = refresh_requests(instance, REFRESHED_ASSETS, "w1")
    assert "nvidia.com/gpu" not in request.tags["dagster-k8s/config"]
    with pytest.raises(ValueError, match=f"{RUN_GPUS_ENV}='0'"):
        run_gpus({RUN_GPUS_ENV: "0"})
