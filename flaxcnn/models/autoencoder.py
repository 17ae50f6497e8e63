"""A convolutional autoencoder, and the encoder and decoder the VAE shares with it.

The encoder halves the resolution with each strided convolution; the decoder mirrors it with
strided transposed convolutions from ceil(H / 2^n) x ceil(W / 2^n) and crops to exactly
(H, W, C), so any image size works (28x28x1 and 32x32x3 alike).

Both resampling layers are computed as matmuls of input windows by kernel taps, with the
parameters and numerics of `nn.Conv` / `nn.ConvTranspose` (the transposed one is
`flaxcnn.models.layers.ConvTranspose2x`, shared with the GAN). XLA:CPU runs convolutions
inside loops (the training loop's multi-step `lax.scan`) tens of times slower than outside,
and computes the kernel gradient of `nn.ConvTranspose`'s input-dilated convolution slowly
everywhere; matmuls are fast in both places.
"""

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxcnn.cpu.kernels import resampling_as_matmuls
from flaxcnn.models.layers import ConvTranspose2x


class StridedConv(nn.Module):
    """A 3x3 stride-2 'SAME' convolution, (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), features):
    numerically `nn.Conv(features, (3, 3), strides=(2, 2))`, with its parameters.

    The nine taps are strided slices of the padded input, concatenated into patches; where
    oneDNN convolves (`resampling_as_matmuls` false), it is `lax.conv_general_dilated`.
    """

    features: int
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _, height, width, channels = x.shape
        kernel = self.param("kernel", self.kernel_init, (3, 3, channels, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        if not resampling_as_matmuls():
            layout = ("NHWC", "HWIO", "NHWC")
            y = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=layout)
            return y + bias
        out_h, out_w = -(-height // 2), -(-width // 2)
        # XLA's 'SAME' padding for stride 2: the odd pixel of the padding goes after.
        pad_h, pad_w = 2 * out_h + 1 - height, 2 * out_w + 1 - width
        x = jnp.pad(
            x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
        )
        taps = [
            x[:, i : i + 2 * out_h - 1 : 2, j : j + 2 * out_w - 1 : 2]
            for i in range(3)
            for j in range(3)
        ]
        return jnp.concatenate(taps, axis=-1) @ kernel.reshape(-1, self.features) + bias


class ConvEncoder(nn.Module):
    """(B, H, W, C) -> (B, F): stride-2 3x3 convolutions with relu, flattened."""

    widths: Sequence[int] = (32, 64)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.widths:
            x = nn.relu(StridedConv(width)(x))
        return x.reshape(x.shape[0], -1)


class ConvDecoder(nn.Module):
    """(B, D) -> (B, H, W, C) logits: a dense layer to the encoder's last feature map, then
    stride-2 3x3 transposed convolutions back through `widths` in reverse."""

    image_shape: tuple[int, int, int]
    widths: Sequence[int] = (32, 64)

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        height, width, channels = self.image_shape
        scale = 2 ** len(self.widths)
        start = (math.ceil(height / scale), math.ceil(width / scale), self.widths[-1])
        x = nn.relu(nn.Dense(math.prod(start))(z)).reshape(z.shape[0], *start)
        for features in reversed(self.widths[:-1]):
            x = nn.relu(ConvTranspose2x(features, 3)(x))
        x = ConvTranspose2x(channels, 3)(x)
        return x[:, :height, :width, :]


def check_image_shape(x: jax.Array, image_shape: tuple[int, int, int]) -> None:
    """Raises ValueError unless `x` is a batch of `image_shape` images."""
    if tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"expected images of shape {tuple(image_shape)}, got {x.shape[1:]}")


class ConvAutoencoder(nn.Module):
    """Image -> `latent_dim` vector -> image in [0, 1].

    `image_shape` (H, W, C) fixes the decoder's output; `__call__` returns the reconstruction
    through a sigmoid, `reconstruction_logits` the logits before it (for a stable
    cross-entropy).
    """

    latent_dim: int = 32
    widths: Sequence[int] = (32, 64)
    image_shape: tuple[int, int, int] = (28, 28, 1)

    def setup(self):
        self.encoder = ConvEncoder(self.widths)
        self.to_latent = nn.Dense(self.latent_dim)
        self.decoder = ConvDecoder(tuple(self.image_shape), self.widths)

    def encode(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, latent_dim)."""
        check_image_shape(x, self.image_shape)
        return self.to_latent(self.encoder(x))

    def decode_logits(self, z: jax.Array) -> jax.Array:
        """(B, latent_dim) -> (B, H, W, C) logits."""
        return self.decoder(z)

    def reconstruction_logits(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, C) -> the reconstructions' logits (B, H, W, C)."""
        del train  # No dropout or batch norm here.
        return self.decode_logits(self.encode(x))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return nn.sigmoid(self.reconstruction_logits(x, train))
