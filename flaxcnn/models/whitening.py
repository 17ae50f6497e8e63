"""A first layer initialised from the data: `PatchWhitening`, the whitened patch convolution of
the CIFAR-10 speed records (Jordan's airbench, after Coates and Ng's patch whitening).

Its kernel holds the eigenvectors of the covariance of the images' `k` x `k` patches, each
scaled by 1 / sqrt(eigenvalue + eps), and their negatives: the layer's outputs are the
patches' decorrelated, unit-variance components, and the activation after it keeps both
signs. The kernel is not trained: it lives in the `batch_stats` collection (the data's
statistics, beside batch norm's), so no optimizer, L2 penalty or weight decay touches it,
checkpoints keep it and evaluation uses it; only the bias trains.

`fit_whitening(batch_stats, images)` sets every such kernel in a model's `batch_stats` from
model-input images; the classification task calls it once before a new run's first step
(`fit_to_data`). Until then the kernel is random, so an unfitted model still trains.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

KERNEL = "whitening"  # The kernel's name in `batch_stats`.
SAMPLE_PIXELS = 5_000 * 32 * 32  # The images the covariance is estimated from, in pixels.


class PatchWhitening(nn.Module):
    """A `kernel_size` x `kernel_size` 'VALID' convolution to `features` channels by the
    fitted whitening kernel, plus a trained bias. `features` is at most twice the patch size
    (k * k * channels): each kept component and its negative, largest variance first."""

    features: int
    kernel_size: int = 2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        size = self.kernel_size
        patch = size * size * x.shape[-1]
        if self.features % 2 or self.features > 2 * patch:
            raise ValueError(
                f"PatchWhitening features must be even and at most {2 * patch} (twice the "
                f"{size}x{size}x{x.shape[-1]} patch), got {self.features}"
            )
        shape = (size, size, x.shape[-1], self.features)
        init = nn.initializers.lecun_normal()
        kernel = self.variable(
            "batch_stats", KERNEL, lambda: init(self.make_rng("params"), shape, jnp.float32)
        ).value
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (1, 1),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias.astype(self.dtype)


def sample_rows(num_examples: int, image_shape: tuple, seed: int = 0) -> np.ndarray:
    """Sorted random rows of a split of `num_examples` images of `image_shape` (H, W, C), at
    most SAMPLE_PIXELS pixels in all (5,000 32x32 images): the covariance's sample."""
    count = min(num_examples, max(1, SAMPLE_PIXELS // (image_shape[0] * image_shape[1])))
    return np.sort(np.random.default_rng(seed).permutation(num_examples)[:count])


def whitening_kernel(
    images: np.ndarray, kernel_size: int, features: int, eps: float = 5e-4
) -> np.ndarray:
    """(k, k, C, features) float32: the top `features // 2` whitened principal components of
    the k x k patches of `images` (N, H, W, C) float, and their negatives."""
    size, channels = kernel_size, images.shape[-1]
    dim = size * size * channels
    total, outer, count = np.zeros(dim), np.zeros((dim, dim)), 0
    for start in range(0, len(images), 256):  # The patches of 256 images at a time.
        chunk = images[start : start + 256].astype(np.float64)
        windows = np.lib.stride_tricks.sliding_window_view(chunk, (size, size), axis=(1, 2))
        patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, dim)
        total += patches.sum(0)
        outer += patches.T @ patches
        count += len(patches)
    mean = total / count
    eigenvalues, eigenvectors = np.linalg.eigh(outer / count - np.outer(mean, mean))
    order = np.argsort(eigenvalues)[::-1][: features // 2]
    scaled = eigenvectors[:, order] / np.sqrt(np.maximum(eigenvalues[order], 0) + eps)
    kernel = np.concatenate([scaled, -scaled], axis=1)
    return kernel.reshape(size, size, channels, features).astype(np.float32)


def _is_kernel(path: tuple) -> bool:
    return getattr(path[-1], "key", None) == KERNEL


def has_kernels(batch_stats: Any) -> bool:
    """Whether a model's `batch_stats` hold a `PatchWhitening` kernel to fit."""
    return any(_is_kernel(path) for path, _ in jax.tree_util.tree_leaves_with_path(batch_stats))


def fit_whitening(batch_stats: Any, images: np.ndarray) -> Any:
    """`batch_stats` with every `PatchWhitening` kernel fitted to `images` (N, H, W, C), the
    model's input (the layers must be first layers, seeing the images themselves)."""

    def fit(path, leaf):
        if not _is_kernel(path):
            return leaf
        size, _, channels, features = leaf.shape
        if channels != images.shape[-1]:
            raise ValueError(
                f"PatchWhitening at {jax.tree_util.keystr(path)} takes {channels} channels; "
                f"it must be a first layer, seeing the {images.shape[-1]}-channel images"
            )
        return jnp.asarray(whitening_kernel(images, size, features), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fit, batch_stats)
