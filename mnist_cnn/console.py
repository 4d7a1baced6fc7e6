"""Where the package's own lines go: INFO on stdout, warnings and errors on stderr, unadorned.

The command line installs these handlers for the life of the process (``cli.common.setup_logging``);
``train.fit`` called from Python installs them only for the length of the call, and only when
the caller has configured no logging at all, so a notebook shows a run's lines as Keras' own
``fit`` shows its progress, and an application's logging is left as it is.
"""

from __future__ import annotations

import contextlib
import logging
import sys

LOGGER = "mnist_cnn"


def handlers() -> list[logging.Handler]:
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    return [out, err]


@contextlib.contextmanager
def lines_shown(silent: bool = False):
    """The package's lines on the console for the block, unless ``silent`` or the caller's
    logging already has handlers (then they go where the caller's logging sends them)."""
    logger = logging.getLogger(LOGGER)
    if silent or logger.hasHandlers():
        yield
        return
    added, level = handlers(), logger.level
    for handler in added:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in added:
            logger.removeHandler(handler)
        logger.setLevel(level)
