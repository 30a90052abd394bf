"""Every `nola` command the README shows, run as written, in order, in an empty folder: a fresh
clone's user types `nola demo`, then `nola report`, `nola export`, `nola predict`, with no
environment variable pointing anywhere (only the epoch counts are cut, through the NOLA_*
variables the commands read, to keep the test short)."""

import os
import re
import shlex
from pathlib import Path

import pytest

from nola_core.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
PREFIX = ".venv/bin/nola "
LOCATIONS = ("DAGSTER_HOME", "NOLA_DATA_ROOT", "NOLA_ARTIFACT_ROOT", "NOLA_EVALUATION_ROOT", "NOLA_MODEL_PROFILE")


def readme_commands() -> list[list[str]]:
    """The argv of every `.venv/bin/nola ...` line of the README's bash blocks, in README order."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line[len(PREFIX):]) for line in lines if line.startswith(PREFIX)]


@pytest.fixture
def fresh_folder(tmp_path, monkeypatch):
    """An empty working directory and the defaults of every location (set then deleted, so that
    what the CLI exports, e.g. DAGSTER_HOME, is undone after the test)."""
    monkeypatch.chdir(tmp_path)
    for name in LOCATIONS:
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setenv("NOLA_TUNING_EPOCHS", "1")
    monkeypatch.setenv("NOLA_ALIGNMENT_EPOCHS", "1")
    monkeypatch.setenv("NOLA_NUM_WORKERS", "0")
    return tmp_path


@pytest.mark.slow  # the whole demo (every method), about a minute on 2 busy cores
def test_the_readme_commands_run_in_order_from_an_empty_folder(fresh_folder, capsys):
    commands = readme_commands()
    subcommands = [argv[0] for argv in commands]
    assert subcommands == ["demo", "report", "export", "predict"], subcommands
    outputs = {}
    for argv in commands:
        status = main(argv)
        captured = capsys.readouterr()
        assert status == 0, f"`nola {shlex.join(argv)}` exited {status}:\n{captured.err[-2000:]}"
        outputs[argv[0]] = captured.out

    assert (fresh_folder / "artifacts" / "evaluation").is_dir()  # the store's default, in the working folder
    assert "nola" in outputs["report"].splitlines()[0]  # the methods' header row
    assert (fresh_folder / "artifacts" / "evaluation" / "report.md").is_file()
    export_dir = fresh_folder / commands[2][commands[2].index("--to") + 1]
    assert (export_dir / "classifier.json").is_file()
    images = commands[3][2:]
    predicted = outputs["predict"].strip().splitlines()
    assert [line.split("\t")[0] for line in predicted] == images  # one line per image, in order


@pytest.mark.parametrize("artifact_root", [None, "store"])
def test_report_reads_where_the_artifact_store_writes(fresh_folder, monkeypatch, artifact_root):
    from nola_assets.artifacts import ArtifactStore
    from nola_assets.result_assets import evaluation_root
    from nola_core.report import default_evaluation_root

    if artifact_root is not None:
        monkeypatch.setenv("NOLA_ARTIFACT_ROOT", artifact_root)
    assert default_evaluation_root(os.environ) == evaluation_root(ArtifactStore())
    monkeypatch.setenv("NOLA_EVALUATION_ROOT", "elsewhere")
    assert default_evaluation_root(os.environ) == fresh_folder / "elsewhere"
