"""The notebook's three demos as commands: ``mnist-cnn-conv-demo``, ``mnist-cnn-reshape-demo``
and ``mnist-cnn-tutorial-loop`` (``scripts/conv_demo.py``, ``reshape_demo.py``, ``tutorial_loop.py``)."""

from __future__ import annotations

import time

from mnist_cnn.cli import common
from mnist_cnn.cli.common import Parser, command_name, main_with, positive_int, require_tensorflow_backend


def conv_parser() -> Parser:
    return Parser(prog=command_name("conv_demo.py"),
                  description="The convolution principle on the tutorial's 7x7 image.")


def conv_main(argv=None) -> int:
    def body(args):
        with common.loading_tensorflow():  # after parsing: TensorFlow loads here
            from mnist_cnn import tutorial

        return tutorial.conv_demo()

    return main_with(conv_parser(), argv, body)


def reshape_parser() -> Parser:
    p = Parser(prog=command_name("reshape_demo.py"),
               description="What Reshape((3*3*4,)) does to a (1, 3, 3, 4) tensor.")
    p.add_argument("--seed", type=int, default=0)
    return p


def reshape_main(argv=None) -> int:
    def body(args):
        with common.loading_tensorflow():
            from mnist_cnn import tutorial

        tutorial.print_reshape_demo(args.seed)

    return main_with(reshape_parser(), argv, body)


def loop_parser() -> Parser:
    p = Parser(prog=command_name("tutorial_loop.py"), description="The tutorial's hand-written GradientTape loop.")
    p.add_argument("--epochs", type=positive_int, default=5, help="sets num_batches = N // batch * epochs")
    p.add_argument("--batch-size", type=positive_int, default=50)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--max-batches", type=positive_int, default=None,
                   help="stop after this many batches (the tutorial stopped after batch 1000)")
    p.add_argument("--data", default="auto", metavar="{auto,tfds,sample,PATH}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=positive_int, default=1, help="print every N-th batch's loss")
    p.add_argument("--quiet", action="store_true", help="print no per-batch lines")
    p.add_argument("--eager", action="store_true", help="run the step eagerly, as the notebook did")
    return p


def loop_main(argv=None) -> int:
    def body(args):
        require_tensorflow_backend("tutorial_loop.py")
        with common.loading_tensorflow():  # after parsing: TensorFlow loads here
            import keras

            from mnist_cnn import tutorial
            from mnist_cnn.model import require_tensorflow

        require_tensorflow(command_name("tutorial_loop.py"))
        keras.utils.set_random_seed(args.seed)
        loader = tutorial.MNISTLoader(args.data, seed=args.seed)
        print(f"Data: {loader.info.describe()}")
        model = tutorial.tutorial_model(args.learning_rate)

        def show(batch_index, loss):
            if not args.quiet and batch_index % args.log_every == 0:
                print("batch %d: loss %f" % (batch_index, loss))

        start = time.perf_counter()
        losses = tutorial.train_loop(model, loader, args.epochs, args.batch_size, args.max_batches, args.eager, show)
        trained = time.perf_counter() - start
        accuracy = tutorial.evaluate_batchwise(model, loader, args.batch_size)
        print("test accuracy: %f" % accuracy)
        print(f"{len(losses)} batches in {trained:.1f} s, "
              f"evaluation in {time.perf_counter() - start - trained:.1f} s")

    return main_with(loop_parser(), argv, body)
