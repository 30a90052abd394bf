import subprocess
import sys

CHECK = """
import importlib, pkgutil, sys
import nola_core
names = [m.name for m in pkgutil.walk_packages(nola_core.__path__, "nola_core.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m == "dagster" or m.startswith("dagster."))
assert not leaked, leaked
print(len(names))
"""


def test_nola_core_and_every_submodule_import_without_dagster():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 15  # the walk really found the package's modules
