"""``mnist-cnn-bench`` / ``scripts/bench.py``: speed (ratios in one run) and accuracy."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mnist_cnn import console
from mnist_cnn.cli import common
from mnist_cnn.cli.common import Parser, command_name, main_with, positive_int, require_tensorflow_backend
from mnist_cnn.config import TrainConfig


def _idx_folder(text: str) -> Path:
    path = Path(text)
    if not (path / "t10k-images-idx3-ubyte.gz").exists() and not (path / "t10k-images-idx3-ubyte").exists():
        raise argparse.ArgumentTypeError(f"{text}: no t10k-images-idx3-ubyte[.gz] there")
    return path


def parser() -> Parser:
    p = Parser(prog=command_name("bench.py"), description="Measure training/evaluation speed (ratios) and accuracy.")
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds and smaller windows, no op profile, kernel floor or full-size pipeline (minutes)")
    p.add_argument("--rounds", type=positive_int, default=None, help="timed windows per contender")
    p.add_argument("--large-batch", type=positive_int, default=256, help="the second batch size timed (default: 256)")
    p.add_argument("--official-test", type=_idx_folder, default=None, metavar="PATH",
                   help="a folder with the official MNIST t10k files: evaluation speed and --accuracy use it")
    p.add_argument("--accuracy", action="store_true", help="also train the tutorial, fast and best recipes (minutes)")
    p.add_argument("--accuracy-runs", type=positive_int, default=1, help="rounds of --accuracy (default: 1)")
    p.add_argument("--versus", metavar="FILE",
                   help="measure only this: train FILE's options (mnist-cnn-fit --config FILE, e.g. a sweep's "
                        "best.json) against --recipe best, seed for seed, --accuracy-runs rounds")
    p.add_argument("--levers", action="store_true",
                   help="also time each speed lever (oneDNN, threads, XLA flags, ...) against the default (minutes)")
    p.add_argument("--serving", action="store_true",
                   help="only load-test mnist-cnn-serve: 8 clients x 100 requests of one image, "
                   "and of 32 (minutes)")
    p.add_argument("--json", metavar="PATH", help="write the numbers as JSON")
    return p


def main(argv=None) -> int:
    def body(args):
        versus = TrainConfig.read_options(args.versus) if args.versus else None  # (a bad file: before TensorFlow)
        require_tensorflow_backend("bench.py")
        with common.loading_tensorflow():  # after parsing: TensorFlow loads here
            from mnist_cnn.bench import measure, report, serving
            from mnist_cnn.model import require_tensorflow

        require_tensorflow(command_name("bench.py"))
        began = time.perf_counter()

        def log(message):  # progress on stderr, with the seconds since the bench started
            print(f"[{time.perf_counter() - began:4.0f} s] {message}", file=sys.stderr, flush=True)

        if versus is not None:
            contenders = {"--recipe best": {"recipe": "best"}, f"--config {Path(args.versus).name}": versus}
            log(f"accuracy: {', '.join(contenders)} x {args.accuracy_runs} rounds ...")
            with console.hidden():
                results = {"accuracy": measure.accuracy(args.accuracy_runs, args.official_test, log, contenders)}
            print("\n".join(report.accuracy_lines(results)))
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
            return
        if args.serving:
            log("serving load test ...")
            results = {"serving": serving.measure(log)}
            print(report.serving_lines(results["serving"]))
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
            return
        results = measure.run_all(quick=args.quick, rounds=args.rounds, large_batch=args.large_batch,
                                  official_test=args.official_test,
                                  accuracy_runs=args.accuracy_runs if args.accuracy else None,
                                  with_levers=args.levers, log=log)
        print(report.report(results))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    return main_with(parser(), argv, body)
