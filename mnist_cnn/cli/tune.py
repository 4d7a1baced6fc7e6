"""``mnist-cnn-tune`` / ``scripts/tune.py``: a sweep on Optuna (``mnist_cnn.tune``). Every flag of
``mnist-cnn-fit`` is the base of each trial; ``--space FILE`` says what the trials vary."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

from mnist_cnn import interrupts, space, sweep_report
from mnist_cnn.cli.common import (
    EXIT_INTERRUPTED,
    Parser,
    command_line,
    command_name,
    loading_tensorflow,
    positive_int,
    require_tensorflow_backend,
    run,
    whole_number,
)
from mnist_cnn.cli.fit import add_config_flags, add_new_run_flags, new_config
from mnist_cnn.errors import Interrupted

TUNE_FLAGS = ("trials", "timeout", "study", "storage", "objective", "pruner", "prune_after_trials",
              "prune_after_epochs", "space", "worker")


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def parser() -> Parser:
    p = Parser(prog=command_name("tune.py"), argument_default=argparse.SUPPRESS,
               description="Search for better training options with Optuna: every trial is a run folder "
                           "<logdir>/<study>/trial-NNNN, scored on validation digits; the best one's options "
                           "go to <logdir>/<study>/best.json (mnist-cnn-fit --config best.json trains it again).")
    sweep = p.add_argument_group("the sweep")
    sweep.add_argument("--study", metavar="NAME", help="the study's name and folder under --logdir; run the same "
                       "command again to continue it (default: sweep)")
    sweep.add_argument("--trials", type=whole_number, metavar="N",
                       help="trials in the whole study, across restarts and processes (default: 20)")
    sweep.add_argument("--timeout", type=seconds, metavar="SECONDS",
                       help="start no trial after this long (a running one finishes)")
    sweep.add_argument("--space", metavar="FILE", help="options to vary, a .json or .toml table of ranges "
                       "(low, high, log, step) or choices (default: the options that matter, docs/tuning.md; "
                       "an option typed as a flag is left out)")
    sweep.add_argument("--objective", choices=list(space.OBJECTIVES),
                       help="the last epoch's validation metric to optimize (default: val_accuracy)")
    sweep.add_argument("--pruner", choices=list(space.PRUNERS), help="stop hopeless trials early (default: median)")
    sweep.add_argument("--prune-after-trials", type=whole_number, metavar="N",
                       help="the median pruner waits for N finished trials (default: 5)")
    sweep.add_argument("--prune-after-epochs", type=positive_int, metavar="N",
                       help="no trial is pruned before N epochs (default: 1)")
    sweep.add_argument("--storage", metavar="URL",
                       help="where the study lives: sqlite:///PATH, postgresql+psycopg2://..., mysql+pymysql://..., "
                            "or journal:PATH (default: sqlite in the study folder)")
    sweep.add_argument("--jobs", type=positive_int, metavar="N", help="train N trials at once in N processes")
    sweep.add_argument("--best", action="store_true", help="train nothing: show the study and write best.json")
    sweep.add_argument("--json", action="store_true", help="the summary as JSON on stdout (trial lines on stderr)")
    sweep.add_argument("--worker", type=whole_number, help=argparse.SUPPRESS)  # one of --jobs' processes
    base = p.add_argument_group("the base of every trial (mnist-cnn-fit's options)")
    add_config_flags(base)
    add_new_run_flags(base)
    return p


def parse_args(argv=None):
    typed = vars(parser().parse_args(argv))
    flags = {name: typed.pop(name) for name in ("jobs", "best", "json") if name in typed}
    sweep = space.Sweep(**{name: typed.pop(name) for name in TUNE_FLAGS if name in typed})
    config_file, dry_run = typed.pop("config", None), typed.pop("dry_run", False)
    sweep.fixed = tuple(typed) + (("epochs", "steps_per_epoch") if dry_run else ())  # typed: not searched
    base = new_config(typed, config_file, dry_run)
    space.check(sweep, base)
    space.read(sweep.space, sweep.fixed)  # a bad space file: one line before TensorFlow loads
    return sweep, base, flags


def run_jobs(argv, jobs: int) -> int:
    """``--jobs N``: N worker processes on one study, each training one trial at a time on its
    share of the cores; signals are passed on, and the first worker's failure is the exit status."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": os.environ.get("TF_NUM_INTRAOP_THREADS", threads)}
    argv = list(sys.argv[1:] if argv is None else argv)
    workers = [subprocess.Popen([sys.executable, "-m", "mnist_cnn.cli.tune", *argv, "--jobs", "1",
                                 "--worker", str(k)], env=env) for k in range(jobs)]

    def forward(signum, frame):
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGINT)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [worker.wait() for worker in workers]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return next((code for code in codes if code), 0)


def main(argv=None) -> int:
    """``scripts/tune.py`` / ``mnist-cnn-tune``."""

    def body():
        sweep, base, flags = parse_args(argv)
        out = sys.stderr if flags.get("json") else sys.stdout

        def say(text):
            print(text, file=out, flush=True)

        code = 0
        require_tensorflow_backend("tune.py")
        with loading_tensorflow():
            from mnist_cnn import train, tune
        train.require_tensorflow(command_name("tune.py"))
        if flags.get("best"):
            outcome = tune.run(sweep, base, say, work_here=False)
        elif flags.get("jobs", 1) > 1:
            tune.open_study(sweep, base, space.read(sweep.space, sweep.fixed))  # bad input stops here, once
            code = run_jobs(argv, flags["jobs"])
            if code == EXIT_INTERRUPTED:
                return interrupted(argv)
            outcome = tune.run(sweep, base, say, work_here=False)
        else:
            # SIGTERM as Ctrl-C: a killed trial resumes either way, this one's run folder and line say so
            try:
                with interrupts.stopping_on(signal.SIGINT, signal.SIGTERM):
                    outcome = tune.run(sweep, base, say)
            except (Interrupted, KeyboardInterrupt):
                return EXIT_INTERRUPTED if sweep.worker is not None else interrupted(argv)  # (--jobs' parent says it)
        if sweep.worker is not None:
            return code
        if flags.get("json"):
            print(json.dumps(sweep_report.as_json(outcome), indent=1))
        else:
            print(summary(outcome))
        return code

    return run("tune.py", body)


def interrupted(argv) -> int:
    """The line an interrupted sweep ends with: how to continue it."""
    again = command_line("tune.py", *(sys.argv[1:] if argv is None else argv))
    print(f"\n{command_name('tune.py')}: interrupted; the study continues (its running trials from their last "
          f"epoch) with: {again}", file=sys.stderr)
    return EXIT_INTERRUPTED


def summary(outcome) -> str:
    head = f"study {outcome.study_name}: {len(outcome.trials)} trials in {outcome.storage}"
    if not outcome.trials:
        return head
    lines = [head, sweep_report.table(outcome.trials, outcome.objective)]
    if outcome.best is None:
        lines.append("no trial completed, so there is no best.json yet")
    else:
        lines.append(f"best: trial {outcome.best.number}, {outcome.objective} {outcome.best.value:.4f}; its options: "
                     f"{outcome.best_config}")
        lines.append(f"train it again and score it on the test split: "
                     f"{command_line('fit.py', '--config', outcome.best_config)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
