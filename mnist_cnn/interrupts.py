"""Ctrl-C and SIGTERM that a run cannot lose.

Python runs a signal's handler between two bytecodes of the main thread and its
``KeyboardInterrupt`` is raised there. When that moment falls inside a finalizer or a garbage
collector callback (JAX registers one; TensorFlow's objects have ``__del__``), Python prints
"Exception ignored in ..." and carries on: the run trains to its end as if it had never been
stopped (seen in CI: a sweep's SIGTERM was lost this way and the study finished with status 0).

``stopping_on(...)`` installs a handler that records the signal as well as raising, and
``check()`` raises it again while one is recorded: the training loop calls it after every batch
(``callbacks.StopRequested``), a sweep before each trial.
"""

from __future__ import annotations

import contextlib
import signal

_received: list[int] = []


def _record_and_interrupt(signum, frame):
    _received.append(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def stopping_on(*signals: signal.Signals):
    """For the block, each of ``signals`` is Ctrl-C (``KeyboardInterrupt``) and is not lost when
    its exception is (``check``). Outside the main thread (where Python delivers no signal to a
    handler) the block runs as it is."""
    try:
        previous = {s: signal.signal(s, _record_and_interrupt) for s in signals}
    except ValueError:  # not the main thread
        previous = {}
    _received.clear()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received.clear()


def received() -> int | None:
    """The first signal received in the ``stopping_on`` block, or None."""
    return _received[0] if _received else None


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a signal arrived whose exception was swallowed on its way."""
    if _received:
        raise KeyboardInterrupt
