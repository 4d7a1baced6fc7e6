"""The package's layers, checked from its source (the contract the README's Architecture
section draws): no import cycle; only ``mnist_cnn.cli`` parses arguments and nothing imports
it; only the command line imports the benchmark machinery (``mnist_cnn.bench``); the modules a
command needs before it has parsed its arguments import no TensorFlow or Keras; no library
module imports another inside a function (an import placed there to dodge a cycle)."""

import ast
import subprocess
import sys

import pytest
from conftest import REPO

PACKAGE = REPO / "mnist_cnn"
# what `--help`, a usage error and the entry points' start-up need: none may load TensorFlow
LIGHT = {"config", "errors", "interrupts", "files", "cpu", "console", "idx", "space", "sweep_report", "cli",
         "cli.common", "cli.fit", "cli.evaluate", "cli.predict", "cli.export", "cli.serve", "cli.tutorial",
         "cli.bench", "cli.tune"}
HEAVY = ("tensorflow", "keras", "tensorflow_datasets", "h5py", "matplotlib", "jax", "PIL")
# module in mnist_cnn.cli, its main, the installed command
COMMANDS = [("fit", "main", "mnist-cnn-fit"), ("evaluate", "main", "mnist-cnn-evaluate"),
            ("predict", "main", "mnist-cnn-predict"), ("export", "main", "mnist-cnn-export"),
            ("serve", "main", "mnist-cnn-serve"), ("bench", "main", "mnist-cnn-bench"),
            ("tune", "main", "mnist-cnn-tune"),
            ("tutorial", "loop_main", "mnist-cnn-tutorial-loop"), ("tutorial", "conv_main", "mnist-cnn-conv-demo")]


# the README's Architecture table, bottom first: a module imports from its own layer and those below
LAYERS = [
    {"errors", "interrupts", "files", "cpu", "console", "config", "idx", "rundir", "events", "space", "sweep_report"},
    {"dense_gradient", "model", "optimizers", "augment", "data", "distribute"},
    {"keras_file"},
    {"evaluate", "pictures", "callbacks", "export", "runstate", "train", "predict", "tutorial", "warmup", "tune"},
    {"serving", "serving.metrics", "serving.versions", "serving.core", "serving.decode", "serving.tfserving",
     "serving.page", "serving.v2", "serving.connections", "serving.http", "serving.grpc", "serving.server"},
    {"bench", "bench.measure", "bench.levers", "bench.lever_worker", "bench.profile", "bench.report",
     "bench.serving", "bench.attacks", "bench.torch_peer"},
    {"cli", "cli.common", "cli.fit", "cli.evaluate", "cli.predict", "cli.export", "cli.serve", "cli.tutorial",
     "cli.bench", "cli.tune"},
]


def _module_name(path) -> str:
    name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    return name.removesuffix(".__init__").removesuffix("__init__") or "__init__"


def _imported(node, module: str) -> set[str]:
    """The modules an import statement names, package-relative for our own."""
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "mnist_cnn":
            return {alias.name for alias in node.names}
        own = node.module.removeprefix("mnist_cnn.")
        if node.module.startswith("mnist_cnn.") and own in ("cli", "bench", "serving"):  # from mnist_cnn.cli import fit
            return {f"{own}.{alias.name}" for alias in node.names}
        return {own}
    if isinstance(node, ast.Import):
        return {alias.name.removeprefix("mnist_cnn.") for alias in node.names}
    return set()


def module_imports(top_level_only: bool = True) -> dict[str, set[str]]:
    """{module: the modules it imports} -- at import time, or anywhere in it."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else ast.walk(tree)
        graph[_module_name(path)] = set().union(*(_imported(node, _module_name(path)) for node in nodes))
    return graph


def _own(graph, deps) -> set[str]:
    return {m for m in deps if m in graph and m != "__init__"}


def test_the_graph_sees_the_subpackages():
    graph = module_imports()
    assert {"cli.fit", "cli.common", "bench.measure", "bench.report", "train", "idx"} <= set(graph)
    assert "cli.common" in graph["cli.fit"] and "train" in module_imports(top_level_only=False)["cli.fit"]


def test_every_module_is_in_one_layer_and_imports_only_downwards():
    graph = module_imports(top_level_only=False)
    layer_of = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    assert set(layer_of) == set(graph) - {"__init__"}, "a module is missing from LAYERS (and the README's table)"
    for name, deps in graph.items():
        for dep in _own(graph, deps) if name != "__init__" else ():
            assert layer_of[dep] <= layer_of[name], f"{name} (layer {layer_of[name]}) imports {dep} from above"


def test_no_module_imports_itself_through_others():
    graph = module_imports(top_level_only=False)
    own = {name: _own(graph, deps) for name, deps in graph.items()}

    def reaches(start, goal, seen):
        return any(m == goal or (m not in seen and reaches(m, goal, seen | {m})) for m in own.get(start, ()))

    cycles = sorted(name for name in own if name != "__init__" and reaches(name, name, {name}))
    assert not cycles, f"import cycles through: {cycles}"


def test_only_the_command_line_parses_arguments_and_nothing_imports_it():
    graph = module_imports(top_level_only=False)
    for name, deps in graph.items():
        if name.split(".")[0] == "cli":
            continue
        assert "argparse" not in deps, f"{name} parses arguments: that belongs in mnist_cnn.cli"
        assert not {m for m in deps if m.split(".")[0] == "cli"}, f"{name} imports the command line"


def test_training_never_imports_the_benchmark():
    graph = module_imports(top_level_only=False)
    for name, deps in graph.items():
        if name.split(".")[0] not in ("bench", "cli"):
            assert not {m for m in deps if m.split(".")[0] == "bench"}, f"{name} imports mnist_cnn.bench"
    assert not {m for m in graph["bench.report"] if m.split(".")[0] in HEAVY}, "formatting needs no TensorFlow"


def test_the_light_modules_import_nothing_heavy():
    graph = module_imports()
    for name in LIGHT:
        heavy = {m for m in graph[name] if m.split(".")[0] in HEAVY}
        assert not heavy, (name, heavy)
        assert _own(graph, graph[name]) <= LIGHT, (name, _own(graph, graph[name]) - LIGHT)


def test_library_modules_import_each_other_at_the_top():
    """Only the commands import the library late (after parsing, so --help needs no TensorFlow);
    ``__init__`` resolves ``CNN`` lazily for the same reason."""
    top, anywhere = module_imports(), module_imports(top_level_only=False)
    for name in anywhere:
        if name.split(".")[0] != "cli" and name != "__init__":
            late = _own(anywhere, anywhere[name]) - _own(top, top[name])
            assert not late, f"{name} imports {late} inside a function"


@pytest.mark.parametrize(("module", "main", "command"), COMMANDS)
def test_help_and_usage_errors_answer_before_tensorflow_loads(module, main, command):
    code = f"""
import sys
sys.argv[0] = "/venv/bin/{command}"  # as the installed command
from mnist_cnn.cli import {module} as cmd
try:
    cmd.{main}(["--help"])
except SystemExit as e:
    assert e.code == 0
assert cmd.{main}(["--no-such-flag"]) == 2
print("LOADED", sorted(m for m in ("tensorflow", "keras", "PIL") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "LOADED []"
    assert f"usage: {command}" in proc.stdout
    assert proc.stderr.startswith(f"{command}: error: ") and proc.stderr.count("\n") == 1, proc.stderr
