"""Which examples make up each batch: the training order of an epoch, and the one rule for
covering every example exactly once in fixed-size batches (the last one padded, a mask
saying which rows are real), used by evaluation, prediction and scoring alike, so that no
example is dropped and no new batch shape is ever compiled."""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the examples that epoch `epoch` of a run seeded `seed` visits."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def epoch_indices(num_examples: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """(steps_per_epoch, batch_size) example indices of the epoch's full batches; the last
    partial batch is dropped (a different one each epoch)."""
    order = epoch_order(num_examples, seed, epoch)
    steps = num_examples // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def padded_indices(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(batches, batch_size) indices covering every example once, and the mask that is
    False on the padding of the last batch (which repeats index 0)."""
    batches = -(-num_examples // batch_size)
    flat = np.arange(batches * batch_size)
    mask = flat < num_examples
    indices = np.where(mask, flat, 0).astype(np.int32)
    return indices.reshape(batches, batch_size), mask.reshape(batches, batch_size)


def map_padded(fn: Callable[[np.ndarray], Any], inputs: np.ndarray, batch_size: int) -> Any:
    """`fn` over `inputs` (N, ...) in `padded_indices` batches, its outputs (arrays or a
    tuple of them, leading axis the batch) concatenated without the padding's rows. The
    batch shrinks to the power of two that holds a smaller `inputs`, so few shapes compile."""
    if len(inputs) == 0:
        raise ValueError("no inputs to run in batches")
    batch_size = min(batch_size, 1 << (len(inputs) - 1).bit_length())
    indices, mask = padded_indices(len(inputs), batch_size)
    outputs = [jax.device_get(fn(inputs[rows])) for rows in indices]
    return jax.tree.map(lambda *parts: np.concatenate(parts)[mask.ravel()], *outputs)
