"""A non-editable install (a wheel, as in the Docker images) carries everything it reads at run time."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


def test_a_wheel_install_finds_the_prompt_sets_without_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(REPO)], check=True, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("nola-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if "/share/nola/prompts/" in n}
    assert shipped == {p.name for p in (REPO / "prompts").iterdir() if p.suffix == ".yaml" or p.name == "README.md"}
    assert "nola_core/text/templates.yaml" in names and "nola_core/models/model_configs/nola-tiny-clip.json" in names
    # The mini world's trained weights and their manifest (ModelConfig.from_profile("mini")).
    assert {f"nola_core/mini/weights/{p.name}" for p in (REPO / "nola_core/mini/weights").iterdir()} <= set(names)

    # A bare environment with only the wheel; its dependencies come from the test's own
    # environment, appended after the wheel (a plain path line, so the editable install's
    # finder in that environment is not activated).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True)
    (_site_packages(venv) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("NOLA_PROMPTS_DIR", "PYTHONPATH")}
    found = subprocess.run(
        [str(python), "-c",
         "import nola_core; from nola_core.llm.prompts import find_prompts_dir, load_prompt_set;"
         "print(nola_core.__file__); print(find_prompts_dir()); print(load_prompt_set('nola_v1').hash)"],
        cwd=elsewhere, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()
    module, folder = Path(found[0]), Path(found[1])
    assert REPO not in module.parents, module  # the wheel's copy, not the checkout
    assert folder == venv / "share" / "nola" / "prompts"
    assert len(found[2]) >= 16
