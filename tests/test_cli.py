"""The command line: every option declared once (on TrainConfig), parsed once, the same
errors and exit codes for every entry point, and a README that lists every flag."""

import dataclasses
import gc
import importlib.metadata
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import REPO

from mnist_cnn.cli import bench as bench_cli
from mnist_cnn.cli import common
from mnist_cnn.cli import evaluate as evaluate_cli
from mnist_cnn.cli import export as export_cli
from mnist_cnn.cli import fit as fit_cli
from mnist_cnn.cli import predict as predict_cli
from mnist_cnn.cli import serve as serve_cli
from mnist_cnn.cli import tune as tune_cli
from mnist_cnn.cli import tutorial as tutorial_cli
from mnist_cnn.config import RECIPES, TrainConfig
from mnist_cnn.errors import UsageError

MAINS = {
    "fit.py": fit_cli.main,
    "evaluate.py": evaluate_cli.main,
    "predict.py": predict_cli.main,
    "export.py": export_cli.main,
    "bench.py": bench_cli.main,
    "serve.py": serve_cli.main,
    "tune.py": tune_cli.main,
    "conv_demo.py": tutorial_cli.conv_main,
    "reshape_demo.py": tutorial_cli.reshape_main,
    "tutorial_loop.py": tutorial_cli.loop_main,
}


def fit_help() -> str:
    return fit_cli.parser().format_help()


def test_every_config_field_is_a_flag_with_its_help_and_default():
    text = fit_help()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f.metadata["help"], f"{f.name} has no help text"
    flat = re.sub(r"\s+", " ", text)  # the defaults a user reads are the notebook's numbers
    for flag, default in (("--epochs N", "5"), ("--batch-size N", "50"), ("--learning-rate X", "0.001"),
                          ("--seed N", "0"), ("--recipe", "tutorial"), ("--progress", "auto")):
        assert re.search(re.escape(flag) + r" .*?\(default: " + re.escape(default) + r"\)", flat), flag


@pytest.mark.parametrize("script, argv", [(s, ["--bogus"]) for s in MAINS])
def test_every_script_answers_an_unknown_flag_in_one_line(script, argv, capsys):
    needs = {"evaluate.py": ["m.keras"], "predict.py": ["m.keras", "x.png"], "export.py": ["m.keras", "out"],
             "serve.py": ["m.keras"]}
    assert MAINS[script](needs.get(script, []) + argv) == 2
    assert capsys.readouterr().err == f"{script}: error: unrecognized arguments: --bogus\n"


def test_every_script_is_an_installed_entry_point():
    entry_points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    targets = set(entry_points.values())
    for script in sorted((REPO / "scripts").glob("*.py")):
        imported = re.search(r"^from (mnist_cnn\.cli\.\w+) import (\w+)", script.read_text(), re.M)
        assert imported, f"{script.name} does not call one function of the package"
        assert f"{imported.group(1)}:{imported.group(2)}" in targets, f"{script.name} has no mnist-cnn-* entry point"
        assert script.name in MAINS
    assert len(targets) == len(MAINS)


def test_the_options_page_lists_exactly_the_flags_of_fit_help():
    page = (REPO / "docs" / "options.md").read_text()
    table = page[page.index("## Training options"):]
    in_readme = set(re.findall(r"^\| `(--[a-z-]+)", table, re.M))
    in_help = set(re.findall(r"^  (--[a-z-]+)", fit_help(), re.M)) - {"--help"}
    in_help = {flag.replace("--no-", "--") for flag in in_help}
    assert in_readme == in_help


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dropout": 1.0}, "--dropout must be in [0.0, 1.0), got 1.0"),
        ({"dropout": -0.1}, "--dropout must be in [0.0, 1.0), got -0.1"),
        ({"lr_schedule": "linear"}, "--lr-schedule must be one of constant, cosine, got 'linear'"),
        ({"run_name": "a/b"}, "--run-name must be a plain folder name (no slash or control character), got 'a/b'"),
        ({"run_name": ".."}, "--run-name must be a plain folder name (no slash or control character), got '..'"),
        ({"run_name": "x\ny"}, "--run-name must be a plain folder name (no slash or control character), got 'x\\ny'"),
        ({"strategy": "multiworker", "run_name": "x", "export": "out"}, "--export is not available with --strategy"),
        ({"strategy": "multiworker"}, "--strategy multiworker needs --run-name"),
        ({"strategy": "all"}, "--strategy must be one of auto, one, mirrored, multiworker"),
        ({"jit_compile": "yes"}, "--jit-compile must be one of auto, on, off"),
        ({"profile_batch": "5,2"}, "--profile-batch must be A or A,B with 1 <= A <= B"),
        ({"epochs": 0}, "--epochs must be positive, got 0"),
        ({"learning_rate": 0.0}, "--learning-rate must be positive, got 0.0"),
        ({"seed": 2**32}, "--seed must be in [0, 4294967295], got 4294967296"),
        ({"learning_rate": float("nan")}, "--learning-rate must be a finite number, got nan"),
        ({"learning_rate": float("inf")}, "--learning-rate must be a finite number, got inf"),
        ({"dropout": float("nan")}, "--dropout must be a finite number, got nan"),
    ],
)
def test_validate_refuses_what_the_flags_refuse(overrides, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        TrainConfig(**overrides).validate()


def test_parsing_keeps_typed_flags_apart_from_defaults():
    config, resume = fit_cli.parse_args(["--epochs", "5", "--recipe", "best"])
    assert config.epochs == 5 and config.augment is True and not resume  # typed 5 wins over best's 20
    assert fit_cli.parse_args([])[0] == TrainConfig()


def test_the_recipes_are_three_and_an_unknown_one_is_one_line(capsys):
    assert set(RECIPES) == {"tutorial", "best", "fast"}
    assert fit_cli.main(["--recipe", "seed"]) == 2  # a 0.1 package keeps no old names
    assert "argument --recipe: invalid choice: 'seed'" in capsys.readouterr().err


def test_resume_and_dry_run_do_not_mix(capsys):
    assert fit_cli.main(["--resume", "x", "--dry-run"]) == 2
    assert capsys.readouterr().err == "fit.py: error: --dry-run cannot be combined with --resume\n"


def readme_command(path, marker: str) -> str:
    text = path.read_text()
    block = text[text.index(f"<!-- {marker} -->"):]
    return block.split("```bash\n", 1)[1].split("```", 1)[0].strip()


@pytest.mark.parametrize("marker", ["main command", "test command"])
def test_the_chinese_readme_gives_the_same_two_commands(marker):
    english, chinese = REPO / "README.md", REPO / "README.zh-CN.md"
    assert readme_command(chinese, marker) == readme_command(english, marker)
    assert "README.zh-CN.md" in english.read_text().split("\n## ")[0]  # linked from the top


def test_the_declared_floors_are_the_ones_the_floor_check_installs():
    """pyproject.toml's lower bounds and .ci/floors.txt's pins (what .ci/check-floors tests) agree."""
    declared = {}
    for requirement in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, _, rest = requirement.partition(">=")
        declared[name.strip()] = rest.split(",")[0].strip()
    pinned = dict(line.split("==") for line in (REPO / ".ci" / "floors.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    for name in ("tensorflow", "keras", "tensorboard", "tensorflow-datasets", "numpy"):
        assert pinned[name].startswith(declared[name]), (name, declared[name], pinned[name])


def test_tensorflow_starts_without_ml_dtypes_0_7_0():
    """ml_dtypes (TensorFlow's NumPy bfloat16 and float8 types) 0.7.0 spends ~0.55 CPU-s adding its NumPy
    loops whenever TensorFlow is imported: a quarter of every command's start-up (0.6.0 takes 8 ms).
    pyproject.toml excludes that release, and this environment was installed from it."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "ml_dtypes!=0.7.0" in dependencies
    assert importlib.metadata.version("ml_dtypes") != "0.7.0"


def test_a_command_loads_tensorflow_with_the_garbage_collector_paused_then_freezes_what_loaded(monkeypatch):
    """As a command starts (no TensorFlow yet): no collector passes during the import, everything it made
    frozen after, the collector back on. Where TensorFlow is loaded already (this process): nothing changes."""
    frozen = gc.get_freeze_count()
    with common.loading_tensorflow():
        assert gc.isenabled()
    assert gc.get_freeze_count() == frozen

    monkeypatch.delitem(sys.modules, "tensorflow")  # as in a command's process, before its import
    try:
        with common.loading_tensorflow():
            assert not gc.isenabled()
        assert gc.isenabled() and gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()  # this worker's objects back under the collector


# -- installed commands: they name themselves, quote what they tell you to paste, end quietly ----------

def installed(name: str) -> Path:
    path = Path(sys.executable).parent / name  # pip puts the mnist-cnn-* commands beside the interpreter
    if not path.exists():
        pytest.skip(f"{name} is not installed beside {sys.executable} (pip install -e .)")
    return path


def test_an_installed_command_names_itself_in_usage_lines_and_errors(tmp_path):
    proc = subprocess.run([installed("mnist-cnn-fit"), "--epochs", "0"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == "mnist-cnn-fit: error: argument --epochs: must be positive, got 0"
    proc = subprocess.run([installed("mnist-cnn-predict"), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: mnist-cnn-predict ")


def test_the_resume_hint_is_the_command_the_user_ran_shell_quoted(monkeypatch):
    awkward = "/tmp/my logs/run\nnamed; rm -rf ~"
    for argv0, head in (("/venv/bin/mnist-cnn-fit", ["mnist-cnn-fit"]),
                        ("scripts/fit.py", ["python", "scripts/fit.py"]),
                        ("-c", ["mnist-cnn-fit"])):  # from Python: the installed command
        monkeypatch.setattr(sys, "argv", [argv0])
        hint = common.resume_hint(awkward)
        assert hint.startswith("resume with: ")
        assert shlex.split(hint.removeprefix("resume with: ")) == [*head, "--resume", awkward]


def test_a_closed_pipe_ends_quietly():
    """`mnist-cnn-... | head -1`: the reader goes away before we write; no traceback, status 141."""
    proc = subprocess.Popen([installed("mnist-cnn-reshape-demo")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141), err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


@pytest.mark.parametrize("argv", [["--learning-rate", "nan"], ["--learning-rate", "inf"], ["--dropout", "nan"]])
def test_non_finite_numbers_are_refused_before_a_run_folder_exists(argv, tmp_path, capsys):
    assert fit_cli.main([*argv, "--data", "sample", "--logdir", str(tmp_path / "logs")]) == 2
    assert "must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_evaluate_top_must_be_a_count(capsys):
    assert evaluate_cli.main(["m.keras", "--top", "-3"]) == 2
    assert "argument --top: expected a whole number from 0, got '-3'" in capsys.readouterr().err
