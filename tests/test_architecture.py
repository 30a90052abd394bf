"""ARCHITECTURE.md stays true: it names every module of nola_core and nola_assets (and only modules
that exist), and no nola_core module imports a layer above its own, as the file assigns them."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")
LAYERS = ("pieces", "stages", "methods", "edges")  # bottom to top, as the `### nola_core: <layer>` headings


def test_architecture_names_every_module_and_no_other():
    named = set(re.findall(r"`((?:nola_core|nola_assets)/[\w/]+\.py)`", ARCHITECTURE))
    present = {path.relative_to(REPO).as_posix() for package in ("nola_core", "nola_assets")
               for path in (REPO / package).rglob("*.py") if path.name != "__init__.py"}
    assert not present - named, f"add a line to ARCHITECTURE.md for: {sorted(present - named)}"
    assert not named - present, f"ARCHITECTURE.md names modules that are gone: {sorted(named - present)}"


def core_layers() -> dict[str, int]:
    """Dotted module name -> index in LAYERS, from the headings the module's line is under."""
    layer, layers = None, {}
    for line in ARCHITECTURE.splitlines():
        if line.startswith("### "):
            heading = re.fullmatch(r"### nola_core: (\w+)", line)
            layer = LAYERS.index(heading.group(1)) if heading else None
        elif layer is not None:
            layers.update({path[:-3].replace("/", "."): layer for path in re.findall(r"`(nola_core/[\w/]+\.py)`", line)})
    return layers


def core_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of every nola_core import that runs (inside functions too; not those
    under `if TYPE_CHECKING:`, which are annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    annotations_only = {id(inner) for node in ast.walk(tree)
                        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                        for statement in node.body for inner in ast.walk(statement)}
    found = []
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "nola_core":
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names if alias.name.split(".")[0] == "nola_core"]
    return found


def layer_of(module: str, name: str | None, layers: dict[str, int]) -> int | None:
    """The layer an import reaches: the module's own, or for a package (`from nola_core.data import
    X`) the highest layer its __init__ imports from."""
    for candidate in ([f"{module}.{name}"] if name else []) + [module]:
        if candidate in layers:
            return layers[candidate]
        init = REPO / candidate.replace(".", "/") / "__init__.py"
        if init.is_file():
            reached = [layer_of(m, n, layers) for _, m, n in core_imports(init)]
            return max((layer for layer in reached if layer is not None), default=0)
    return None


def test_no_core_module_imports_a_layer_above_its_own():
    layers = core_layers()
    assert set(LAYERS) == {LAYERS[i] for i in layers.values()}  # every heading found, with modules under it
    wrong = []
    for module, layer in layers.items():
        for line, imported, name in core_imports(REPO / (module.replace(".", "/") + ".py")):
            reached = layer_of(imported, name, layers)
            if reached is not None and reached > layer:
                wrong.append(f"{module} ({LAYERS[layer]}), line {line}: imports {imported} ({LAYERS[reached]})")
    assert not wrong, wrong
