"""Convolution and pooling in forms that XLA compiles to fast code on CPUs and GPUs alike.

XLA:CPU runs `reduce_window` max-pooling's gradient (select-and-scatter) and the weight
gradient of a convolution over few input channels many times slower than a matmul of the
same size. A reshape-and-max pools with a cheap gradient, and on narrow inputs (the image
itself) building the 3x3 patches explicitly makes the convolution and its gradient matmuls.
A first layer that is convolution, relu and 2x2 max-pooling (the Keras MNIST CNN's) goes
further as one operation with its own gradient (`conv_relu_max_pool`).
Parameters keep Flax's `nn.Conv` names and layout, so checkpoints and counts are unchanged.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

# Patches of at most this many values (3x3 over 3 channels) go through a matmul; wider
# inputs make patch tensors too large to win, and go through `lax.conv`.
MAX_PATCH_SIZE = 27


def pad_for(x: jax.Array, kernel_size: tuple[int, int], padding: str) -> jax.Array:
    """`x` padded so that a 'VALID' convolution of it is the `padding` one of `x`."""
    kh, kw = kernel_size
    if padding == "SAME":
        return jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    if padding != "VALID":
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    return x


def extract_patches(x: jax.Array, kernel_size: tuple[int, int], padding: str) -> jax.Array:
    """(B, H, W, C) -> (B, H', W', kh * kw * C), the receptive field of every output pixel."""
    kh, kw = kernel_size
    x = pad_for(x, kernel_size, padding)
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


def pooled_windows(x: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (B * H2 * W2, (kh + 1) * (kw + 1) * C): the input window under each
    2x2 pooling window of the 'VALID' kh x kw convolution's output, at stride 2."""
    kh, kw = kernel_size
    batch, height, width, channels = x.shape
    h2, w2 = (height - kh + 1) // 2, (width - kw + 1) // 2
    taps = [
        x[:, i : i + 2 * h2 - 1 : 2, j : j + 2 * w2 - 1 : 2, :]
        for i in range(kh + 1)
        for j in range(kw + 1)
    ]
    return jnp.stack(taps, axis=3).reshape(batch * h2 * w2, -1)


def phase_kernels(kernel: jax.Array) -> jax.Array:
    """(kh, kw, C, F) -> ((kh + 1) * (kw + 1) * C, 4 * F): the kernel placed at the four
    offsets (di, dj) of a pooling window, one column block each, so that a window of
    `pooled_windows` times it is the convolution at the window's four outputs."""
    blocks = [
        jnp.pad(kernel, ((di, 1 - di), (dj, 1 - dj), (0, 0), (0, 0))).reshape(-1, kernel.shape[-1])
        for di in (0, 1)
        for dj in (0, 1)
    ]
    return jnp.concatenate(blocks, axis=1)


@jax.custom_vjp
def conv_relu_max_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """2x2 max-pooling of relu('VALID' stride-1 convolution of `x` by `kernel` + `bias`):
    (B, H, W, C) -> (B, (H - kh + 1) // 2, (W - kw + 1) // 2, F), an odd last row or column
    of the convolution dropped as `nn.max_pool` drops it.

    One matmul of the pooling windows by the kernel at the window's four offsets, the pool
    as the max of four column blocks, and a gradient written out: the pooled gradient goes
    to the first maximum of each window (as `lax.reduce_window`'s does) and meets the
    windows in one more matmul. Autodiff of a convolution then pooling reduces over the
    window in ways XLA:CPU runs several times slower."""
    return _conv_relu_max_pool_fwd(x, kernel, bias)[0]


def _offset_blocks(conv: jax.Array, features: int) -> list[jax.Array]:
    """The four column blocks of `windows @ phase_kernels(kernel)`: the convolution at each
    offset of the pooling windows."""
    return [conv[:, i * features : (i + 1) * features] for i in range(4)]


def _conv_relu_max_pool_fwd(x, kernel, bias):
    kh, kw, _, features = kernel.shape
    batch, height, width, _ = x.shape
    windows = pooled_windows(x, (kh, kw))
    conv = windows @ phase_kernels(kernel)  # (windows, 4 * features): the four offsets.
    offsets = _offset_blocks(conv, features)
    # Pairwise maxima: XLA:CPU ran a reduction over stacked offsets' leading axis many times
    # slower (a reduction over the middle axis of (windows, 4, features) measured even).
    pooled = jnp.maximum(jnp.maximum(offsets[0], offsets[1]), jnp.maximum(offsets[2], offsets[3]))
    out = jax.nn.relu(pooled + bias)
    shape = (batch, (height - kh + 1) // 2, (width - kw + 1) // 2, features)
    return out.reshape(shape), (x, kernel, windows, conv, pooled, out)


def _conv_relu_max_pool_bwd(residuals, grad):
    x, kernel, windows, conv, pooled, out = residuals
    kh, kw, _, features = kernel.shape
    grad = jnp.where(out > 0, grad.reshape(out.shape), 0)
    taken = jnp.zeros(pooled.shape, bool)
    grad_conv = []
    for offset in _offset_blocks(conv, features):
        first_max = (offset == pooled) & ~taken
        taken = taken | first_max
        grad_conv.append(jnp.where(first_max, grad, 0))
    grad_conv = jnp.concatenate(grad_conv, axis=1)
    _, kernels_vjp = jax.vjp(phase_kernels, kernel)
    (grad_kernel,) = kernels_vjp(windows.T @ grad_conv)
    # The input's gradient: dead code, removed by XLA, unless something asks for it.
    _, windows_vjp = jax.vjp(functools.partial(pooled_windows, kernel_size=(kh, kw)), x)
    (grad_x,) = windows_vjp(grad_conv @ phase_kernels(kernel).T)
    return grad_x, grad_kernel, grad.sum(0)


conv_relu_max_pool.defvjp(_conv_relu_max_pool_fwd, _conv_relu_max_pool_bwd)


class ConvReluMaxPool(nn.Module):
    """`nn.Conv` (stride 1, with bias), relu and 2x2 `nn.max_pool`, computed by
    `conv_relu_max_pool`. Meant for a first layer: the windows hold (kh + 1) * (kw + 1) * C
    values per output, which only pays for narrow inputs."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    padding: str = "SAME"
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return conv_relu_max_pool(pad_for(x, self.kernel_size, self.padding), kernel, bias)
