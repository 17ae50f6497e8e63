"""Data: tfds and image-folder splits in memory, the embedded MNIST subset, splits on the
device and the batches gathered there, augmentation."""
