"""``mnist-cnn-fit`` / ``scripts/fit.py``: the parser is built from ``TrainConfig``'s fields
(help, choices, bounds), a ``--recipe`` supplies defaults, ``--resume`` continues a run with
its saved config; the rest is ``train.fit``."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import typing
from pathlib import Path

from mnist_cnn import interrupts
from mnist_cnn.cli.common import Parser, bounded, command_name, loading_tensorflow, require_tensorflow_backend, run
from mnist_cnn.config import RESUME_MAY_CHANGE, RUN_IDENTITY, TrainConfig, flag_name
from mnist_cnn.errors import UsageError


def _value_type(hint) -> type:
    """int for ``int | None``, and so on."""
    return next(k for k in (typing.get_args(hint) or (hint,)) if k is not type(None))


def parser() -> Parser:
    """fit.py's parser: one flag per TrainConfig field (help, choices, bounds from the
    field), plus --resume, --config and --dry-run. Nothing is defaulted here: a flag that is not
    typed is absent from the result, so the recipe and --resume can tell."""
    p = Parser(prog=command_name("fit.py"), description="Train the MNIST CNN and write a run folder under --logdir.",
               argument_default=argparse.SUPPRESS)
    add_config_flags(p)
    p.add_argument("--resume", nargs="?", const="", metavar="RUN_DIR",
                   help="continue a killed or stopped run (RUN_DIR, or --run-name in --logdir) with its saved config")
    add_new_run_flags(p)
    return p


def add_config_flags(p: Parser) -> None:
    """One flag per TrainConfig field (mnist-cnn-tune takes them too, as the base of every trial)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta, kind = f.metadata, _value_type(hints[f.name])
        helptext = meta["help"].replace("%", "%%") + ("" if f.default is None else f" (default: {f.default})")
        if kind is bool:
            p.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, help=helptext)
        elif meta["choices"]:
            p.add_argument(flag_name(f.name), choices=list(meta["choices"]), help=helptext)
        else:
            metavar = meta["metavar"] or {int: "N", float: "X"}.get(kind)
            p.add_argument(flag_name(f.name), type=bounded(f, kind) if kind in (int, float) else str,
                           metavar=metavar, help=helptext)


def add_new_run_flags(p: Parser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="start from the options in this JSON object of option names and values (e.g. a sweep's "
                        "best.json); flags typed here win")
    p.add_argument("--dry-run", action="store_true", help="1 epoch of 2 steps: check that everything runs")


def parse_args(argv=None) -> tuple[TrainConfig, bool]:
    """The config from the command line (parsed once), and whether to resume.

    A ``--recipe`` supplies defaults for the fields it names; typed flags win. With
    --resume the config is the run's own (config.json); typed flags must agree with it.
    """
    typed = vars(parser().parse_args(argv))
    resume, dry_run = typed.pop("resume", None), typed.pop("dry_run", False)
    config_file = typed.pop("config", None)
    if config_file is not None and resume is not None:
        raise UsageError("--config cannot be combined with --resume (a resumed run keeps its own config)")
    if resume is None:
        return new_config(typed, config_file, dry_run), False
    if dry_run:
        raise UsageError("--dry-run cannot be combined with --resume")
    if resume == "":
        if not typed.get("run_name"):
            raise UsageError("--resume without RUN_DIR needs --run-name")
        run_dir = Path(typed.get("logdir", TrainConfig.logdir)) / typed["run_name"]
    else:
        run_dir = Path(resume)
    from mnist_cnn.rundir import RunDir  # (light, but not needed for --help)

    saved = RunDir(run_dir).read_config()
    for name in typed.keys() - {*RUN_IDENTITY, *RESUME_MAY_CHANGE}:
        if typed[name] != getattr(saved, name):
            raise UsageError(f"{flag_name(name)} {typed[name]} conflicts with the resumed run's "
                             f"{name}={getattr(saved, name)!r}")
    changes = {name: typed[name] for name in RESUME_MAY_CHANGE if name in typed}
    return dataclasses.replace(saved, logdir=str(run_dir.parent), run_name=run_dir.name, **changes), True




def new_config(typed: dict, config_file: str | None, dry_run: bool) -> TrainConfig:
    """A new run's config: the recipe's defaults, then --config FILE's options, then the typed flags."""
    typed = {**(TrainConfig.read_options(config_file) if config_file is not None else {}), **typed}
    config = TrainConfig.from_recipe(typed.pop("recipe", "tutorial"), **typed).validate()  # (--config's values)
    return dataclasses.replace(config, epochs=1, steps_per_epoch=2) if dry_run else config


def main(argv=None) -> int:
    """``scripts/fit.py`` / ``mnist-cnn-fit``."""

    def body():
        config, resume = parse_args(argv)  # parsed inside run(): a bad flag is one line, exit 2
        require_tensorflow_backend("fit.py")
        with loading_tensorflow():  # only now: --help and usage errors answer without TensorFlow
            from mnist_cnn import train

        train.require_tensorflow(command_name("fit.py"))

        with interrupts.stopping_on(signal.SIGINT, signal.SIGTERM):  # an operator's SIGTERM is Ctrl-C
            result = train.fit(config, resume=resume)
        if result.data_info.num_validation:
            print("validation accuracy: %f (last epoch)" % result.history["val_accuracy"][-1])
        print("test accuracy: %f" % result.test_accuracy)
        print(f"run folder: {result.run_dir}  ({result.seconds:.0f} s)")

    return run("fit.py", body)

