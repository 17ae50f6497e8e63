"""Convolution and pooling in forms that XLA compiles to fast code on CPUs and GPUs alike.

XLA:CPU runs `reduce_window` max-pooling's gradient (select-and-scatter) and the weight
gradient of a convolution over few input channels many times slower than a matmul of the
same size. A reshape-and-max pools with a cheap gradient, and on narrow inputs (the image
itself) building the 3x3 patches explicitly makes the convolution and its gradient matmuls.
Parameters keep Flax's `nn.Conv` names and layout, so checkpoints and counts are unchanged.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

# Patches of at most this many values (3x3 over 3 channels) go through a matmul; wider
# inputs make patch tensors too large to win, and go through `lax.conv`.
MAX_PATCH_SIZE = 27


def extract_patches(x: jax.Array, kernel_size: tuple[int, int], padding: str) -> jax.Array:
    """(B, H, W, C) -> (B, H', W', kh * kw * C), the receptive field of every output pixel."""
    kh, kw = kernel_size
    if padding == "SAME":
        x = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    elif padding != "VALID":
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    shifted = [x[:, i : i + out_h, j : j + out_w, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(shifted, axis=-1)


class Conv(nn.Module):
    """A stride-1 2-D convolution, numerically `nn.Conv`, computed as patches @ kernel."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    padding: str = "SAME"
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32
        )
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        if kh * kw * x.shape[-1] <= MAX_PATCH_SIZE:
            patches = extract_patches(x, self.kernel_size, self.padding)
            y = patches @ kernel.reshape(-1, self.features)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, (1, 1), self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(dtype)
        return y


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 ('VALID': an odd last row or column is dropped)."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
