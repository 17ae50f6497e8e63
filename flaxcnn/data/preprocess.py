"""What the model sees: uint8 images (0..255) or floats in [0, 1], scaled to [0, 1] float32
and, with `config.normalize`, standardised per channel: (x - mean) / std.

`to_model_input` is the ONE function that does it, for numpy arrays (inference) and JAX
arrays alike (the batch gathered on the device, the exported serving function), so that
training, evaluation, prediction and both export formats compute the same numbers.

`config.normalize` is "none", "dataset" (the mean and standard deviation of each channel
over every pixel of the training split, computed once by `channel_stats`) or a pair
(mean, std) of per-channel sequences (or single numbers for every channel) in [0, 1] units,
e.g. ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)). `resolve_config` turns it into
concrete numbers before training; the run stores them in config.json and dataset_info.json,
so every later command uses the same ones without the data.
"""

import ast
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

NONE = "none"
DATASET = "dataset"
# Built-in tasks whose targets are the input images themselves (reconstructions in [0, 1],
# generated images): standardised inputs would change what they learn to produce.
IMAGE_TARGET_TASKS = ("autoencoder", "vae", "gan")
_CHUNK = 4096  # Images per chunk of `channel_stats`: bounded memory for any split size.


class Normalization(NamedTuple):
    """Per-channel mean and standard deviation in [0, 1] units."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


def channel_stats(images: np.ndarray) -> Normalization:
    """The mean and (population) standard deviation of each channel of uint8 images
    (N, H, W, C) over every pixel, in [0, 1] units. Exact integer sums, so the result does
    not depend on the order or chunking of the images."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
        raise ValueError(f"channel_stats takes uint8 images (N, H, W, C), got {images.dtype}")
    total = np.zeros(images.shape[-1], np.uint64)
    squares = np.zeros(images.shape[-1], np.uint64)
    for start in range(0, len(images), _CHUNK):
        chunk = images[start : start + _CHUNK].astype(np.uint64)
        total += chunk.sum(axis=(0, 1, 2))
        squares += (chunk * chunk).sum(axis=(0, 1, 2))
    count = images.size // images.shape[-1]
    mean, std = [], []
    for s, q in zip(total.tolist(), squares.tolist()):
        mean.append(s / count / 255)
        # n^2 var = n * sum(x^2) - sum(x)^2, exact in Python integers.
        std.append(float(np.sqrt((count * q - s * s) / count**2)) / 255)
    return Normalization(tuple(mean), tuple(std))


def parse(normalize: Any, num_channels: int | None = None) -> Normalization | str | None:
    """`normalize` checked: None for "none", "dataset" as is, or a `Normalization` with one
    value per channel (single values repeated for `num_channels`). Raises ValueError."""
    if normalize is None or (isinstance(normalize, str) and normalize == NONE):
        return None
    if isinstance(normalize, str):
        if normalize == DATASET:
            return DATASET
        normalize = _literal(normalize)
    if not isinstance(normalize, Sequence) or len(normalize) != 2:
        raise ValueError(f"config.normalize must be a pair (mean, std), got {normalize!r}")
    mean, std = (_per_channel(v, name) for v, name in zip(normalize, ("mean", "std")))
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise ValueError(f"config.normalize: {len(mean)} means but {len(std)} stds")
    channels = num_channels or max(len(mean), len(std))
    for values, name in ((mean, "mean"), (std, "std")):
        if len(values) not in (1, channels):
            raise ValueError(
                f"config.normalize: {len(values)} {name} values for {channels}-channel images"
            )
    mean, std = (v * channels if len(v) == 1 else v for v in (mean, std))
    if not all(0 <= m <= 1 for m in mean) or not all(0 < s <= 1 for s in std):
        raise ValueError(
            f"config.normalize={normalize!r}: mean must be in [0, 1] and std in (0, 1], in "
            "[0, 1] units (divide 0..255 values by 255)"
        )
    return Normalization(mean, std)


def _literal(text: str) -> Any:
    """A pair written as text ("((0.5,), (0.25,))", as a command line may give it)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(
            f"config.normalize must be 'none', 'dataset' or (mean, std), got {text!r}"
        ) from None


def _per_channel(value: Any, name: str) -> tuple[float, ...]:
    values = tuple(value) if isinstance(value, Sequence) else (value,)
    if not values or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"config.normalize: {name} must be numbers, got {value!r}")
    return tuple(float(v) for v in values)


def check_normalizable(task: str, normalize: Any) -> None:
    """Raises ValueError when `task` learns to produce its input images, which
    normalisation would change (`IMAGE_TARGET_TASKS`), and `normalize` is not "none"."""
    if task in IMAGE_TARGET_TASKS and parse(normalize) is not None:
        raise ValueError(
            f"config.normalize={normalize!r}: the {task} task reconstructs or generates "
            "images in [0, 1] and takes them unnormalised; use normalize='none'"
        )


def validate(config: Any) -> None:
    """Raises ValueError for a `config.normalize` that cannot work, before any data is read:
    its form, and a task that takes no normalisation (`check_normalizable`)."""
    normalize = config.get("normalize", NONE)
    parse(normalize)
    check_normalizable(config.get("task", "classification"), normalize)


def resolve_normalization(normalize: Any, train_images: np.ndarray) -> Normalization | None:
    """Concrete per-channel numbers for `normalize`: "dataset" is computed from
    `train_images` (the training split only), a given pair is checked against their
    channels; None for "none"."""
    parsed = parse(normalize, train_images.shape[-1])
    if parsed != DATASET:
        return parsed
    stats = channel_stats(train_images)
    if min(stats.std) == 0:
        raise ValueError(
            "config.normalize='dataset': a channel of the training images is constant "
            f"(std {stats.std}); give (mean, std) instead"
        )
    return stats


def resolve_config(config: Any, train_images: np.ndarray) -> Normalization | None:
    """`resolve_normalization(config.normalize, train_images)`, checked against
    `config.task`, written back into `config.normalize` (so that config.json and the steps
    see the numbers)."""
    normalize = config.get("normalize", NONE)
    check_normalizable(config.get("task", "classification"), normalize)
    stats = resolve_normalization(normalize, train_images)
    if stats is not None:
        with config.ignore_type():  # A config without the default's any-type field.
            config.normalize = (stats.mean, stats.std)
    return stats


def from_config(config: Any) -> Normalization | None:
    """The resolved normalisation of `config` (None for "none"); "dataset" must have been
    resolved (`resolve_config`, done by the training loop) first."""
    parsed = parse(config.get("normalize", NONE))
    if parsed == DATASET:
        raise ValueError(
            "config.normalize='dataset' has no numbers yet: the training loop resolves it "
            "from the training split (preprocess.resolve_config)"
        )
    return parsed


def _module(images: Any):
    return np if isinstance(images, np.ndarray) else jnp


def to_model_input(images: Any, mean: Any = None, std: Any = None) -> Any:
    """uint8 images (0..255) or float images in [0, 1] -> float32 in [0, 1], then
    `(x - mean) / std` per channel (last axis) when `mean` and `std` are given. numpy in,
    numpy out; JAX arrays (also inside jit) in, JAX out."""
    xp = _module(images)
    if images.dtype == xp.uint8:
        x = images.astype(xp.float32) / xp.float32(255)
    else:
        x = images.astype(xp.float32)
    if mean is None:
        return x
    return (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


def from_model_input(x: Any, mean: Any = None, std: Any = None) -> Any:
    """The inverse of `to_model_input`'s standardisation: model inputs -> [0, 1] float32."""
    if mean is None:
        return x
    xp = _module(x)
    return x * xp.asarray(std, xp.float32) + xp.asarray(mean, xp.float32)
