"""The environment is read at the edges only (issue 15, item 5): the CLI, the `python -m
nola_core.jobs` command, torchrun's variables in `distributed`, and the Dagster resources pass
what they read down as arguments. Core functions never read `os.environ` themselves, so what a
function does depends on its arguments alone."""

import ast
from pathlib import Path

import nola_core

CORE = Path(nola_core.__file__).resolve().parent
ALLOWED = {
    ("cli.py", "*"): "the core CLI is an edge",
    ("jobs.py", "_features_command"): "`python -m nola_core.jobs features` is an edge",
    ("distributed.py", "init_distributed"): "torchrun's WORLD_SIZE/RANK/LOCAL_RANK/LOCAL_WORLD_SIZE",
    ("distributed.py", "_launched"): "sets torchrun's variables in a spawned child, for init_distributed",
    ("llm/providers.py", "_key_from_env"): "API keys, by the vendor SDKs' convention",
    ("llm/providers.py", "provider_from_env"): "API keys, by the vendor SDKs' convention",
}
SKIPPED = ("mini/",)  # nola_core.mini: the training scripts of the bundled mini models


def environment_reads(source: str) -> list[tuple[str, int]]:
    """(enclosing top-level function or class, line) of every `os.environ`, `os.getenv`,
    `os.environb` and `from os import environ/getenv` in `source`."""
    found = []

    def visit(node: ast.AST, owner: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = owner
            if owner == "<module>" and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = child.name
            if (isinstance(child, ast.Attribute) and child.attr in ("environ", "environb", "getenv", "putenv")
                    and isinstance(child.value, ast.Name) and child.value.id == "os"):
                found.append((name, child.lineno))
            if isinstance(child, ast.ImportFrom) and child.module == "os" and any(
                    alias.name in ("environ", "environb", "getenv") for alias in child.names):
                found.append((name, child.lineno))
            visit(child, name)

    visit(ast.parse(source), "<module>")
    return found


def test_the_scan_sees_every_form_of_reading_the_environment():
    source = ("import os\nfrom os import environ\nX = os.getenv('A')\n"
              "def f():\n    return os.environ.get('B')\nclass C:\n    def g(self):\n        return os.environ['C']\n")
    assert environment_reads(source) == [("<module>", 2), ("<module>", 3), ("f", 5), ("C", 8)]


def test_nola_core_reads_the_environment_only_at_its_edges():
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        relative = path.relative_to(CORE).as_posix()
        if relative.startswith(SKIPPED):
            continue
        for owner, line in environment_reads(path.read_text(encoding="utf-8")):
            if (relative, "*") not in ALLOWED and (relative, owner) not in ALLOWED:
                offenders.append(f"nola_core/{relative}:{line} ({owner})")
    assert offenders == [], (
        "read the variable at an edge (nola_core/cli.py, nola_assets/resources.py env_field) and pass it "
        f"down as an argument: {offenders}")


def test_the_descriptions_resource_passes_nola_prompts_dir_down(tmp_path, monkeypatch):
    """The Dagster edge: NOLA_PROMPTS_DIR reaches `describe_classes` as `prompts_dir`."""
    from nola_core.data import load_dataset_spec
    from nola_core.demo import demo_dataset_path

    from nola_assets.resources import DescriptionsResource

    (tmp_path / "set_v1.yaml").write_text("name: set_v1\ntemplates: ['a {c}, from the folder.']\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NOLA_PROMPTS_DIR", str(tmp_path))
    resource = DescriptionsResource(descriptions="templates", prompt_set="set_v1")
    descriptions, _ = resource.describe(load_dataset_spec(demo_dataset_path()))
    assert descriptions["bag"] == ["a bag, from the folder."]
