"""What every command shares: one parser class, argparse types for bounded values, the
name the user ran, and one wrapper that gives every entry point the same errors and exit codes.

Exit codes: 0 done, 1 training failed (diverged, or a file could not be written
mid-run), 2 bad input (one line on stderr, nothing touched), 130 interrupted, 141 the
reader of our output went away (``| head``), quietly, as shell tools do.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from mnist_cnn import console
from mnist_cnn.config import check_value
from mnist_cnn.errors import BackendError, InputError, Interrupted, StorageError, TrainingDiverged, UsageError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141


class Parser(argparse.ArgumentParser):
    """argparse whose errors are ``UsageError``s: one line and exit status 2 through ``run``
    (no usage dump)."""

    def error(self, message):
        raise UsageError(message)


def bounded(f: dataclasses.Field, kind: type) -> Callable[[str], object]:
    """An argparse type for field ``f``: parses ``kind`` and applies the field's bounds."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            what = ("a positive " if check_value(f, 0) else "a ") + ("whole number" if kind is int else "number")
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        problem = check_value(f, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def positive_int(text: str) -> int:
    """An argparse type for counts outside TrainConfig (the tutorial loop's flags)."""
    return _whole(text, 1)


def whole_number(text: str) -> int:
    """An argparse type for counts that may be 0 (mnist-cnn-tune's --trials)."""
    return _whole(text, 0)


def _whole(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {'positive' if low == 1 else '0 or more'}, got {text}")
    return value


def setup_logging() -> None:
    """Package INFO lines on stdout, warnings and errors on stderr, unadorned (``console``)."""
    console.show()


def command_name(script: str) -> str:
    """The name the user ran: ``mnist-cnn-fit`` as an installed command, else the script's
    own (``fit.py``) -- for usage lines and error prefixes, as argparse names ``prog``."""
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return argv0 if argv0.startswith("mnist-cnn-") else script


@contextlib.contextmanager
def loading_tensorflow():
    """Around a command's import of the modules that load TensorFlow and Keras (~3,000 modules, after
    its arguments are parsed). Python's cyclic garbage collector pauses while they load: it ran ~700
    times there, 5 of them full passes, for ~0.5 of the ~3 CPU-s the import takes, and freed ~1,700
    objects. What they made is then frozen out of its later passes (``gc.freeze``), which would walk
    those ~290,000 objects again in every full collection of the run. Where TensorFlow is loaded already
    (``main()`` called from Python, as the tests do) it does nothing: it would freeze the caller's objects.
    """
    if "tensorflow" in sys.modules:
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def require_tensorflow_backend(script: str) -> None:
    """A training command's refusal of another Keras backend, decided as Keras decides it
    (``mnist_cnn.keras_backend``) before Keras, TensorFlow or that backend loads: at once, not
    after ~5 s of imports. ``model.require_tensorflow`` asks Keras itself once it is loaded."""
    from mnist_cnn import keras_backend

    backend = keras_backend()
    if backend not in ("tensorflow", None):  # None: keras.json unreadable, Keras decides
        raise BackendError.training(command_name(script), backend)


def command_line(script: str, *args) -> str:
    """A command line to paste, shell-quoted, in the form the user ran: ``mnist-cnn-fit ARGS``,
    or ``python scripts/fit.py ARGS`` (the script's path as typed) -- also for another command
    than the one running (mnist-cnn-tune names mnist-cnn-fit, scripts/tune.py scripts/fit.py)."""
    argv0 = sys.argv[0] if sys.argv else ""
    installed = "mnist-cnn-" + Path(script).stem.replace("_", "-")
    if Path(argv0).name.startswith("mnist-cnn-"):
        head = [installed]
    elif (Path(argv0).suffix == ".py" and Path(argv0).parent.name != "cli"  # (python -m mnist_cnn.cli.*)
          and (Path(argv0).parent / script).is_file()):
        head = ["python", str(Path(argv0).parent / script)]
    else:  # called from Python: the installed command
        head = [installed]
    return shlex.join([*head, *map(str, args)])


def resume_hint(run_dir) -> str:
    return f"resume with: {command_line('fit.py', '--resume', run_dir)}"


def run(prog: str, body: Callable[[], int | None]) -> int:
    """Run an entry point's ``body`` with the package's errors turned into exit codes.
    ``prog`` is the script's name (``fit.py``); messages name the command as the user ran it."""
    setup_logging()
    prog = command_name(prog)
    try:
        code = body() or EXIT_OK
        sys.stdout.flush()  # a closed pipe (| head) shows here, inside the handler below
        return code
    except BrokenPipeError:  # the reader went away (| head -1): end quietly, as a shell tool does
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's final flush finds no pipe
        return EXIT_BROKEN_PIPE
    except InputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StorageError as e:
        hint = f"; {resume_hint(e.run_dir)}" if e.run_dir else ""
        print(f"\n{prog}: stopped: {e}{hint}", file=sys.stderr)
        return EXIT_FAILED
    except TrainingDiverged as e:
        print(f"\n{prog}: stopped: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Interrupted as e:
        print(f"\n{prog}: interrupted; {resume_hint(e.run_dir)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def main_with(parser: Parser, argv, body: Callable[[argparse.Namespace], int | None]) -> int:
    """Parse ``argv`` and run ``body(args)``: what every entry point's ``main`` does."""
    return run(parser.prog, lambda: body(parser.parse_args(argv)))
