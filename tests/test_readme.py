"""The README's commands and Python example are what the project really runs."""

import re
from pathlib import Path

import polars as pl

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_python_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (example,) = _blocks("python")
    exec(compile(example, str(README), "exec"), {"__name__": "readme_example"})
    predictions = pl.read_parquet(tmp_path / "predictions.parquet")
    assert predictions.height == 120
    assert set(predictions["predicted_class"]) <= {"t-shirt", "trouser", "sneaker", "bag"}


def test_ci_runs_exactly_the_readme_setup_and_test_commands():
    setup, _main, test = (block.strip() for block in _blocks("bash")[:3])
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert setup in ci and test in ci
    assert "|| true" not in ci and "pytest" in test
