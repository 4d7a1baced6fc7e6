"""mnist_cnn: the classic two-convolution MNIST CNN as a Keras 3 / TensorFlow package."""

from mnist_cnn.model import CNN

__all__ = ["CNN"]
__version__ = "0.1.0"
