"""tfds builders the project owns; importing this package registers them with tfds."""

from flaxcnn.datasets.embedded_mnist import EmbeddedMnist

__all__ = ["EmbeddedMnist"]
