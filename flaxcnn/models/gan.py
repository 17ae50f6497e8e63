"""A DCGAN (Radford et al., 2015): a generator of images from Gaussian latent vectors and a
discriminator scoring images as real or generated, held in one module as two submodules with
separate parameter trees ("generator", "discriminator")."""

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# y[2q] = x[q-1] w[0] + x[q] w[2] and y[2q+1] = x[q] w[1] + x[q+1] w[3] along each axis of
# a 4-tap stride-2 transposed convolution (lax/flax 'SAME' padding): the taps each output
# phase (even, odd) applies to the input positions (q-1, q, q+1); -1: none.
_PHASE_TAPS = ((0, 2, -1), (-1, 1, 3))
# With fewer output channels than this, the four phases run as one convolution (XLA:CPU is
# slow on convolutions with very few output channels); with more, as one each.
MIN_FEATURES_PER_PHASE = 16


def _phase_kernel(kernel: jax.Array, row_phase: int, col_phase: int) -> jax.Array:
    """The (3, 3, I, O) stride-1 kernel computing one output phase of the (4, 4, I, O)
    transposed-convolution `kernel` (zeros where the phase has no tap)."""
    padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # Index -1: a zero tap.
    rows, cols = np.array(_PHASE_TAPS[row_phase]), np.array(_PHASE_TAPS[col_phase])
    return padded[rows[:, None], cols[None, :]]


def _conv(x: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv_transpose_2x(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`lax.conv_transpose(x, kernel, (2, 2), 'SAME')` for a (4, 4, I, O) kernel, as stride-1
    convolutions: XLA:CPU computes the kernel gradient of the input-dilated convolution a
    transposed convolution is several times slower than these.

    Each of the four output phases (row, column parity) is a 2x2 convolution of the input;
    with few output channels they run as one 3x3 convolution with 4 O channels instead.
    """
    b, h, w, _ = x.shape
    features = kernel.shape[-1]
    if features < MIN_FEATURES_PER_PHASE:
        phases = [_phase_kernel(kernel, r, c) for r in range(2) for c in range(2)]
        subpixel = jnp.stack(phases, axis=-2).reshape(3, 3, kernel.shape[2], 4 * features)
        y = _conv(x, subpixel, "SAME")
        y = y.reshape(b, h, w, 2, 2, features)
    else:
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        # Phase 0 reads positions q-1, q (padded rows q, q+1); phase 1 reads q, q+1.
        y = jnp.stack(
            [
                jnp.stack(
                    [
                        _conv(
                            padded[:, r : r + h + 1, c : c + w + 1],
                            _phase_kernel(kernel, r, c)[r : r + 2, c : c + 2],
                            "VALID",
                        )
                        for c in range(2)
                    ],
                    axis=3,
                )
                for r in range(2)
            ],
            axis=3,
        )  # (b, h, w, row phase, col phase, features)
    y = y.transpose(0, 1, 3, 2, 4, 5)  # (b, h, row phase, w, col phase, features)
    return y.reshape(b, 2 * h, 2 * w, features)


class ConvTranspose2x(nn.Module):
    """A 4x4 stride-2 'SAME' transposed convolution (doubles height and width), numerically
    `nn.ConvTranspose(features, (4, 4), strides=(2, 2))` with the same parameters, computed
    by `conv_transpose_2x`."""

    features: int
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (4, 4, x.shape[-1], self.features))
        y = conv_transpose_2x(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


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
