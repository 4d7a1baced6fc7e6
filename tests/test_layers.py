"""The package's layers, checked from its source: no import cycle between its modules, and the
modules a command needs before it has parsed its arguments import no TensorFlow or Keras."""

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "mnist_cnn"
# what `--help`, a usage error and the entry points' start-up need: none may load TensorFlow
LIGHT = {"cli", "config", "errors", "cpu", "quiet", "console", "idx"}
HEAVY = ("tensorflow", "keras", "tensorflow_datasets", "h5py", "matplotlib")


def module_imports() -> dict[str, set[str]]:
    """{module: the modules it imports at import time} (imports inside functions run later)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        name, found = path.stem, set()
        for node in ast.parse(path.read_text()).body:  # top level only
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "mnist_cnn":
                    found |= {alias.name for alias in node.names}
                else:
                    found.add(node.module.removeprefix("mnist_cnn."))
            elif isinstance(node, ast.Import):
                found |= {alias.name.removeprefix("mnist_cnn.") for alias in node.names}
        graph[name] = found
    return graph


def test_no_module_imports_itself_through_others():
    graph = module_imports()
    own = {name: {m for m in deps if m in graph and m != "__init__"} for name, deps in graph.items()}

    def reaches(start, goal, seen):
        return any(m == goal or (m not in seen and reaches(m, goal, seen | {m})) for m in own.get(start, ()))

    cycles = sorted(name for name in own if name != "__init__" and reaches(name, name, {name}))
    assert not cycles, f"import cycles through: {cycles}"


def test_the_light_modules_import_nothing_heavy():
    graph = module_imports()
    for name in LIGHT:
        heavy = {m for m in graph[name] if m.split(".")[0] in HEAVY}
        assert not heavy, (name, heavy)
        assert graph[name] & set(graph) <= LIGHT, (name, graph[name] & set(graph) - LIGHT)


def test_help_and_usage_errors_answer_before_tensorflow_loads():
    code = """
import sys
sys.argv[0] = "/venv/bin/mnist-cnn-fit"  # as the installed command
from mnist_cnn import cli
try:
    cli.fit_main(["--help"])
except SystemExit as e:
    assert e.code == 0
assert cli.fit_main(["--epochs", "0"]) == 2
print("LOADED", sorted(m for m in ("tensorflow", "keras") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "LOADED []"
    assert "usage: mnist-cnn-fit" in proc.stdout and "mnist-cnn-fit: error: argument --epochs" in proc.stderr
