"""Convolutional image classifiers."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxcnn.cpu.kernels import max_pool_2x2
from flaxcnn.models.layers import Conv, ConvReluMaxPool, FlattenDense


class SeedCNN(nn.Module):
    """The classic Keras MNIST CNN, layer for layer (54,410 parameters on 28x28x1).

    Conv2D(32, 3x3, 'valid', relu) -> MaxPool(2) -> Flatten -> Dense(num_classes); Keras's
    glorot-uniform kernels and zero biases. Returns float32 logits: the softmax is in the
    loss. `dtype` is the compute dtype (parameters stay float32). The layers are fused for
    XLA:CPU there and plain `lax.conv` / `nn.max_pool` / dense elsewhere, with the same
    parameters either way.
    """

    num_classes: int = 10
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # No dropout or batch norm here.
        init = nn.initializers.glorot_uniform()
        # Named as the nn.Conv and nn.Dense they compute: parameters keep Keras's layer names.
        x = ConvReluMaxPool(
            32, (3, 3), padding="VALID", kernel_init=init, dtype=self.dtype, name="Conv_0"
        )(x)
        x = FlattenDense(self.num_classes, kernel_init=init, dtype=self.dtype, name="Dense_0")(x)
        return x.astype(jnp.float32)


class CNN(nn.Module):
    """A stronger classifier: stages of two 3x3 convolutions with batch norm and relu, each
    stage ending in 2x2 max-pooling, then dropout and a dense layer.

    `widths` gives each stage's channels; `hidden` > 0 puts a dense layer of that many units
    (batch norm, relu, dropout) before the last one: capacity for a few percent more FLOPs.
    `dtype` is the compute dtype (parameters and batch statistics stay float32).
    """

    num_classes: int = 10
    widths: Sequence[int] = (32, 64)
    dropout_rate: float = 0.3
    hidden: int = 0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for width in self.widths:
            for _ in range(2):
                x = Conv(width, use_bias=False, dtype=self.dtype)(x)
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
                x = nn.relu(x)
            x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        if self.hidden:
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            x = nn.Dense(self.hidden, use_bias=False, dtype=self.dtype)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
            x = nn.relu(x)
        # The penultimate features, for generative scores (a no-op unless "intermediates" is
        # mutable in `apply`).
        self.sow("intermediates", "features", x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
