"""A sweep's search space: which ``TrainConfig`` options a tuning trial draws, and from where.

A space file (``mnist-cnn-tune --space FILE``, JSON or TOML) maps option names to a range or
to choices::

    {"learning_rate": {"low": 3e-4, "high": 3e-3, "log": true},
     "batch_size": {"choices": [32, 50, 64]},
     "ema": {"choices": [null, 0.99, 0.999]}}

Every name, bound and choice is checked against the option's own declaration in
``TrainConfig`` (its type, choices and bounds) before a study starts. ``DEFAULT_SPACE`` is
the space of the options that matter. The strengths of a distortion (``augment_*``,
``elastic_*``) are drawn only in a trial that distorts that way. Nothing here loads
TensorFlow or Optuna: ``suggest`` takes the Optuna trial it draws with.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from mnist_cnn.config import TrainConfig, check_name, check_value
from mnist_cnn.errors import UsageError
from mnist_cnn.files import read_regular

# What a trial may vary: what the model learns from (not where its data, logs or devices are,
# nor the validation split that scores it, nor the seed: trials differ in their options only)
TUNABLE = ("epochs", "batch_size", "learning_rate", "lr_schedule", "dropout", "augment", "augment_rotation",
           "augment_shift", "augment_zoom", "elastic", "elastic_alpha", "elastic_sigma", "ema", "label_smoothing",
           "mixed_precision")
SWITCHES = {"augment_": "augment", "elastic_": "elastic"}  # a strength is drawn only where its switch is on
OBJECTIVES = {"val_accuracy": "maximize", "val_loss": "minimize"}
PRUNERS = ("median", "hyperband", "none")

DEFAULT_SPACE = {
    "learning_rate": {"low": 3e-4, "high": 3e-3, "log": True},
    "lr_schedule": {"choices": ["constant", "cosine"]},
    "dropout": {"low": 0.0, "high": 0.6},
    "batch_size": {"choices": [32, 50, 64, 100]},
    "epochs": {"low": 10, "high": 40, "step": 5},
    "augment": {"choices": [True, False]},
    "augment_rotation": {"low": 0.0, "high": 20.0},
    "augment_shift": {"low": 0.0, "high": 0.2},
    "augment_zoom": {"low": 0.0, "high": 0.2},
    "elastic": {"choices": [False, True]},
    "ema": {"choices": [None, 0.99, 0.999]},
    "label_smoothing": {"choices": [0.0, 0.1]},
}


@dataclass(frozen=True)
class Dimension:
    """One option's range (``low``..``high``, ``log``, ``step``) or ``choices``."""

    name: str
    kind: type  # int, float, bool or str: the option's type
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def as_json(self) -> dict:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        out = {"low": self.low, "high": self.high}
        return {**out, **({"log": True} if self.log else {}), **({"step": self.step} if self.step else {})}


def _is_number(value, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, (int, float)) and math.isfinite(value)


def dimension(name: str, spec, where: str) -> Dimension:
    """``spec`` for option ``name``, checked against its declaration in TrainConfig."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if name not in fields:
        raise UsageError(f"{where}: {name!r} is not an option of mnist-cnn-fit")
    if name not in TUNABLE:
        raise UsageError(f"{where}: {name} is not tuned (a trial may vary {', '.join(TUNABLE)}); "
                         f"set it for every trial with its flag")
    field, hint = fields[name], typing.get_type_hints(TrainConfig)[name]
    allowed = typing.get_args(hint) or (hint,)
    kind = next(k for k in allowed if k is not type(None))  # int for ``int | None``
    if not isinstance(spec, dict):
        raise UsageError(f"{where}: {name} must be a table of low/high or choices, got {spec!r}")
    unknown = spec.keys() - {"low", "high", "log", "step", "choices"}
    if unknown:
        raise UsageError(f"{where}: {name}: unknown key(s) {', '.join(sorted(unknown))} "
                         f"(a range has low, high, log, step; a list has choices)")
    if "choices" in spec:
        if spec.keys() - {"choices"}:
            raise UsageError(f"{where}: {name}: choices or a range (low, high), not both")
        return _choices(name, field, kind, type(None) in allowed, spec["choices"], where)
    if kind not in (int, float):
        raise UsageError(f"{where}: {name} is {'on or off' if kind is bool else 'a name'}: give it choices")
    if not {"low", "high"} <= spec.keys():
        raise UsageError(f"{where}: {name}: a range needs both low and high")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for label, bound in (("low", low), ("high", high)):
        if not _is_number(bound, kind):
            raise UsageError(f"{where}: {name}: {label} must be {'a whole number' if kind is int else 'a number'}, "
                             f"got {bound!r}")
        problem = check_value(field, bound)
        if problem:
            raise UsageError(f"{where}: {name}: {label} is outside what the option takes: it {problem}")
    if low > high:
        raise UsageError(f"{where}: {name}: reversed range, low {low} > high {high}")
    if low == high:
        raise UsageError(f"{where}: {name}: empty range, low = high = {low} (set it with its flag instead)")
    if type(log) is not bool:
        raise UsageError(f"{where}: {name}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise UsageError(f"{where}: {name}: a log range needs low > 0, got {low}")
    if step is not None:
        if not _is_number(step, kind) or step <= 0:
            raise UsageError(f"{where}: {name}: step must be a positive {'whole ' if kind is int else ''}number, "
                             f"got {step!r}")
        if log:
            raise UsageError(f"{where}: {name}: step and log do not go together")
    return Dimension(name, kind, low, high, log, step)


def _choices(name, field, kind, optional: bool, choices, where) -> Dimension:
    if not isinstance(choices, list) or not choices:
        raise UsageError(f"{where}: {name}: choices must be a non-empty list, got {choices!r}")
    values = []
    for choice in choices:
        value = None if optional and choice in (None, "none") else choice
        fits = value is None or (type(value) is bool if kind is bool else
                                 isinstance(value, str) if kind is str else _is_number(value, kind))
        if not fits:
            raise UsageError(f"{where}: {name}: choice {choice!r} is not {'null or ' if optional else ''}"
                             f"a{'n' if kind is int else ''} {kind.__name__}")
        problem = check_value(field, value)
        if problem:
            raise UsageError(f"{where}: {name}: choice {choice!r}: {problem}")
        if value in values:
            raise UsageError(f"{where}: {name}: choice {choice!r} is listed twice")
        values.append(value)
    return Dimension(name, kind, choices=tuple(values))


def parse(raw, where: str) -> tuple[Dimension, ...]:
    """A space (a mapping of option name to spec), checked."""
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"{where}: expected a non-empty table of options, got {raw!r}"[:200])
    return tuple(dimension(name, spec, where) for name, spec in raw.items())


def read(path: str | None, fixed=()) -> tuple[Dimension, ...]:
    """``--space FILE`` (``.json`` or ``.toml``), or the default space without the options ``fixed``
    (typed on the command line: they hold for every trial; a space file must not name them)."""
    if path is None:
        return parse({k: v for k, v in DEFAULT_SPACE.items() if k not in fixed}, "the default space")
    space = _read_file(path)
    both = [d.name for d in space if d.name in fixed]
    if both:
        raise UsageError(f"--space {path}: {', '.join(both)} also typed as a flag: vary it in the space or fix it "
                         f"with the flag, not both")
    return space


def _read_file(path: str) -> tuple[Dimension, ...]:
    where = f"--space {path}"
    try:
        text = read_regular(Path(path), "search space", 1 << 20).decode()
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: cannot read it ({e})") from None
    except UsageError as e:
        raise UsageError(f"--space {e}") from None
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".json":
            raw = json.loads(text)
        elif suffix == ".toml":
            raw = _toml().loads(text)
        else:
            raise UsageError(f"{where}: a .json or .toml file, please (got {suffix or 'no suffix'})")
    except (ValueError, RecursionError) as e:  # json's and tomllib's decode errors are ValueErrors
        raise UsageError(f"{where}: not {suffix[1:].upper()} ({type(e).__name__}: {str(e)[:100]})") from None
    return parse(raw, where)


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def as_json(space: tuple[Dimension, ...]) -> str:
    """The space in one canonical form: what a study records, and compares when it is continued."""
    return json.dumps({d.name: d.as_json() for d in space}, sort_keys=True)


def suggest(trial, space: tuple[Dimension, ...], base: TrainConfig) -> dict:
    """The options ``trial`` (an Optuna trial) draws from ``space``; a distortion's strengths only
    where that distortion is on (drawn in this trial, or set for all of them in ``base``)."""
    drawn = {}
    strengths = [d for d in space if any(d.name.startswith(prefix) for prefix in SWITCHES)]
    for d in [d for d in space if d not in strengths] + strengths:
        switch = next((s for prefix, s in SWITCHES.items() if d.name.startswith(prefix)), None)
        if switch and not drawn.get(switch, getattr(base, switch)):
            continue
        if d.choices is not None:
            drawn[d.name] = trial.suggest_categorical(d.name, list(d.choices))
        elif d.kind is int:
            drawn[d.name] = trial.suggest_int(d.name, d.low, d.high, step=d.step or 1, log=d.log)
        else:
            drawn[d.name] = trial.suggest_float(d.name, d.low, d.high, step=d.step, log=d.log)
    return drawn


# -- the sweep around the space ---------------------------------------------------------------


@dataclass
class Sweep:
    """What ``mnist-cnn-tune`` takes besides the base config (the flags of ``mnist-cnn-fit``)."""

    study: str = "sweep"
    trials: int = 20  # in the whole study, across restarts and processes
    timeout: float | None = None  # seconds: no trial starts after them (a running one finishes)
    storage: str | None = None  # an SQLAlchemy URL or journal:PATH; default sqlite in the study folder
    objective: str = "val_accuracy"
    pruner: str = "median"
    prune_after_trials: int = 5  # the pruner compares with this many finished trials first
    prune_after_epochs: int = 1  # and never stops a trial before this many epochs
    space: str | None = None  # a .json or .toml file; None: space.DEFAULT_SPACE
    fixed: tuple = ()  # options typed on the command line: the same in every trial, out of the space
    worker: int | None = None  # which of --jobs' processes this is (its sampler's seed differs)

    def folder(self, base: TrainConfig) -> Path:
        return Path(base.logdir) / self.study


def check(sweep: Sweep, base: TrainConfig) -> None:
    """What can be wrong before a study opens: one line each."""
    if sweep.study in ("", ".", "..") or Path(sweep.study).name != sweep.study or not sweep.study.isprintable():
        raise UsageError(f"--study must be a plain folder name, got {sweep.study!r}")
    check_name("--study", sweep.study)
    if sweep.objective not in OBJECTIVES:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {sweep.objective!r}")
    if sweep.pruner not in PRUNERS:
        raise UsageError(f"--pruner must be one of {', '.join(PRUNERS)}, got {sweep.pruner!r}")
    if base.validation_split == "0":
        raise UsageError("--validation-split 0 would score the trials on the test split; a sweep selects on "
                         "validation digits only")
    for name, why in (("run_name", "trials are named trial-NNNN"), ("export", "export the best run afterwards"),
                      ("init_from", "every trial starts from scratch")):
        if getattr(base, name) is not None:
            raise UsageError(f"--{name.replace('_', '-')} is not available in a sweep: {why}")
    if base.strategy == "multiworker":
        raise UsageError("--strategy multiworker is not available in a sweep: share a study between machines "
                         "with --storage instead")
