"""dagster-webserver headless on a free localhost port: the asset graph over GraphQL, and a run of
the demo partition launched through the Python GraphQL client."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus
from dagster_graphql import DagsterGraphQLClient

from nola_core.demo import demo_dataset_path
from nola_assets.partitions import DATASETS

REPO = Path(__file__).resolve().parents[1]
INSTANCE_YAML = """
telemetry:
  enabled: false
run_coordinator:  # launch at once: no daemon runs in this test
  module: dagster.core.run_coordinator
  class: DefaultRunCoordinator
concurrency:
  pools:
    default_limit: 1
    granularity: op
"""
ASSET_GRAPH = "{ assetNodes { assetKey { path } groupName dependencyKeys { path } } }"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["data"]


def _wait_until_up(port: int, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"dagster-webserver exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"dagster-webserver not up after {timeout}s")


@pytest.fixture
def webserver(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    shutil.copytree(demo_dataset_path(), tmp_path / "data" / "fashion_mini")
    DagsterInstance.from_config(str(home)).add_dynamic_partitions(DATASETS, ["fashion_mini"])
    env = {**os.environ, "DAGSTER_HOME": str(home), "NOLA_DATA_ROOT": str(tmp_path / "data"),
           "NOLA_ARTIFACT_ROOT": str(tmp_path / "artifacts"), "NOLA_MODEL_PROFILE": "tiny",
           "NOLA_TUNING_EPOCHS": "1", "NOLA_ALIGNMENT_EPOCHS": "2", "NOLA_NUM_WORKERS": "0",
           "HF_HUB_OFFLINE": "1"}
    port = _free_port()
    log = open(tmp_path / "webserver.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "dagster_webserver", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        _wait_until_up(port, server, timeout=90)
        yield port, home
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and the code server it started
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
        log.close()


def test_asset_graph_and_a_run_through_graphql(webserver):
    port, home = webserver
    nodes = {tuple(n["assetKey"]["path"]): n for n in _graphql(port, ASSET_GRAPH)["assetNodes"]}
    assert ("prompt_tuned_encoder",) in nodes and nodes[("evaluation",)]["groupName"] == "results"
    assert {tuple(d["path"]) for d in nodes[("cde_pseudo_labels",)]["dependencyKeys"]} == {
        ("dataset_manifest",), ("cde_classifier",), ("clip_features",), ("dino_features",)}

    client = DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=30)
    run_id = client.submit_job_execution(
        "nola_job",
        repository_location_name="nola",
        run_config={"execution": {"config": {"in_process": {}}}},
        tags={"dagster/partition": "fashion_mini"},
    )
    deadline = time.monotonic() + 180
    status = client.get_run_status(run_id)
    while status not in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
        assert time.monotonic() < deadline, f"run {run_id} still {status}"
        time.sleep(1)
        status = client.get_run_status(run_id)
    assert status == DagsterRunStatus.SUCCESS, (home.parent / "webserver.log").read_text()[-3000:]

    partitions = _graphql(port, '{ assetNodeOrError(assetKey: {path: ["evaluation"]}) '
                                '{ ... on AssetNode { materializedPartitions: partitionKeysByDimension '
                                '{ partitionKeys } } } }')
    assert partitions["assetNodeOrError"]["materializedPartitions"][0]["partitionKeys"] == ["fashion_mini"]
