"""mnist_cnn: the classic two-convolution MNIST CNN as a Keras 3 / TensorFlow package."""

from mnist_cnn import cpu, quiet

if quiet.started_as_entry_point():  # only when run as our own command, before TensorFlow loads:
    cpu.prefer_fast_path()  # oneDNN's CPU kernels on x86 unless the user set TF_ENABLE_ONEDNN_OPTS
    quiet.install()  # TensorFlow's known start-up lines filtered out of stderr

from mnist_cnn.model import CNN  # noqa: E402  (importing registers CNN with Keras)
from mnist_cnn.optimizers import FusedAdam  # noqa: E402  (and the optimizer of resume checkpoints)

__all__ = ["CNN", "FusedAdam"]
__version__ = "0.1.0"
