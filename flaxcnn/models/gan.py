"""A DCGAN (Radford et al., 2015): a generator of images from Gaussian latent vectors and a
discriminator scoring images as real or generated, held in one module as two submodules with
separate parameter trees ("generator", "discriminator")."""

import math
from collections.abc import Sequence

import jax
from flax import linen as nn

from flaxcnn.models.layers import ConvTranspose2x


class Generator(nn.Module):
    """Latent (B, latent_dim) -> image (B, H, W, C) in [0, 1].

    Dense -> reshape to (H / 2^k, W / 2^k, widths[0]) -> batch norm, relu -> for each further
    width a 4x4 stride-2 transposed convolution, batch norm, relu -> a last 4x4 stride-2
    transposed convolution to C channels -> sigmoid, with k = len(widths) doublings in all.
    Sizes not divisible by 2^k are generated a little larger and centre-cropped.
    """

    image_shape: tuple[int, int, int]
    widths: Sequence[int] = (128, 64)

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        if not self.widths:
            raise ValueError("the generator needs at least one width")
        height, width, channels = self.image_shape
        scale = 2 ** len(self.widths)
        base_h, base_w = math.ceil(height / scale), math.ceil(width / scale)

        def norm_relu(x):
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            return nn.relu(x)

        x = nn.Dense(base_h * base_w * self.widths[0], use_bias=False)(z)
        x = norm_relu(x.reshape(z.shape[0], base_h, base_w, self.widths[0]))
        for i, features in enumerate(self.widths[1:]):
            x = ConvTranspose2x(features, use_bias=False, name=f"ConvTranspose_{i}")(x)
            x = norm_relu(x)
        x = ConvTranspose2x(channels, name=f"ConvTranspose_{len(self.widths) - 1}")(x)
        top, left = (x.shape[1] - height) // 2, (x.shape[2] - width) // 2
        x = x[:, top : top + height, left : left + width, :]
        return nn.sigmoid(x)


class Discriminator(nn.Module):
    """Image (B, H, W, C) -> logit (B,) of "real": 4x4 stride-2 convolutions of `widths`
    channels with leaky relu (0.2), then a dense logit. No batch norm, so real and generated
    batches are scored independently of each other."""

    widths: Sequence[int] = (64, 128)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for features in self.widths:
            x = nn.Conv(features, (4, 4), strides=(2, 2))(x)
            x = nn.leaky_relu(x, 0.2)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(1)(x)[:, 0]


class DCGAN(nn.Module):
    """The generator and the discriminator of images of `image_shape` (H, W, C).

    `__call__` (used to initialise both) scores generated images, D(G(z)); `generate` and
    `discriminate` apply one submodule, and need only that submodule's variables.
    """

    image_shape: tuple[int, int, int] = (28, 28, 1)
    latent_dim: int = 64
    generator_widths: Sequence[int] = (128, 64)
    discriminator_widths: Sequence[int] = (64, 128)

    def setup(self):
        self.generator = Generator(tuple(self.image_shape), tuple(self.generator_widths))
        self.discriminator = Discriminator(tuple(self.discriminator_widths))

    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        return self.discriminator(self.generator(z, train))

    def generate(self, z: jax.Array, train: bool = False) -> jax.Array:
        return self.generator(z, train)

    def discriminate(self, images: jax.Array) -> jax.Array:
        return self.discriminator(images)
