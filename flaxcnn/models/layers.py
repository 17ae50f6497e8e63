"""Flax layers computed by the CPU backend's fused kernels (flaxcnn.cpu.kernels) where they
win, numerically `nn.Conv`, `nn.Conv` + relu + `nn.max_pool`, flatten + `nn.Dense` and
`nn.ConvTranspose`. Parameters keep Flax's names and layout, so checkpoints and counts are
unchanged. On other backends (`fused=None`) they compute the plain `lax.conv` /
`nn.max_pool` / dense formulation, with the same parameters.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxcnn.cpu import kernels


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
        if kh * kw * x.shape[-1] <= kernels.MAX_PATCH_SIZE:
            patches = kernels.extract_patches(x, self.kernel_size, self.padding)
            y = patches @ kernel.reshape(-1, self.features)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, (1, 1), self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(dtype)
        return y


class ConvReluMaxPool(nn.Module):
    """`nn.Conv` (stride 1, with bias), relu and 2x2 `nn.max_pool`, computed by
    `conv_relu_max_pool` where it wins (`fused`; None: on XLA:CPU) and by `lax.conv` and
    `nn.max_pool` elsewhere, with the same parameters. Meant for a first layer: the windows
    hold (kh + 1) * (kw + 1) * C values per output, which only pays for narrow inputs.
    `dtype` is the compute dtype (parameters stay float32)."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    padding: str = "SAME"
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: jnp.dtype | None = None
    fused: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        dtype = self.dtype or x.dtype
        x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
        x = kernels.pad_for(x, self.kernel_size, self.padding)
        if kernels.fused_layers_win() if self.fused is None else self.fused:
            return kernels.conv_relu_max_pool(x, kernel, bias)
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return nn.max_pool(jax.nn.relu(y + bias), (2, 2), strides=(2, 2))


class FlattenDense(nn.Module):
    """Flatten then `nn.Dense` (same parameter names and shapes), computed by
    `flatten_dense` where it wins (`fused`; None: on XLA:CPU) and as one matmul elsewhere.
    `dtype` is the compute dtype (parameters stay float32)."""

    features: int
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: jnp.dtype | None = None
    fused: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", self.kernel_init, (math.prod(x.shape[1:]), self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        dtype = self.dtype or x.dtype
        x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
        if kernels.fused_layers_win() if self.fused is None else self.fused:
            return kernels.flatten_dense(x, kernel) + bias
        return x.reshape(x.shape[0], -1) @ kernel + bias


class ConvTranspose2x(nn.Module):
    """A `kernel_size` x `kernel_size` stride-2 'SAME' transposed convolution (doubles height
    and width), numerically `nn.ConvTranspose(features, (k, k), strides=(2, 2))` with its
    parameters, computed by `conv_transpose_2x`. `dtype` is the compute dtype (parameters
    stay float32)."""

    features: int
    kernel_size: int = 4
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        size = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (size, size, x.shape[-1], self.features), jnp.float32
        )
        dtype = self.dtype or x.dtype
        y = kernels.conv_transpose_2x(x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(dtype)
        return y
