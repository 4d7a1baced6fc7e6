"""mnist_cnn: the classic two-convolution MNIST CNN as a Keras 3 / TensorFlow package."""

from mnist_cnn import quiet

quiet.install_for_entry_points()  # before TensorFlow loads; only when run as our own command

from mnist_cnn.model import CNN  # noqa: E402  (importing registers CNN with Keras)
from mnist_cnn.optimizers import FusedAdam  # noqa: E402  (and the optimizer of resume checkpoints)

__all__ = ["CNN", "FusedAdam"]
__version__ = "0.1.0"
