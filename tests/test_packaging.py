"""A non-editable install (a wheel, as in the Docker images) carries everything it reads at run
time, and the core installed without the [dagster] extra runs `nola predict` with no Dagster."""

from __future__ import annotations

import email
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from test_core_cli import export_where_sneaker_wins
from test_core_imports import imports

REPO = Path(__file__).resolve().parents[1]


def _site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(folder), str(REPO)], check=True, capture_output=True)
    return next(folder.glob("nola-*.whl"))


def _bare_venv(wheel: Path, folder: Path) -> Path:
    """A venv (no pip, no system or user site) holding only the wheel; returns its python."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True)
    return python


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOLA_PROMPTS_DIR", "PYTHONPATH")}
    return {**env, "HF_HUB_OFFLINE": "1"}


def test_a_wheel_install_finds_the_prompt_sets_without_the_checkout(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if "/share/nola/prompts/" in n}
    assert shipped == {p.name for p in (REPO / "prompts").iterdir() if p.suffix == ".yaml" or p.name == "README.md"}
    assert "nola_core/text/templates.yaml" in names and "nola_core/models/model_configs/nola-tiny-clip.json" in names
    # The mini world's trained weights and their manifest (ModelConfig.from_profile("mini")).
    assert {f"nola_core/mini/weights/{p.name}" for p in (REPO / "nola_core/mini/weights").iterdir()} <= set(names)

    # Dependencies come from the test's own environment, appended after the wheel (a plain path
    # line, so the editable install's finder in that environment is not activated).
    python = _bare_venv(wheel, tmp_path)
    venv = python.parents[1]
    (_site_packages(venv) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = subprocess.run(
        [str(python), "-c",
         "import nola_core; from nola_core.llm.prompts import find_prompts_dir, load_prompt_set;"
         "print(nola_core.__file__); print(find_prompts_dir()); print(load_prompt_set('nola_v1').hash)"],
        cwd=elsewhere, env=_clean_env(), check=True, capture_output=True, text=True,
    ).stdout.split()
    module, folder = Path(found[0]), Path(found[1])
    assert REPO not in module.parents, module  # the wheel's copy, not the checkout
    assert folder == venv / "share" / "nola" / "prompts"
    assert len(found[2]) >= 16


def core_requirements(wheel: Path) -> list[Requirement]:
    """The wheel's Requires-Dist that apply without any extra: pyproject's core dependencies."""
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        requires = email.message_from_bytes(archive.read(name)).get_all("Requires-Dist")
    return [r for r in map(Requirement, requires) if r.marker is None or r.marker.evaluate({"extra": ""})]


def third_party_imports_of_the_core() -> set[str]:
    """Top-level modules that nola_core imports anywhere (inside functions too), outside the
    standard library, less those of the core's opt-in extras (all but dagster, deploy and dev:
    [onnx], [peers], ...; their module names are their distributions' names)."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    optional = {Requirement(text).name for extra, texts in extras.items() if extra not in ("dagster", "deploy", "dev")
                for text in texts}
    return {module.split(".")[0] for path in (REPO / "nola_core").rglob("*.py") for _, module, _ in imports(path)
            if module.split(".")[0] not in (*sys.stdlib_module_names, "nola_core", *optional)}


def requirement_closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution these requirements pull in, as this environment resolved them (extras of
    the requirements followed, the environment markers evaluated here)."""
    found: set[str] = set()
    pending = [(canonicalize_name(r.name), set(r.extras)) for r in requirements]
    while pending:
        name, extras = pending.pop()
        if name in found:
            continue
        found.add(name)
        for text in metadata.distribution(name).requires or []:
            requirement = Requirement(text)
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in ("", *extras))
            if wanted:
                pending.append((canonicalize_name(requirement.name), set(requirement.extras)))
    return found


def link_distributions(names: set[str], folder: Path) -> None:
    """Symbolic links in `folder` to the top-level files of each installed distribution (its
    packages, modules, shared libraries and dist-info): a site folder that holds only those."""
    folder.mkdir()
    for name in names:
        distribution = metadata.distribution(name)
        assert distribution.files, f"{name}: no RECORD, cannot tell its files"
        for top in {f.parts[0] for f in distribution.files if f.parts[0] not in ("..", "__pycache__")}:
            if not (folder / top).exists():
                (folder / top).symlink_to(distribution.locate_file(top))


@pytest.mark.slow
def test_the_core_alone_runs_nola_predict_without_dagster(wheel, tmp_path):
    """The wheel plus only the distributions its core dependencies pull in (linked from this
    environment): Dagster is not importable, every nola_core module imports and every module the
    core imports inside a function is there, `nola predict` prints the class that must win, and
    `nola run` names the extra to install."""
    closure = requirement_closure(core_requirements(wheel))
    assert "torch" in closure and not any(name.startswith("dagster") for name in closure)
    python = _bare_venv(wheel, tmp_path)
    link_distributions(closure, tmp_path / "core_deps")
    (_site_packages(python.parents[1]) / "core_deps.pth").write_text(str(tmp_path / "core_deps") + "\n")
    export = tmp_path / "export"
    image = export_where_sneaker_wins(export)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=elsewhere, env=_clean_env(), capture_output=True, text=True, timeout=300)

    lazy = sorted(third_party_imports_of_the_core())
    assert {"torch", "duckdb", "open_clip"} <= set(lazy)  # duckdb: imported inside a function only
    imported = run(str(python), "-c", (
        "import importlib, importlib.util, pkgutil, sys, nola_core\n"
        "assert importlib.util.find_spec('dagster') is None, 'dagster is importable'\n"
        f"missing = [m for m in {lazy!r} if importlib.util.find_spec(m) is None]\n"
        "assert not missing, f'not installed: {missing}'\n"
        "names = [m.name for m in pkgutil.walk_packages(nola_core.__path__, 'nola_core.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(len(names), nola_core.__file__)"))
    assert imported.returncode == 0, imported.stderr
    count, module = imported.stdout.split()
    assert int(count) >= 15 and REPO not in Path(module).parents

    nola = str(python.parent / "nola")
    predicted = run(nola, "predict", str(export), str(image), "-k", "2")
    assert predicted.returncode == 0, predicted.stderr
    path, top = predicted.stdout.strip().split("\t")
    assert path == str(image) and top.startswith("sneaker (1.000)")

    without = run(nola, "run", "--profile", "tiny", str(tmp_path))
    assert without.returncode == 1 and "pip install 'nola[dagster]'" in without.stderr
