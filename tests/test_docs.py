"""Every ```python and ```bash block of README.md and docs/*.md runs as written: each in a fresh
process, in an empty folder (the README's main command in the checkout, where it says to run it;
a block marked as running after the one above, in that block's folder),
with this environment's interpreter and mnist-cnn-* commands first on the PATH. The README's test
command is this suite itself (CI runs it through .ci/run); it is checked to be the one .ci/run reads."""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>python|bash)\n(?P<code>.*?)^(?P=indent)```$", re.M | re.S)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "README.zh-CN.md"]


def default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the suite may run with SIGINT ignored


AFTER = "<!-- runs after the block above, in its folder -->"


def blocks():
    """One param per block, or per chain: a block marked AFTER runs after the block above, in the
    same folder (the doc says so in words too)."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for n, match in enumerate(FENCE.finditer(text), 1):
            marker = text[:match.start()].rstrip().rsplit("\n", 1)[-1].strip()
            if marker == "<!-- test command -->" or (marker == "<!-- main command -->" and path.name != "README.md"):
                continue  # the suite itself (see below); the Chinese README's are the English ones (test_cli)
            step = (match["lang"], textwrap.dedent(match["code"]))
            if marker == AFTER:
                above = found.pop()
                assert above.values[0] == path, f"{path.name}: its first block cannot run after another"
                _, chain, first = above.values
                found.append(pytest.param(path, [*chain, step], first, id=f"{above.id}+{n}-{match['lang']}"))
            else:
                found.append(pytest.param(path, [step], marker, id=f"{path.relative_to(REPO)}#{n}-{match['lang']}"))
    return found


def test_every_doc_is_reached_from_the_readme():
    readme = (REPO / "README.md").read_text()
    for path in DOCS[1:-1]:
        assert f"(docs/{path.name})" in readme, f"{path.name} is not linked from the README"
    assert len(readme.splitlines()) <= 200, "the README is a front page"


def test_the_readme_test_command_is_what_ci_runs():
    ci = subprocess.run(["awk", '/<!-- test command -->/ {found=1; next} found && /^```bash/ {inblock=1; next} '
                         'inblock && /^```/ {exit} inblock {print}', "README.md"], cwd=REPO, capture_output=True,
                        text=True, check=True).stdout.strip()
    assert "python -m pytest" in ci and ci.startswith("python3 -m venv .venv")


@pytest.fixture(scope="module")
def module_fixture():
    return object()


def test_tests_that_share_a_module_fixture_share_a_worker(request, module_fixture):
    """The test command spreads tests over workers one by one, except those sharing a module or
    session fixture (a trained run): conftest groups them, or each worker would train it again. With
    pytest 9.2 and xdist 3.8 the grouping was silently ignored (pytest-dev/pytest-xdist#1386), and
    without tryfirst conftest's marks came after xdist had read them."""
    assert [m.args for m in request.node.iter_markers("xdist_group")] == [("test_docs",)]
    if getattr(request.config.option, "loadgroup", False):  # on an xdist worker of --dist loadgroup
        assert request.node.nodeid.endswith("@test_docs"), request.node.nodeid


@pytest.mark.parametrize("path, steps, marker", blocks())
def test_a_block_runs_as_written(path, steps, marker, tmp_path):
    venv_bin = str(Path(sys.executable).parent)
    others = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    if marker == "<!-- main command -->":  # a newcomer's shell in the checkout: it makes and activates .venv
        env, cwd = {**os.environ, "PATH": os.pathsep.join(others)}, REPO
    else:  # a shell where the package is installed
        env, cwd = {**os.environ, "PATH": os.pathsep.join([venv_bin, *others])}, tmp_path
    env.pop("VIRTUAL_ENV", None)
    before = set((REPO / "logs").iterdir()) if (REPO / "logs").is_dir() else set()
    try:
        for lang, code in steps:
            argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
            proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                                  preexec_fn=default_sigint)
            assert proc.returncode == 0, f"{path.name}:\n{code}\n--- stdout\n{proc.stdout[-3000:]}\n--- " \
                                         f"stderr\n{proc.stderr[-3000:]}"
        if marker == "<!-- main command -->":
            made = set((REPO / "logs").iterdir()) - before
            assert len(made) == 1 and f"run folder: logs/{next(iter(made)).name}" in proc.stdout, proc.stdout
    finally:  # the main command trains in the checkout's logs/, as the README says: its run (39 MB) goes again,
        # or every run of the suite would leave one beside the user's own runs
        if marker == "<!-- main command -->" and (REPO / "logs").is_dir():
            for made in set((REPO / "logs").iterdir()) - before:
                shutil.rmtree(made)
