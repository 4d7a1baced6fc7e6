"""Every training option, declared once.

Each ``TrainConfig`` field carries its command-line help, its choices and its bounds
(``option(...)``); the ``fit.py`` parser is built from these fields, ``validate()``
checks the same bounds for configs made in Python or read back from ``config.json``,
and the option table in docs/options.md is tested against ``fit.py --help``. The defaults are
the tutorial's numbers. To add an option: add a field here, use it in ``train.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mnist_cnn import cpu
from mnist_cnn.errors import UsageError
from mnist_cnn.files import read_json

JIT_CHOICES = {"auto": "auto", "on": True, "off": False}
LR_SCHEDULES = ("constant", "cosine")
STRATEGIES = ("auto", "one", "mirrored", "multiworker")
# Named presets: each sets defaults for the fields it names (flags typed on the command line still win).
RECIPES = {
    "tutorial": {},  # the notebook: 5 epochs, batch 50, Adam 1e-3, no augmentation, no dropout
    # the best median test accuracy from the 5k sample over seeds 0-4 (docs/performance.md, with the levers that lost):
    # stronger affine distortions and label smoothing, trained three times as long as without them
    "best": {"epochs": 120, "augment": True, "augment_rotation": 15.0, "augment_shift": 0.15, "augment_zoom": 0.15,
             "label_smoothing": 0.1, "lr_schedule": "cosine", "dropout": 0.5},
    # >= 99.0 % on the official test set from the 5k sample within 2x the tutorial's wall time (docs/performance.md):
    # 12 epochs in mixed precision where the hardware runs it natively, else FAST_IN_FLOAT32 (see from_recipe)
    "fast": {"epochs": 12, "augment": True, "lr_schedule": "cosine", "dropout": 0.5, "learning_rate": 2e-3,
             "label_smoothing": 0.1, "steps_per_execution": 10, "validation_split": "0.05"},
}
# `fast` where bfloat16 would be emulated: float32 epochs cost more than native bfloat16 ones, so fewer of them
# keep the recipe within 2x the tutorial's wall time (under the AVX2 cap 10 took 1.7x, 12 took 2.0x;
# docs/performance.md)
FAST_IN_FLOAT32 = {"epochs": 10}
# Fields that name the run: on --resume they come from the run folder's path.
RUN_IDENTITY = ("logdir", "run_name")
# Fields that change how a run is shown or called, not what it trains: --resume applies them.
RESUME_MAY_CHANGE = ("progress", "steps_per_execution")
# Where a run is and how it shows progress: a config passed on to train another run (a sweep's best.json,
# bench --versus) leaves them out.
NOT_PASSED_ON = (*RUN_IDENTITY, "progress")
PROGRESS = ("auto", "bar", "epoch", "none")
QUANTIZE = ("none", "dynamic", "int8")  # TensorFlow Lite weights (export --quantize)
SEED_MAX = 2**32 - 1  # numpy's seed range
NAME_MAX = 255  # bytes in one file name (ext4, xfs, tmpfs, ...)


def check_name(flag: str, name: str) -> None:
    """A file or folder name the filesystem can hold (with our temporary suffix)."""
    if len(os.fsencode(name)) + 45 > NAME_MAX:
        raise UsageError(f"{flag} {name[:40]}...: name too long ({len(os.fsencode(name))} bytes; at most 210)")


def option(default, help: str, *, choices=None, low=None, high=None, open_low=False, open_high=False, metavar=None):
    """A TrainConfig field with what its flag needs: help, choices, bounds (inclusive
    unless ``open_*``), metavar."""
    return field(default=default, metadata=dict(help=help, choices=choices, low=low, high=high,
                                                open_low=open_low, open_high=open_high, metavar=metavar))


@dataclass
class TrainConfig:
    """Every knob of a run. The defaults are the tutorial's numbers."""

    epochs: int = option(5, "passes over the training set", low=1)
    batch_size: int = option(50, "images per step and replica (each step uses batch-size x replicas)", low=1)
    learning_rate: float = option(1e-3, "Adam's learning rate", low=0, open_low=True)
    data: str = option("auto", "auto: tfds if MNIST is prepared or reachable, else the bundled 5k sample; "
                       "tfds; sample; or PATH, a folder of MNIST IDX files", metavar="{auto,tfds,sample,PATH}")
    tfds_dir: str | None = option(None, "TensorFlow Datasets data dir (default: $TFDS_DATA_DIR or "
                                  "~/tensorflow_datasets)", metavar="DIR")
    logdir: str = option("logs", "parent folder of the run folders", metavar="DIR")
    run_name: str | None = option(None, "run folder name (default: a timestamp); an existing name is refused",
                                  metavar="NAME")
    seed: int = option(0, "random seed: the same seed gives the same weights and losses on CPU, also after a "
                       "--resume", low=0, high=SEED_MAX)
    steps_per_epoch: int | None = option(None, "train this many batches per epoch (default: one pass over "
                                         "the data)", low=1, metavar="N")
    steps_per_execution: int = option(1, "training steps per call into TensorFlow: fewer Python round trips "
                                      "(faster); the per-step TensorBoard curves get a point per call",
                                      low=1, metavar="N")
    jit_compile: str = option("auto", "XLA compilation: auto = on with a GPU, off on CPU", choices=tuple(JIT_CHOICES))
    init_from: str | None = option(None, "start from the weights of a saved CNN", metavar="MODEL.keras")
    test_data: str | None = option(None, "take the test split from this IDX folder (the sample then trains on "
                                   "all 5,000 digits)", metavar="PATH")
    validation_split: str = option("auto", "training digits held out to score epochs and pick the best "
                                   "checkpoint: auto (an eighth, at most 5,000), a count, or a fraction; "
                                   "0 = score on the test split as the notebook did", metavar="{auto,N,FRACTION}")
    augment: bool = option(False, "random ±10° rotation, ±10% shift and zoom of training batches")
    elastic: bool = option(False, "elastic distortions of training batches (Simard et al. 2003: a random "
                           "displacement field smoothed by a Gaussian of 4 px, scaled by 34 px)")
    augment_rotation: float = option(10.0, "--augment's largest rotation, either way", low=0.0, high=180.0,
                                     metavar="DEGREES")
    augment_shift: float = option(0.1, "--augment's largest shift, either way, as a fraction of the side",
                                  low=0.0, high=0.5, metavar="FRACTION")
    augment_zoom: float = option(0.1, "--augment's largest zoom, in or out, as a fraction", low=0.0, high=0.5,
                                 open_high=True, metavar="FRACTION")
    elastic_alpha: float = option(34.0, "--elastic's displacement scale", low=0.0, metavar="PIXELS")
    elastic_sigma: float = option(4.0, "--elastic's smoothing (a Gaussian of this width)", low=0.5, high=10.0,
                                  metavar="PIXELS")
    ema: float | None = option(None, "keep an exponential moving average of the weights with this momentum "
                               "(e.g. 0.99): validation, the best and final models and the test score use it",
                               low=0.0, high=1.0, open_low=True, open_high=True, metavar="MOMENTUM")
    label_smoothing: float = option(0.0, "train against targets of 1 - E on the label and E/10 on every class "
                                    "(the validation and test losses stay plain cross-entropy)", low=0.0, high=1.0,
                                    open_high=True, metavar="E")
    lr_schedule: str = option("constant", "constant, or cosine decay to 0 over the run", choices=LR_SCHEDULES)
    dropout: float = option(0.0, "dropout before the last dense layer (0 = the tutorial's CNN)",
                            low=0.0, high=1.0, open_high=True)
    mixed_precision: bool = option(False, "mixed_float16 on GPU, mixed_bfloat16 on CPU; the softmax stays float32")
    profile_batch: str | None = option(None, "profile training steps A to B into TensorBoard's Profile tab",
                                       metavar="A,B")
    export: str | None = option(None, "after training, also write a serving SavedModel into this new folder",
                                metavar="DIR")
    strategy: str = option("auto", "auto: all GPUs if more than one, else one device; mirrored; one; "
                           "multiworker: from TF_CONFIG", choices=STRATEGIES)
    keep_checkpoints: int = option(1, "newest epoch checkpoints kept (model weights, 13 MB each at the defaults)",
                                   low=0)
    progress: str = option("auto", "auto: a progress bar on a terminal, one line per epoch otherwise; "
                           "bar; epoch; none", choices=PROGRESS)
    recipe: str = option("tutorial", "preset: tutorial = the notebook's numbers; best = 120 epochs, --augment "
                         "(rotation 15, shift and zoom 0.15), --label-smoothing 0.1, --lr-schedule cosine, "
                         "--dropout 0.5; fast = --augment, --label-smoothing 0.1, cosine, --dropout 0.5, learning "
                         "rate 2e-3, 10 steps per execution, --validation-split 0.05: 12 epochs in mixed precision "
                         "where the hardware runs it natively, else 10 in float32", choices=tuple(RECIPES))

    @classmethod
    def from_recipe(cls, recipe: str = "tutorial", **overrides) -> TrainConfig:
        if recipe not in RECIPES:
            raise UsageError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
        defaults = dict(RECIPES[recipe])
        if recipe == "fast":
            defaults["mixed_precision"] = native_mixed_precision()
            if not defaults["mixed_precision"]:
                defaults.update(FAST_IN_FLOAT32)
        return cls(**{**defaults, **overrides, "recipe": recipe})

    @classmethod
    def from_dict(cls, values: dict, where: str) -> TrainConfig:
        """A config from saved JSON, each value checked against its field's type."""
        return cls(**check_types(values, where)).validate()

    @classmethod
    def read_options(cls, path: str) -> dict:
        """``--config FILE``: a JSON object of field names and values (a sweep's ``best.json``),
        each checked against its field's type; the bounds are checked with the config."""
        try:
            values = read_json(Path(path), "config file")  # a regular file, at most 16 MB
        except FileNotFoundError:
            raise UsageError(f"--config {path}: no such file") from None
        except (UsageError, OSError) as e:
            raise UsageError(f"--config {e}") from None
        return check_types(values, f"--config {path}")

    def profile_range(self) -> tuple[int, int] | int:
        """--profile-batch as the TensorBoard callback takes it (0 = off)."""
        if self.profile_batch is None:
            return 0
        try:
            bounds = [int(part) for part in self.profile_batch.split(",")]
        except ValueError:
            bounds = []
        if len(bounds) not in (1, 2) or bounds[0] < 1 or bounds[-1] < bounds[0]:
            raise UsageError(f"--profile-batch must be A or A,B with 1 <= A <= B, got {self.profile_batch!r}")
        return (bounds[0], bounds[-1])

    def validate(self) -> TrainConfig:
        """Every field of its declared type, within its declared choices and bounds, and the rules between fields."""
        check_types({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "TrainConfig")
        for f in dataclasses.fields(self):
            problem = check_value(f, getattr(self, f.name))
            if problem:
                raise UsageError(f"{flag_name(f.name)} {problem}")
        self.profile_range()
        if not re.fullmatch(r"auto|\d+|0?\.\d*[1-9]\d*", self.validation_split):
            raise UsageError(f"--validation-split must be auto, a count or a fraction in (0, 1), "
                             f"got {self.validation_split!r}")
        if not self.data:
            raise UsageError("--data must be auto, tfds, sample or a folder of IDX files, got ''")
        if self.run_name is not None:
            if (self.run_name in ("", ".", "..") or Path(self.run_name).name != self.run_name
                    or any(ord(c) < 32 or ord(c) == 127 for c in self.run_name)):
                raise UsageError(f"--run-name must be a plain folder name (no slash or control character), "
                                 f"got {self.run_name!r}")
            check_name("--run-name", self.run_name)
        named = RECIPES.get(self.recipe, {})
        if named and all(getattr(self, name) == getattr(TrainConfig, name) for name in named):
            raise UsageError(f"recipe={self.recipe!r} is a name, not its settings ({', '.join(named)} are the "
                             f"tutorial's): build the config with TrainConfig.from_recipe({self.recipe!r}, ...)")
        if self.strategy == "multiworker" and not self.run_name:
            raise UsageError("--strategy multiworker needs --run-name, so that every worker names the same run")
        if self.strategy == "multiworker" and self.export:
            raise UsageError("--export is not available with --strategy multiworker; "
                             "export the chief's model.keras afterwards (mnist-cnn-export MODEL DIR)")
        return self


def check_types(values: dict, where: str) -> dict:
    """``values`` if it is an object of TrainConfig field names whose values have their fields' types."""
    if not isinstance(values, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(values).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    unknown = values.keys() - hints.keys()
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    for name, value in values.items():
        allowed = typing.get_args(hints[name]) or (hints[name],)
        if not any(_has_type(value, kind) for kind in allowed):
            expected = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
            raise UsageError(f"{where}: {name} must be {expected}, got {value!r}")
    return values


def native_mixed_precision() -> bool:
    """Whether mixed precision is fast here: a GPU (float16), or a CPU whose bfloat16
    instructions (AVX512_BF16 or AMX) oneDNN uses. Elsewhere bfloat16 is emulated, and slower."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return True
    return cpu.native_bfloat16()


def _has_type(value, kind) -> bool:
    if kind is type(None):
        return value is None
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def check_value(f: dataclasses.Field, value) -> str | None:
    """What is wrong with ``value`` for field ``f`` (its choices and bounds), or None."""
    meta = f.metadata
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if meta.get("choices") and value not in meta["choices"]:
        return f"must be one of {', '.join(meta['choices'])}, got {value!r}"
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return None
    below = value <= low if meta["open_low"] else value < low
    above = high is not None and (value >= high if meta["open_high"] else value > high)
    if not (below or above):
        return None
    if high is None:
        if low == 0 and not meta["open_low"]:
            return f"must be 0 or more, got {value}"
        return f"must be positive, got {value}" if low in (0, 1) else f"must be at least {low}, got {value}"
    return f"must be in {'(' if meta['open_low'] else '['}{low}, {high}{')' if meta['open_high'] else ']'}, got {value}"
