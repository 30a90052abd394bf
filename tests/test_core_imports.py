"""Imports go one way: nola_core never imports nola_assets or Dagster, and no module reaches into
another module's private (underscore) names. ARCHITECTURE.md states these rules."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("nola_core", "nola_assets")

CHECK = """
import importlib, pkgutil, sys
import nola_core
names = [m.name for m in pkgutil.walk_packages(nola_core.__path__, "nola_core.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("dagster", "nola_assets"))
assert not leaked, leaked
print(len(names))
"""


def test_nola_core_and_every_submodule_import_without_dagster():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 15  # the walk really found the package's modules


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import in the file, those inside
    functions included; relative imports resolved against the file's package."""
    found = []
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def project_files() -> list[Path]:
    return sorted(p for package in PROJECT for p in (REPO / package).rglob("*.py"))


def test_no_core_file_imports_nola_assets_or_dagster_even_inside_a_function():
    """The subprocess check above sees module-level imports only; this reads every import statement."""
    wrong = [f"{path.relative_to(REPO)}:{line} imports {module}"
             for path in (REPO / "nola_core").rglob("*.py") for line, module, _ in imports(path)
             if module.split(".")[0] in ("nola_assets", "dagster") or module.startswith("dagster_")]
    assert not wrong, wrong


def test_no_module_takes_a_private_name_from_another_project_module():
    """`from nola_core.methods.lafter import _helper` (or `lafter._helper`) couples two modules
    through a name its owner may change freely: what is shared gets a public name in one place."""
    wrong = []
    for path in project_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}  # local name -> project module, for `import nola_core.x as y` / `from nola_core import x`
        for line, module, names in imports(path):
            if module.split(".")[0] not in PROJECT or module == module_name(path):
                continue
            wrong += [f"{path.relative_to(REPO)}:{line} takes {module}.{name}" for name in names
                      if name.startswith("_") and not name.startswith("__")]
            aliases.update({name: f"{module}.{name}" for name in names})
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({a.asname or a.name: a.name for a in node.names if a.name.split(".")[0] in PROJECT})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno} takes {aliases[node.value.id]}.{node.attr}")
    assert not wrong, wrong
