"""flaxcnn: train image models the functional JAX way."""

__version__ = "0.1.0"
