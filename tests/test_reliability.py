"""Issue 9: faults and restarts lose nothing; secrets and paths stay where they belong.

The input cases (broken images, specs, descriptions) are in test_data.py / test_llm.py, the
pickle refusal in test_security.py; docs/reliability.md lists every case and its test.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nola_core.tuning import RESUME_FILE

CHILD = Path(__file__).with_name("reliability_tuning_child.py")


def _tuning_child(resume: Path | str, out: Path, stall_after: int | None = None) -> subprocess.Popen:
    args = [sys.executable, str(CHILD), str(resume), str(out)] + ([str(stall_after)] if stall_after else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, timeout: float = 240) -> None:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output


def test_sigkill_during_prompt_tuning_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL after epoch 2 of 4 was saved; the rerun trains epochs 3-4 only and ends bit-identical
    to an uninterrupted run with the same seed (CPU, same thread count)."""
    resume = tmp_path / "resume"
    killed = _tuning_child(resume, tmp_path / "killed.safetensors", stall_after=2)
    reference = _tuning_child("-", tmp_path / "reference.safetensors")
    stalled = tmp_path / "killed.safetensors.stalled"
    deadline = time.monotonic() + 240
    while not stalled.exists():  # the child has saved epoch 2 and is about to start epoch 3
        assert killed.poll() is None, killed.communicate()[0]
        assert time.monotonic() < deadline, "the child never reached epoch 2"
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.safetensors").exists()
    saved = torch.load(resume / RESUME_FILE, weights_only=True)
    assert saved["epoch"] == 2 and [s["epoch"] for s in saved["history"]] == [1, 2]
    assert [p.name for p in resume.iterdir()] == [RESUME_FILE]  # no temporary litter

    _finish(_tuning_child(resume, tmp_path / "resumed.safetensors"))
    _finish(reference)
    with safe_open(str(tmp_path / "resumed.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["ran"]) == [3, 4]  # resumed, not restarted
    assert json.loads(metadata["history"]) == [1, 2, 3, 4]
    resumed, uninterrupted = load_file(tmp_path / "resumed.safetensors"), load_file(tmp_path / "reference.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name


def test_a_killed_prompt_tuned_encoder_run_resumes_from_its_content_keyed_state(tmp_path, monkeypatch, caplog):
    """The asset keeps tuning's per-epoch state under its own artifact folder: a run that dies after
    epoch 1 (simulated right after the save) leaves that state and no artifact; the rerun resumes
    after epoch 1, removes the state and stores the same tensors as a run that was never killed."""
    import logging

    from dagster import AssetSelection, DagsterInstance, materialize

    from assets_helpers import TUNING_EPOCHS, copy_demo, resources_for_test
    from nola_assets.assets import NOLA_ASSETS, prompt_tuned_encoder
    from nola_assets.common import RESUME_DIR, TRAINABLE_FILE
    from nola_assets.partitions import DATASETS
    from nola_core import tuning

    assert TUNING_EPOCHS == 2
    copy_demo(tmp_path / "data", "ds")
    resources = resources_for_test(tmp_path / "data", tmp_path / "artifacts")
    store = resources["artifacts"]
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASETS, ["ds"])
    selection = AssetSelection.assets(prompt_tuned_encoder)

    def run(select):
        return materialize(NOLA_ASSETS, selection=select, instance=instance, partition_key="ds",
                           resources=resources, raise_on_error=False)

    save = tuning._save_resume_state

    def save_then_die(folder, fingerprint, epoch, *args):
        save(folder, fingerprint, epoch, *args)
        raise RuntimeError("simulated kill after the epoch-1 save")

    monkeypatch.setattr(tuning, "_save_resume_state", save_then_die)
    assert not run(selection.upstream()).success
    [folder] = (store.root() / "ds" / "prompt_tuned_encoder").iterdir()
    assert not (folder / TRAINABLE_FILE).exists()
    assert torch.load(folder / RESUME_DIR / RESUME_FILE, weights_only=True)["epoch"] == 1
    assert store.load_ref("alignment_checkpoint", "ds") is not None  # earlier artifacts intact

    monkeypatch.setattr(tuning, "_save_resume_state", save)
    with caplog.at_level(logging.INFO, logger="nola_core.tuning"):
        assert run(selection).success
    assert "resuming after epoch 1/2" in caplog.text
    assert not (folder / RESUME_DIR).exists()
    resumed = load_file(folder / TRAINABLE_FILE)

    assert run(selection).success  # nothing to resume any more: a full, uninterrupted tuning
    uninterrupted = load_file(folder / TRAINABLE_FILE)
    assert store.require_ref("prompt_tuned_encoder", "ds").digest == folder.name
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name


# ── atomic artifact writes ─────────────────────────────────────────────────────────────────────


def _full_disk(real_write):
    """A writer that starts the file (when it is given its path), then fails the way a full disk does."""
    import errno

    def write(*args, **kwargs):
        for target in [a for a in list(args) + list(kwargs.values()) if isinstance(a, (str, Path)) and ".tmp" in str(a)]:
            Path(target).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def _writers(store, ref):
    """(name, write version v, monkeypatch target of the low-level writer, read back) per kind of artifact file."""
    import polars as pl

    from nola_core import features as features_module
    from nola_core import tuning as tuning_module
    from nola_core.features import FeatureTable, load_feature_table, save_feature_table
    from nola_assets import artifacts as artifacts_module

    class Trainable(torch.nn.Module):  # stands in for PromptTunedClassifier in save_trainable
        def __init__(self, value):
            super().__init__()
            self.p = torch.nn.Parameter(torch.full((3,), float(value)))

        def trainable_state_dict(self):
            return {"p": self.p.detach().clone()}

    folder = Path(ref.path)
    return [
        ("tensors.safetensors", lambda v: store.write_tensors(ref, "tensors.safetensors", {"x": torch.full((4,), v)}),
         (artifacts_module, "save_file"), lambda: float(store.read_tensors(ref, "tensors.safetensors")["x"][0])),
        ("facts.json", lambda v: store.write_json(ref, "facts.json", {"v": v}),
         (Path, "write_text"), lambda: store.read_json(ref, "facts.json")["v"]),
        ("table.parquet", lambda v: store.write_table(ref, "table.parquet", pl.DataFrame({"v": [v]})),
         (pl.DataFrame, "write_parquet"), lambda: store.read_table(ref, "table.parquet")["v"][0]),
        ("features.safetensors",
         lambda v: save_feature_table(FeatureTable(("a",), torch.full((1, 2), float(v)), ()), folder / "features.safetensors"),
         # fails after the rows are in the temporary file, before its ids and header
         (features_module, "_encode_ids"), lambda: float(load_feature_table(folder / "features.safetensors").features[0, 0])),
        ("trainable.safetensors", lambda v: tuning_module.save_trainable(Trainable(v), folder / "trainable.safetensors"),
         (tuning_module, "save_file"), lambda: float(load_file(folder / "trainable.safetensors")["p"][0])),
    ]


def test_a_full_disk_or_failed_rename_leaves_the_previous_version_and_no_temporary_file(tmp_path, monkeypatch):
    """Every artifact writer (store tensors/JSON/parquet, feature tables, tuned tensors): ENOSPC in
    the middle of the write, or in the rename, keeps the previous complete file, and the folder
    holds nothing else."""
    import errno

    from nola_assets.artifacts import ArtifactStore

    store = ArtifactStore(artifact_root=str(tmp_path / "artifacts"))
    ref = store.allocate("an_asset", "ds", {"k": 1})
    for name, write, (owner, attribute), read in _writers(store, ref):
        write(1)
        assert read() == 1
        with monkeypatch.context() as patch:
            patch.setattr(owner, attribute, _full_disk(getattr(owner, attribute)))
            try:
                write(2)
            except OSError as error:
                assert error.errno == errno.ENOSPC, name
            else:
                raise AssertionError(f"{name}: the simulated full disk did not fail the write")
        assert read() == 1, name

        def failing_replace(src, dst):
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", failing_replace)
            try:
                write(3)
            except OSError:
                pass
            else:
                raise AssertionError(f"{name}: the failing rename did not fail the write")
        assert read() == 1, name
        assert not [p.name for p in Path(ref.path).iterdir() if p.name.startswith(".")], name
    assert sorted(p.name for p in Path(ref.path).iterdir()) == sorted(["key.json"] + [w[0] for w in _writers(store, ref)])


_CONCURRENT_WRITER = """
import sys, torch
from nola_assets.artifacts import ArtifactStore
store = ArtifactStore(artifact_root=sys.argv[1])
value = float(sys.argv[2])
for i in range(int(sys.argv[3])):
    ref = store.allocate("an_asset", "ds", {"k": 1})  # both processes: the same partition and key
    store.write_tensors(ref, "big.safetensors", {"x": torch.full((250_000,), value)})
    store.write_json(ref, "facts.json", {"v": value, "pad": [value] * 2000})
    store.save_ref(ref.with_facts(v=value))
"""


def test_two_runs_of_the_same_partition_never_expose_a_partial_artifact(tmp_path):
    """Two processes write the same key's files (1 MB tensors, JSON, the ref) over and over; a
    reader polling meanwhile always gets a complete file from one writer or the other."""
    from nola_assets.artifacts import ArtifactStore

    root = tmp_path / "artifacts"
    store = ArtifactStore(artifact_root=str(root))
    ref = store.allocate("an_asset", "ds", {"k": 1})
    writers = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_WRITER, str(root), str(v), "15"],
                                stderr=subprocess.PIPE, text=True) for v in (1.0, 2.0)]
    reads = 0
    while any(w.poll() is None for w in writers):
        # The ref is saved last, so once it exists every file it names must be complete.
        loaded = store.load_ref("an_asset", "ds")
        if loaded is not None:
            assert loaded.digest == ref.digest and loaded.facts["v"] in (1.0, 2.0)
            x = store.read_tensors(ref, "big.safetensors")["x"]
            assert x.shape == (250_000,) and float(x[0]) in (1.0, 2.0) and torch.all(x == x[0])
            facts = store.read_json(ref, "facts.json")
            assert len(facts["pad"]) == 2000 and set(facts["pad"]) == {facts["v"]}
            reads += 1
    for writer in writers:
        assert writer.wait() == 0, writer.stderr.read()
    assert reads > 5
    assert not [p.name for p in Path(ref.path).iterdir() if p.name.startswith(".")]


# ── paths stay inside the data root ────────────────────────────────────────────────────────────


def test_dataset_names_from_partitions_the_sensor_or_dataset_yaml_cannot_lead_outside(tmp_path):
    """'..', slashes, NUL or a leading dot in a partition key / dataset name are refused by the data
    resource, the artifact store, dataset.yaml's `name` and `nola run`; a run for such a partition
    fails naming it and writes nothing outside the artifact root."""
    import pytest
    from dagster import DagsterInstance, materialize

    from assets_helpers import copy_demo, resources_for_test
    from nola_assets.assets import dataset_manifest
    from nola_assets.local import register_dataset
    from nola_assets.partitions import DATASETS
    from nola_core.data import DatasetSpecError, load_dataset_spec

    data_root, artifact_root = tmp_path / "root" / "data", tmp_path / "root" / "artifacts"
    copy_demo(data_root, "fine")
    resources = resources_for_test(data_root, artifact_root)
    store, data = resources["artifacts"], resources["data"]
    for bad in ["..", "../fine", "../../etc", "a/b", "a\\b", ".hidden", "", "x\0y", "/etc"]:
        with pytest.raises(DatasetSpecError, match="not a plain folder name"):
            data.dataset_dir(bad)
        with pytest.raises(DatasetSpecError, match="not a plain folder name"):
            store.allocate("dataset_manifest", bad, {})
        with pytest.raises(DatasetSpecError, match="not a plain folder name"):
            store.load_ref("dataset_manifest", bad)
    assert data.spec("fine").name == "fashion_mini"

    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(DATASETS, ["../fine"])
    result = materialize([dataset_manifest], instance=instance, partition_key="../fine", resources=resources,
                         raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "'../fine' is not a plain folder name" in failure.step_failure_data.error.to_string()
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) in (["data"], ["artifacts", "data"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]

    outside = copy_demo(tmp_path / "elsewhere", "escaping")
    spec_file = outside / "dataset.yaml"
    spec_file.write_text(spec_file.read_text(encoding="utf-8").replace("name: fashion_mini", "name: ../../escaped"),
                         encoding="utf-8")
    with pytest.raises(DatasetSpecError, match=r"dataset.yaml: field 'name' '../../escaped' is not a plain folder"):
        load_dataset_spec(outside)
    with pytest.raises(DatasetSpecError):
        register_dataset(instance, outside, data_root)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "root" / "escaped").exists()


def test_a_linked_dataset_folder_keeps_its_paths_inside_its_own_folder(tmp_path):
    """A dataset folder linked into the data root (what `nola run` does) is a dataset, but its
    dataset.yaml and images are confined to its real folder: `descriptions: ../../etc/passwd` or a
    descriptions link to /etc/passwd is refused naming the field, image links leading out of it
    are skipped with a reason; two symlink loops and a dangling link do not stall the sensor."""
    import pytest
    from dagster import DagsterInstance

    from assets_helpers import copy_demo
    from nola_assets.sensors import unlabeled_images_sensor
    from nola_core.data import DatasetSpecError, build_manifest, load_dataset_spec
    from test_sensor import Daemon

    data_root = tmp_path / "data"
    data_root.mkdir()
    real = copy_demo(tmp_path / "elsewhere", "real_folder", labeled=False)
    (data_root / "linked").symlink_to(real, target_is_directory=True)
    secret = tmp_path / "secret.png"
    secret.write_bytes((real / "unlabeled" / sorted(p.name for p in (real / "unlabeled").iterdir())[0]).read_bytes())
    unlabeled = real / "unlabeled"
    (unlabeled / "leak.png").symlink_to(secret)
    (unlabeled / "loop_a").symlink_to(unlabeled, target_is_directory=True)
    (unlabeled / "loop_b").symlink_to(unlabeled, target_is_directory=True)
    (unlabeled / "dangling.png").symlink_to(tmp_path / "gone.png")

    daemon = Daemon(unlabeled_images_sensor, DagsterInstance.ephemeral(), data_root, tmp_path / "artifacts")
    started = time.monotonic()
    result = daemon.tick()
    assert time.monotonic() - started < 30
    assert [r.partition_key for r in result.run_requests] == ["linked"]
    manifest = build_manifest(load_dataset_spec(data_root / "linked"), "unlabeled")
    reasons = {s.path: s.reason for s in manifest.skipped}
    assert "outside the dataset root" in reasons["unlabeled/leak.png"]
    assert "unlabeled/dangling.png" in reasons
    assert not any(r.path.startswith("unlabeled/loop") for r in manifest.records)

    spec_file = real / "dataset.yaml"
    original = spec_file.read_text(encoding="utf-8")
    for value in ["../../etc/passwd", "/etc/passwd", "passwd_link.json"]:
        if value == "passwd_link.json":
            (real / value).symlink_to("/etc/passwd")
        spec_file.write_text(original + f"\ndescriptions: {value}\n", encoding="utf-8")
        with pytest.raises(DatasetSpecError, match="field 'descriptions' points to .*outside the dataset folder"):
            load_dataset_spec(data_root / "linked")


# ── API keys never leave the environment ───────────────────────────────────────────────────────

FAKE_KEY = "sk-ant-api03-TESTSECRET-d41d8cd98f00b204e9800998ecf8427e"


def _serve_llm_from(monkeypatch, server) -> None:
    """Providers made from now on send their requests (the vendors' real clients) to `server`
    through an httpx2 MockTransport and retry once without waiting; the asset's step retry after
    an outage does not wait its 60 s."""
    import httpx2
    from dagster import RetryRequested

    import nola_core.llm as llm
    from nola_assets import text_assets

    real_make_provider = llm.make_provider

    def make_provider(name, **kwargs):
        kwargs.update(http_client=httpx2.Client(transport=httpx2.MockTransport(server)),
                      policy=llm.CallPolicy(max_retries=1, base_delay_s=0.0), sleep=lambda s: None)
        return real_make_provider(name, **kwargs)

    class RetryAtOnce(RetryRequested):
        def __init__(self, max_retries=1, seconds_to_wait=None):
            super().__init__(max_retries=max_retries, seconds_to_wait=0)

    monkeypatch.setattr(llm, "make_provider", make_provider)
    monkeypatch.setattr(text_assets, "RetryRequested", RetryAtOnce)


def test_the_api_key_appears_nowhere_a_run_writes(tmp_path, monkeypatch, capfd, caplog):
    """ANTHROPIC_API_KEY set to a recognisable fake; a Dagster run on a SQLite DAGSTER_HOME gets its
    descriptions from the Anthropic provider (real client, fake transport), then a second run's
    server fails with a 500 and a 401 that echo the key. No file under the artifact root, the
    description cache, DAGSTER_HOME (event log, run storage, compute logs), nor the captured
    output and log records, holds the key or its secret part."""
    import logging

    import httpx2
    from dagster import AssetSelection, DagsterInstance, materialize

    from assets_helpers import copy_demo, resources_for_test
    from nola_assets.assets import NOLA_ASSETS, class_descriptions, predictions
    from nola_assets.partitions import DATASETS
    from nola_assets.resources import DescriptionsResource

    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_KEY)
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    seen_keys = []

    def server(request):
        seen_keys.append(" ".join(request.headers.values()))
        question = json.loads(request.content)["messages"][-1]["content"][-1]["text"]
        if server.fail:
            status = 500 if len(seen_keys) % 2 else 401
            return httpx2.Response(status, json={"type": "error", "error": {
                "type": "authentication_error", "message": f"invalid x-api-key: {FAKE_KEY}"}})
        return httpx2.Response(200, json={
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
            "content": [{"type": "text", "text": f"1. A plain object in a photo ({len(question)}).\n2. Clear edges."}],
            "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}})

    server.fail = False
    _serve_llm_from(monkeypatch, server)
    copy_demo(tmp_path / "data", "ds")
    resources = resources_for_test(tmp_path / "data", tmp_path / "artifacts")
    resources["descriptions"] = DescriptionsResource(descriptions="anthropic", descriptions_count=2,
                                                     descriptions_cache=str(tmp_path / "cache"))
    with DagsterInstance.get() as instance, caplog.at_level(logging.DEBUG):
        instance.add_dynamic_partitions(DATASETS, ["ds"])
        ok = materialize(NOLA_ASSETS, selection=AssetSelection.assets(predictions).upstream(), instance=instance,
                         partition_key="ds", resources=resources)
        assert ok.success
        server.fail = True
        resources["descriptions"] = DescriptionsResource(descriptions="anthropic", descriptions_count=2,
                                                         descriptions_cache=str(tmp_path / "cache2"))
        failed = materialize([class_descriptions], instance=instance, partition_key="ds", resources=resources,
                             raise_on_error=False)
        assert not failed.success
        [failure] = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
        error = failure.step_failure_data.error.to_string()
        assert "LLMError" in error and ("HTTP 401" in error or "HTTP 500" in error) and "***" in error
        logs = [instance.all_logs(run.run_id) for run in instance.get_runs()]
    assert seen_keys and all(FAKE_KEY in headers for headers in seen_keys)  # the key did reach the (fake) vendor
    assert (tmp_path / "artifacts" / "ds" / "prompt_tuned_encoder").is_dir()
    assert list(home.rglob("*.db")) and list((tmp_path / "cache").iterdir())

    secret = "TESTSECRET"
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == []
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err
    assert secret not in caplog.text
    assert secret not in repr([r.__dict__ for r in caplog.records])
    assert sum(map(len, logs)) > 50 and all(secret not in repr(entry) for run_logs in logs for entry in run_logs)


def test_a_rejected_key_fails_the_descriptions_at_once_an_outage_is_retried(tmp_path, monkeypatch):
    """HTTP 401 from the vendor: one request per class, no step retry (waiting cannot fix a key).
    HTTP 503: the provider's own retries, then the asset asks Dagster for a retry of the step."""
    import httpx2
    from dagster import DagsterInstance, materialize

    from assets_helpers import copy_demo, resources_for_test
    from nola_assets.assets import class_descriptions
    from nola_assets.partitions import DATASETS
    from nola_assets.resources import DescriptionsResource

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-not-a-real-key")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    requests = []

    def server(request):
        requests.append(request)
        kind = "authentication_error" if server.status == 401 else "overloaded_error"
        return httpx2.Response(server.status, json={"type": "error", "error": {"type": kind, "message": kind}})

    _serve_llm_from(monkeypatch, server)
    copy_demo(tmp_path / "data", "ds")
    resources = resources_for_test(tmp_path / "data", tmp_path / "artifacts")
    outcome = {}
    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(DATASETS, ["ds"])
        for status in (401, 503):
            server.status, requests[:] = status, []
            resources["descriptions"] = DescriptionsResource(
                descriptions="anthropic", descriptions_count=2, descriptions_cache=str(tmp_path / f"cache{status}"))
            result = materialize([class_descriptions], instance=instance, partition_key="ds",
                                 resources=resources, raise_on_error=False)
            assert not result.success
            events = [e.event_type_value for e in result.all_events]
            asked = collections.Counter(r.content for r in requests)
            outcome[status] = (min(asked.values()), max(asked.values()), events.count("STEP_UP_FOR_RETRY"))
    # (How many classes are asked before the first failure ends the set depends on thread timing.)
    # 401: no request is sent twice and the step is not retried.
    # 503: every request is repeated by the provider (max_retries=1) and the step is tried 1 + 2 times.
    assert outcome[401] == (1, 1, 0)
    fewest, _, step_retries = outcome[503]
    assert fewest >= 2 and step_retries == 2


# ── images that vanish ─────────────────────────────────────────────────────────────────────────


def test_images_deleted_after_the_sensor_tick_or_the_manifest_are_reported_and_the_run_goes_on(tmp_path):
    """One image is deleted after the sensor tick that requested the run: the run's manifest is
    rebuilt without it. Another is deleted after the manifest was materialized: the feature assets
    report it (`unreadable`, `unreadable_ids`) and the rest of the graph, through prompt tuning,
    still materializes without it."""
    from dagster import AssetKey, AssetSelection, DagsterInstance, materialize

    from assets_helpers import copy_demo, resources_for_test
    from nola_assets.assets import NOLA_ASSETS, dataset_manifest, prompt_tuned_encoder
    from nola_assets.common import PSEUDO_LABELS_FILE
    from nola_assets.datasets import load_manifests
    from nola_assets.sensors import unlabeled_images_sensor
    from test_sensor import Daemon

    copy_demo(tmp_path / "data", "ds", labeled=False)
    resources = resources_for_test(tmp_path / "data", tmp_path / "artifacts")
    store = resources["artifacts"]
    instance = DagsterInstance.ephemeral()
    daemon = Daemon(unlabeled_images_sensor, instance, tmp_path / "data", tmp_path / "artifacts")
    [request] = daemon.tick().run_requests
    images = sorted((tmp_path / "data" / "ds" / "unlabeled").rglob("*.png"))
    assert len(images) > 10 and int(request.tags["nola/images"]) == len(images)
    images[0].unlink()  # between the tick and the run

    first = materialize(NOLA_ASSETS, selection=AssetSelection.assets(dataset_manifest), instance=instance,
                        partition_key=request.partition_key, resources=resources, tags=request.tags)
    assert first.success
    unlabeled, _ = load_manifests(store, store.require_ref("dataset_manifest", "ds"))
    paths = [r.path for r in unlabeled.records]
    assert len(paths) == len(images) - 1 and images[0].relative_to(tmp_path / "data" / "ds").as_posix() not in paths
    [event] = first.get_asset_materialization_events()
    assert event.materialization.metadata["gone_since_sensor_tick"].value == 1  # reported, not silent
    logs = [entry.user_message for entry in instance.all_logs(first.run_id)]
    assert any("counted at the sensor tick are gone" in message for message in logs)
    gone = next(r for r in unlabeled.records if (tmp_path / "data" / "ds" / r.path) == images[1])
    images[1].unlink()  # between the manifest and the features

    rest = AssetSelection.assets(prompt_tuned_encoder).upstream() - AssetSelection.assets(dataset_manifest)
    second = materialize(NOLA_ASSETS, selection=rest, instance=instance, partition_key="ds", resources=resources,
                         tags=request.tags)
    assert second.success
    for asset in ("clip_features", "dino_features"):
        [event] = [e for e in second.get_asset_materialization_events() if e.asset_key == AssetKey(asset)]
        metadata = {k: v.value for k, v in event.materialization.metadata.items()}
        assert metadata["unreadable"] == 1 and metadata["unreadable_ids"] == [gone.image_id], asset
        assert metadata["images"] == len(images) - 2  # features of the images still there
    pseudo = store.read_table(store.require_ref("cde_pseudo_labels", "ds"), PSEUDO_LABELS_FILE)
    assert len(pseudo) > 0
    assert store.require_ref("prompt_tuned_encoder", "ds") is not None


def test_an_empty_answer_for_one_class_fails_naming_that_class_and_keeps_the_others(tmp_path):
    """A plain empty answer (not a refusal) for one class: DescriptionError naming it; the other
    class's answers are cached, so a rerun asks only for the failed one."""
    import pytest

    from nola_core.llm import DescriptionError, describe_classes
    from test_llm import ANSWER, FakeAPI, class_in, good_answer, provider

    def respond(request, n):
        return ANSWER["anthropic"]("" if class_in(request) == "bag" else good_answer(request))

    api = FakeAPI(respond)
    with pytest.raises(DescriptionError, match=r"class 'bag'.*no usable description"):
        describe_classes(["sneaker", "bag"], provider=provider("anthropic", api), count=2, cache_dir=tmp_path)
    fixed = FakeAPI(lambda request, n: ANSWER["anthropic"](good_answer(request)))
    result = describe_classes(["sneaker", "bag"], provider=provider("anthropic", fixed), count=2, cache_dir=tmp_path)
    assert fixed.asked_classes() == {"bag"} and all(result.descriptions.values())
