"""The fused layers' kernels: convolution, pooling and dense computations in forms that XLA
compiles to fast code on CPUs (flaxcnn/models/layers.py wraps them as Flax modules).

XLA:CPU runs `reduce_window` max-pooling's gradient (select-and-scatter) and the weight
gradient of a convolution over few input channels many times slower than a matmul of the
same size. A reshape-and-max pools with a cheap gradient, and on narrow inputs (the image
itself) building the 3x3 patches explicitly makes the convolution and its gradient matmuls.
A first layer that is convolution, relu and 2x2 max-pooling (the Keras MNIST CNN's) goes
further as one operation with its own gradient (`conv_relu_max_pool`), and a dense layer on
its flattened output contracts position by position (`flatten_dense`), so that no fused
operation's output has the flattened features as its minor axis (XLA:CPU emits such a fusion
with an index division per element, 5x slower than the same fusion over (positions, features)).
Stride-2 transposed convolutions run as matmuls of windows by kernel taps
(`conv_transpose_2x`) except where oneDNN convolves them. `fused_layers_win` and
`resampling_as_matmuls` are the heuristics that choose.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxcnn.cpu import rewrite


def fused_layers_win() -> bool:
    """Whether the hand-fused layers run here: on XLA:CPU, the backend they were measured on."""
    return jax.default_backend() == "cpu"


def resampling_as_matmuls() -> bool:
    """Whether strided and transposed convolutions run as matmuls of windows by kernel taps
    (`StridedConv`, `conv_transpose_2x`): everywhere but where oneDNN convolves them
    (`rewrite.convolutions_by_onednn`), 2.2x faster per training step of the autoencoder
    and 1.8x of the VAE (batch 128)."""
    return not rewrite.convolutions_by_onednn()


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


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 ('VALID': an odd last row or column is dropped)."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def pooled_windows(x: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) -> (H2 * W2 * B, (kh + 1) * (kw + 1) * C): the input window under each
    2x2 pooling window of the 'VALID' kh x kw convolution's output, at stride 2. Rows are
    position-major (all examples at one position together), the layout `flatten_dense`
    contracts without a copy."""
    kh, kw = kernel_size
    batch, height, width, channels = x.shape
    h2, w2 = (height - kh + 1) // 2, (width - kw + 1) // 2
    x = x.transpose(1, 2, 0, 3)
    taps = [
        x[i : i + 2 * h2 - 1 : 2, j : j + 2 * w2 - 1 : 2]
        for i in range(kh + 1)
        for j in range(kw + 1)
    ]
    return jnp.stack(taps, axis=3).reshape(h2 * w2 * batch, -1)


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
    # Back to NHWC: a transpose that cancels against `flatten_dense`'s when that comes next.
    pooled_map = out.reshape((height - kh + 1) // 2, (width - kw + 1) // 2, batch, features)
    return pooled_map.transpose(2, 0, 1, 3), (x, kernel, windows, conv, pooled, out)


def _conv_relu_max_pool_bwd(residuals, grad):
    x, kernel, windows, conv, pooled, out = residuals
    kh, kw, _, features = kernel.shape
    grad = jnp.where(out > 0, grad.transpose(1, 2, 0, 3).reshape(out.shape), 0)
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


def flatten_dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x.reshape(B, -1) @ kernel` for a feature map `x` (B, H, W, C) and a kernel
    (H * W * C, N), computed as one (B, C) @ (C, N) matmul per position, summed over the
    positions. The flattened (B, H * W * C) array is never formed: XLA:CPU fuses that
    reshape into whatever computes `x` and emits the fusion 5x slower."""
    batch, height, width, channels = x.shape
    by_position = x.transpose(1, 2, 0, 3).reshape(height * width, batch, channels)
    return _per_position_dense(by_position, kernel.reshape(height * width, channels, -1))


@jax.custom_vjp
def _per_position_dense(by_position: jax.Array, kernels: jax.Array) -> jax.Array:
    """(P, B, C), (P, C, N) -> (B, N): the sum over positions p of by_position[p] @ kernels[p]."""
    return jax.lax.dot_general(by_position, kernels, (((2,), (1,)), ((0,), (0,)))).sum(0)


def _per_position_dense_fwd(by_position, kernels):
    return _per_position_dense(by_position, kernels), (by_position, kernels)


def _per_position_dense_bwd(residuals, grad):
    by_position, kernels = residuals
    positions, batch, _ = by_position.shape
    features = grad.shape[1]
    # The kernels' gradient as (P, N, B) @ (P, B, C): autodiff's (P, C, B) @ (P, B, N) reads
    # its left operand transposed, which XLA:CPU runs several times slower. The barrier keeps
    # XLA from folding the transpose back into the matmul.
    per_feature = jnp.matmul(jnp.broadcast_to(grad.T, (positions, features, batch)), by_position)
    grad_kernels = jax.lax.optimization_barrier(per_feature).transpose(0, 2, 1)
    grad_by_position = jnp.matmul(
        jnp.broadcast_to(grad, (positions, batch, features)), kernels.transpose(0, 2, 1)
    )
    return grad_by_position, grad_kernels


_per_position_dense.defvjp(_per_position_dense_fwd, _per_position_dense_bwd)


def transpose_padding(size: int) -> int:
    """The zeros `lax.conv_transpose(..., strides=2, padding='SAME')` puts before the
    stride-dilated input along an axis, for a kernel of `size` taps."""
    return size - 1 if size <= 2 else -(-size // 2)


def phase_taps(size: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Along one axis of a `size`-tap stride-2 'SAME' transposed convolution, for each
    output phase a (even, odd) the (tap t, input offset d) pairs with
    y[2q + a] = sum over the pairs of x[q + d] * kernel[t]. Each tap serves one phase."""
    pad = transpose_padding(size)
    phases = ([], [])
    for tap in range(size):
        for phase in (0, 1):
            if (phase + tap - pad) % 2 == 0:
                phases[phase].append((tap, (phase + tap - pad) // 2))
    return phases


def subpixel_kernel(kernel: jax.Array) -> jax.Array:
    """(k, k, C, F) transposed-convolution kernel -> (D * D * C, 4 * F): the weights of the
    D x D input window (offsets `min(d)`.. `max(d)` of `phase_taps`) for each of the four
    output phases (row, column parity), zero where a phase has no tap."""
    taps = phase_taps(kernel.shape[0])
    offsets = sorted({d for phase in taps for _, d in phase})
    table = np.zeros((len(offsets), 2, kernel.shape[0]), np.float32)
    for phase, pairs in enumerate(taps):
        for tap, offset in pairs:
            table[offsets.index(offset), phase, tap] = 1.0
    table = jnp.asarray(table, kernel.dtype)
    weights = jnp.einsum("yak,xbl,klcf->yxcabf", table, table, kernel)
    return weights.reshape(len(offsets) ** 2 * kernel.shape[2], 4 * kernel.shape[3])


# Transposed convolutions whose input windows hold at most this many values run as one
# matmul of patches (no `lax.conv`, so the model can run in the multi-step `lax.scan`: the
# autoencoder's and VAE's decoders); wider ones as stride-1 convolutions, which measured
# 2.4-3.4x faster than the patches on the GAN's generator.
MAX_SUBPIXEL_PATCH = 256


# With fewer output channels than this, the four phases of the convolution route run as one
# convolution (XLA:CPU is slow on convolutions with very few output channels); with more, as
# one each, without the zero taps.
MIN_FEATURES_PER_PHASE = 16


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _phase_convolutions(x: jax.Array, kernel: jax.Array, low: int, height: int, width: int):
    """(B, h, w, 2, 2, F): each output phase as a 'VALID' convolution of the window of `x`
    (a (h, w) input padded by `low` before) that its taps read, by those taps."""
    taps = phase_taps(kernel.shape[0])

    def phase(rows, cols):
        (top, bottom), (left, right) = [(pairs[0][1], pairs[-1][1]) for pairs in (rows, cols)]
        window = x[:, low + top : low + bottom + height, low + left : low + right + width]
        phase_kernel = kernel[np.array([t for t, _ in rows])][:, np.array([t for t, _ in cols])]
        return _conv(window, phase_kernel)

    return jnp.stack([jnp.stack([phase(r, c) for c in taps], axis=3) for r in taps], axis=3)


def conv_transpose_2x(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`lax.conv_transpose(x, kernel, (2, 2), 'SAME')` (Flax's `nn.ConvTranspose`, kernel
    not flipped) for a (k, k, C, F) kernel: (B, h, w, C) -> (B, 2h, 2w, F).

    XLA:CPU computes the kernel gradient of the input-dilated convolution a transposed
    convolution lowers to several times slower than stride-1 forms: here the four output
    phases (row, column parity) come from the D x D input windows, as one matmul of patches
    by `subpixel_kernel` (windows of at most MAX_SUBPIXEL_PATCH values), else as one
    convolution by it (fewer than MIN_FEATURES_PER_PHASE features), else as one
    convolution per phase; then a depth-to-space reshape. Where oneDNN convolves
    (`resampling_as_matmuls` false), it is `lax.conv_transpose` itself.
    """
    if not resampling_as_matmuls():
        layout = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_transpose(x, kernel, (2, 2), "SAME", dimension_numbers=layout)
    batch, height, width, channels = x.shape
    features = kernel.shape[-1]
    offsets = [d for phase in phase_taps(kernel.shape[0]) for _, d in phase]
    low, high = -min(offsets), max(offsets)
    size = low + high + 1
    x = jnp.pad(x, ((0, 0), (low, high), (low, high), (0, 0)))
    if size * size * channels <= MAX_SUBPIXEL_PATCH:
        y = extract_patches(x, (size, size), "VALID") @ subpixel_kernel(kernel)
    elif features < MIN_FEATURES_PER_PHASE:
        y = _conv(x, subpixel_kernel(kernel).reshape(size, size, channels, 4 * features))
    else:
        y = _phase_convolutions(x, kernel, low, height, width)
    y = y.reshape(batch, height, width, 2, 2, features).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(batch, 2 * height, 2 * width, features)
