"""The whole asset graph (nola_job's assets and checks) with the artifact root and the data root in
S3 (a moto server on localhost): nothing written locally outside the declared cache, every artifact
uploaded write-once with its ref.json last, the evaluation tables `nola report` reads published
under the bucket's evaluation/ prefix, `nola report` and `nola export` (core CLI, no Dagster)
reading them back into a fresh cache, and a rerun from another machine's empty cache on a new
Dagster instance reusing every artifact without uploading any file of it again."""

from __future__ import annotations

import json
import shutil

import pytest
from dagster import DagsterInstance, materialize

from assets_helpers import copy_demo, resources_for_test
import nola_assets.cli
from nola_assets.artifacts import ArtifactRefIOManager, ArtifactStore
from nola_assets.checks import NOLA_CHECKS
from nola_assets.common import REFS_IO_MANAGER
from nola_assets.partitions import DATASETS
from nola_assets.resources import DatasetsResource, DescriptionsResource
from nola_assets.schedules import REFRESHED_ASSETS
from nola_core.cli import main
from nola_core.export import EXPORT_ASSET, MANIFEST_NAME, TENSORS_NAME
from nola_core.storage import STAGING_PREFIX, open_storage

from tests.s3_server import s3_server  # noqa: F401  (module-scoped fixture)

DATASET = "s3_mini"
UNLABELED_IMAGES = 24
LABELED_PER_CLASS = 4


def _resources(bucket: str, cache) -> dict:
    """The test resources with both roots in the bucket and every local write under `cache`."""
    store = ArtifactStore(artifact_root=f"s3://{bucket}/artifacts", cache_dir=str(cache))
    return {**resources_for_test("unused", "unused"), "artifacts": store,
            REFS_IO_MANAGER: ArtifactRefIOManager(store=store),
            "data": DatasetsResource(data_root=f"s3://{bucket}/data", cache_dir=str(cache)),
            "descriptions": DescriptionsResource(descriptions="file", descriptions_path="fake_descriptions.json",
                                                 descriptions_cache=str(cache / "descriptions"))}


def _run(resources: dict) -> dict:
    """Every asset's materialization metadata."""
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASETS, [DATASET])
    result = materialize([*REFRESHED_ASSETS, *NOLA_CHECKS], instance=instance, partition_key=DATASET,
                         resources=resources)
    assert result.success
    return {e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()}


def _reused(metadata: dict) -> dict:
    return {asset: values["reused"].value for asset, values in metadata.items()}


@pytest.mark.slow
def test_the_graph_on_s3_writes_only_the_cache_and_a_rerun_reuses_everything(s3_server, tmp_path, monkeypatch, capsys):
    bucket = s3_server.new_bucket()
    folder = copy_demo(tmp_path / "upload", DATASET)
    for path in sorted((folder / "unlabeled").iterdir())[UNLABELED_IMAGES:]:
        path.unlink()
    for class_dir in (folder / "labeled").iterdir():
        for path in sorted(class_dir.iterdir())[LABELED_PER_CLASS:]:
            path.unlink()
    data = open_storage(f"s3://{bucket}/data")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data.put(f"{DATASET}/{path.relative_to(folder).as_posix()}", path)
    shutil.rmtree(tmp_path / "upload")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative default path written anywhere would land here

    metadata = _run(_resources(bucket, tmp_path / "cache"))
    first = _reused(metadata)
    assert first and not any(first.values())
    assert metadata["method_comparison"]["evaluation_root"].value == f"s3://{bucket}/artifacts/evaluation"
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "work"]
    artifacts = open_storage(f"s3://{bucket}/artifacts")
    keys = {o.key for o in artifacts.listing()}
    assert not any(key.startswith(STAGING_PREFIX) for key in keys)
    for asset in first:
        assert f"refs/{DATASET}/{asset}.json" in keys
        [digest] = {key.split("/")[2] for key in keys if key.startswith(f"{DATASET}/{asset}/")}
        files = {key for key in keys if key.startswith(f"{DATASET}/{asset}/{digest}/")}
        assert f"{DATASET}/{asset}/{digest}/ref.json" in files and len(files) >= 3  # key.json, ref.json, the artifact
    evaluation = sorted(key for key in keys if key.startswith("evaluation/"))
    assert evaluation == sorted(f"evaluation/{DATASET}/{name}" for name in
                                (*(f"{method}.parquet" for method in METHODS), "report/report.md", "report/report.png"))
    _core_cli_reads_the_bucket(s3_server, bucket, tmp_path / "cli", monkeypatch, capsys)

    mark = len(s3_server.requests)
    again = _reused(_run(_resources(bucket, tmp_path / "other_machine_cache")))  # an empty cache, a new instance
    assert again == {asset: True for asset in first}
    uploads = {r.key for r in s3_server.since(mark, bucket) if r.method == "PUT"}
    assert uploads and all(key.startswith(("artifacts/.staging/", "artifacts/refs/", "artifacts/evaluation/"))
                           for key in uploads)  # pointers and the shared evaluation tables only
    assert list(work.iterdir()) == []


def test_shared_evaluation_tables_go_through_the_bucket(s3_server, tmp_path):
    """A table one machine publishes under evaluation/ is in the folder another machine's store
    hands out (its empty cache brought up to date), and a newer version replaces it there."""
    import polars as pl

    root = f"s3://{s3_server.new_bucket()}/artifacts"
    writer = ArtifactStore(artifact_root=root, cache_dir=str(tmp_path / "writer"))
    table = writer.shared_folder("evaluation") / "ds" / "nola.parquet"
    table.parent.mkdir(parents=True)
    pl.DataFrame({"top1": [0.5]}).write_parquet(table)
    writer.publish_files([table])
    assert [o.key for o in open_storage(root).listing("evaluation")] == ["ds/nola.parquet"]
    reader = ArtifactStore(artifact_root=root, cache_dir=str(tmp_path / "reader"))
    assert pl.read_parquet(reader.shared_folder("evaluation") / "ds" / "nola.parquet")["top1"].to_list() == [0.5]
    pl.DataFrame({"top1": [0.75]}).write_parquet(table)
    writer.publish_files([table])
    assert pl.read_parquet(reader.shared_folder("evaluation") / "ds" / "nola.parquet")["top1"].to_list() == [0.75]


METHODS = ("zero-shot", "cde", "lafter", "latteclip", "nola")  # method_comparison's tables


def _core_cli_reads_the_bucket(s3_server, bucket: str, folder, monkeypatch, capsys) -> None:
    """`nola report` and `nola export` on a machine with an empty cache: the evaluation tables and the
    export come from the bucket; export reads the exported classifier's objects and no other
    artifact's."""
    root = f"s3://{bucket}/artifacts"
    monkeypatch.setenv("NOLA_ARTIFACT_ROOT", root)
    monkeypatch.setenv("NOLA_CACHE_DIR", str(folder / "cache"))
    monkeypatch.delenv("NOLA_EVALUATION_ROOT", raising=False)
    capsys.readouterr()
    assert main(["report", "--out", str(folder / "report")]) == 0
    printed = capsys.readouterr().out
    assert all(method in printed for method in METHODS) and DATASET in printed
    published = open_storage(root).read_bytes(f"evaluation/{DATASET}/report/report.md")
    assert (folder / "report" / "report.md").read_bytes() == published  # the same tables, read back

    mark = len(s3_server.requests)
    assert main(["export", DATASET, "--to", str(folder / "export")]) == 0
    reads = {r.key.split("/")[2] for r in s3_server.since(mark, bucket) if r.reads_object and r.key.startswith(f"artifacts/{DATASET}/")}
    assert reads == {EXPORT_ASSET}  # the tuned encoder's pointer is read for staleness, not its files
    store = open_storage(root)
    digest = json.loads(store.read_bytes(f"refs/{DATASET}/{EXPORT_ASSET}.json"))["digest"]
    for name in (MANIFEST_NAME, TENSORS_NAME):
        assert (folder / "export" / name).read_bytes() == store.read_bytes(f"{DATASET}/{EXPORT_ASSET}/{digest}/{name}")


def test_the_core_cli_names_the_url_of_what_is_missing(s3_server, tmp_path, monkeypatch, capsys):
    root = f"s3://{s3_server.new_bucket()}/artifacts"
    monkeypatch.setenv("NOLA_ARTIFACT_ROOT", root)
    monkeypatch.setenv("NOLA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NOLA_EVALUATION_ROOT", raising=False)
    assert main(["export", DATASET, "--to", str(tmp_path / "export")]) == 1
    assert f"no exported classifier for dataset {DATASET!r} under {root}" in capsys.readouterr().err
    assert main(["report"]) == 1
    assert f"no object under {root}/evaluation" in capsys.readouterr().err
    assert main(["report", "--root", f"{root}/elsewhere"]) == 1
    assert f"no object under {root}/elsewhere" in capsys.readouterr().err


_KILLED_SAVE = """
import os, signal, sys
import torch
from nola_core import storage
from nola_assets.artifacts import ArtifactStore

calls = []
put = storage.Storage.put
def put_then_die(self, key, source):
    calls.append(key)
    if len(calls) == 2:  # killed while uploading the artifact's files
        os.kill(os.getpid(), signal.SIGKILL)
    return put(self, key, source)
storage.Storage.put = put_then_die
store = ArtifactStore(artifact_root=sys.argv[1], cache_dir=sys.argv[2])
ref = store.allocate("clip_features", "ds", {"model": "m"})
store.write_tensors(ref, "a.safetensors", {"x": torch.ones(3)})
store.write_tensors(ref, "b.safetensors", {"y": torch.zeros(3)})
store.save_ref(ref)
"""


@pytest.mark.slow
def test_an_artifact_killed_while_uploading_is_never_taken_as_finished(s3_server, tmp_path):
    import subprocess
    import sys

    import torch

    root = f"s3://{s3_server.new_bucket()}/artifacts"
    killed = subprocess.run([sys.executable, "-c", _KILLED_SAVE, root, str(tmp_path / "cache")])
    assert killed.returncode == -9
    keys = {o.key for o in open_storage(root).listing()}
    assert keys and not any(key.endswith("ref.json") or key.startswith("refs/") for key in keys)
    elsewhere = ArtifactStore(artifact_root=root, cache_dir=str(tmp_path / "other_cache"))
    assert elsewhere.complete_ref("clip_features", "ds", {"model": "m"}) is None
    assert elsewhere.load_ref("clip_features", "ds") is None

    ref = elsewhere.allocate("clip_features", "ds", {"model": "m"})  # the retry finishes it
    elsewhere.write_tensors(ref, "a.safetensors", {"x": torch.ones(3)})
    elsewhere.save_ref(ref)
    mark = len(s3_server.requests)
    elsewhere.save_ref(ref)  # finished: nothing of it is uploaded again, only the pointer moves
    assert not [r for r in s3_server.since(mark) if r.method == "PUT" and "/ds/clip_features/" in r.key]
    third = ArtifactStore(artifact_root=root, cache_dir=str(tmp_path / "third_cache"))
    found = third.complete_ref("clip_features", "ds", {"model": "m"})
    assert found is not None and torch.equal(third.read_tensors(found, "a.safetensors")["x"], torch.ones(3))
    assert str(tmp_path / "third_cache") in found.path


@pytest.mark.parametrize("command", [["run", "--profile", "tiny"], ["demo"]])
def test_nola_run_and_demo_refuse_a_url_data_root_by_name(command, tmp_path, monkeypatch, capsys):
    """They link or copy folders under a local data root: on a URL root the dataset would never reach
    the store (and the cache's link would let a later mirror write into the user's folder)."""
    folder = copy_demo(tmp_path / "src", DATASET)
    monkeypatch.setenv("NOLA_DATA_ROOT", "s3://some-bucket/data")
    monkeypatch.setenv("NOLA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setattr(nola_assets.cli, "_materialize", lambda *args, **kwargs: 0)  # were the check gone: no run
    assert main([*command, *([str(folder)] if command[0] == "run" else [])]) == 1
    error = capsys.readouterr().err
    assert "NOLA_DATA_ROOT=s3://some-bucket/data is a URL" in error and "s3://some-bucket/data/<dataset name>/" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing linked, copied or started
