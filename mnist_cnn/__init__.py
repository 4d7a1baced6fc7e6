"""mnist_cnn: the classic two-convolution MNIST CNN as a Keras 3 / TensorFlow package."""

from mnist_cnn import quiet

quiet.install_for_entry_points()  # before TensorFlow loads; only when run as our own command

from mnist_cnn.model import CNN  # noqa: E402  (importing registers CNN with Keras)

__all__ = ["CNN"]
__version__ = "0.1.0"
