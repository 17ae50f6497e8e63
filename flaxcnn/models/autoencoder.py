"""A convolutional autoencoder, and the encoder and decoder the VAE shares with it.

The encoder halves the resolution with each strided convolution; the decoder mirrors it with
strided transposed convolutions from ceil(H / 2^n) x ceil(W / 2^n) and crops to exactly
(H, W, C), so any image size works (28x28x1 and 32x32x3 alike).

Both resampling layers are computed as patches @ kernel matmuls, with the parameters and
numerics of `nn.Conv` / `nn.ConvTranspose`. XLA:CPU runs convolutions inside loops (the
training loop's multi-step `lax.scan`) tens of times slower than outside, and computes the
kernel gradient of `nn.ConvTranspose`'s input-dilated convolution slowly everywhere; matmuls
are fast in both places.
"""

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxcnn.models.layers import extract_patches

# _SUBPIXEL_TAPS[d, a, k] = 1 where, along one axis, output pixel 2m + a of a 3-tap stride-2
# 'SAME' transposed convolution takes input pixel m + d - 1 times kernel tap k:
# y[2m] = x[m - 1] k[0] + x[m] k[2] and y[2m + 1] = x[m] k[1].
_SUBPIXEL_TAPS = np.zeros((2, 2, 3), np.float32)
_SUBPIXEL_TAPS[0, 0, 0] = _SUBPIXEL_TAPS[1, 0, 2] = _SUBPIXEL_TAPS[1, 1, 1] = 1.0


class StridedConv(nn.Module):
    """A 3x3 stride-2 'SAME' convolution, (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), features):
    numerically `nn.Conv(features, (3, 3), strides=(2, 2))`, with its parameters.

    The nine taps are strided slices of the padded input, concatenated into patches.
    """

    features: int
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _, height, width, channels = x.shape
        kernel = self.param("kernel", self.kernel_init, (3, 3, channels, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
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


class ConvTranspose2x(nn.Module):
    """A 3x3 stride-2 'SAME' transposed convolution, (B, h, w, C) -> (B, 2h, 2w, features):
    numerically `nn.ConvTranspose(features, (3, 3), strides=(2, 2))`, with its parameters.

    Computed as a stride-1 2x2 convolution (2x2 patches @ kernel) to the four output phases
    (2 x 2 x features channels), then a depth-to-space reshape.
    """

    features: int
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        kernel = self.param("kernel", self.kernel_init, (3, 3, channels, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        taps = jnp.asarray(_SUBPIXEL_TAPS)
        phases = jnp.einsum("yak,xbl,klcf->yxcabf", taps, taps, kernel)
        phases = phases.reshape(4 * channels, 4 * self.features)
        x = jnp.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)))
        y = extract_patches(x, (2, 2), "VALID") @ phases
        y = y.reshape(batch, height, width, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(batch, 2 * height, 2 * width, self.features) + bias


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
            x = nn.relu(ConvTranspose2x(features)(x))
        x = ConvTranspose2x(channels)(x)
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
