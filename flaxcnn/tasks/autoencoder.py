"""Autoencoding: reconstruct each image through a latent bottleneck.

The loss is the binary cross-entropy of the pixel intensities in [0, 1] against the decoder's
logits, summed over the pixels (nats per image); "mse" is the mean squared error per pixel of
the sigmoid reconstruction. Both come back as sums over images with their "count".
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flaxcnn import run_files
from flaxcnn.models import create_model
from flaxcnn.reporting.pictures import image_grid, save_png
from flaxcnn.training import gradient_step
from flaxcnn.training.state import TrainState, create_optimizer, create_train_state, model_kwargs

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# Pictures show at most this many validation images, in rows of at most PICTURE_COLUMNS.
MAX_PICTURES = 16
PICTURE_COLUMNS = 8


def create_state(
    config: ml_collections.ConfigDict,
    rng: jax.Array,
    input_shape: tuple[int, int, int],
    num_classes: int,
    total_steps: int,
) -> TrainState:
    """`config.model` decoding to `input_shape` images, and `config.optimizer`, initialised.

    `num_classes` is unused: labels play no part in autoencoding."""
    del num_classes
    model = create_image_model(config, input_shape)
    tx = create_optimizer(config, total_steps)
    return create_train_state(model, tx, rng, tuple(input_shape), ema_decay=config.ema_decay)


def create_image_model(config: ml_collections.ConfigDict, input_shape: tuple[int, int, int]):
    """`config.model` with `config.model_kwargs`, producing images of `input_shape`."""
    kwargs = model_kwargs(config)
    if "image_shape" in kwargs:
        raise ValueError("config.model_kwargs.image_shape comes from the dataset; remove it")
    return create_model(config.model, image_shape=tuple(input_shape), **kwargs)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError (one line) for a setting this task cannot honour: it honours every
    training setting of `gradient_step`."""
    gradient_step.validate(config)


def step_kwargs(config: ml_collections.ConfigDict) -> dict:
    """`train_step`'s static settings from the config (`gradient_step.step_kwargs`). A
    microbatch size of -1 means the whole batch: for these small models microbatches make no
    measurable difference on CPUs."""
    return gradient_step.step_kwargs(config, cpu_microbatch_size=0)


def reconstruction_metrics(logits: jax.Array, images: jax.Array, weights: jax.Array) -> Metrics:
    """Summed per-image cross-entropy ("loss", nats) and per-pixel squared error ("mse") over
    the images with weight 1, and their "count"."""
    cross_entropy = optax.sigmoid_binary_cross_entropy(logits, images).sum(axis=(1, 2, 3))
    squared_error = jnp.mean((jax.nn.sigmoid(logits) - images) ** 2, axis=(1, 2, 3))
    return {
        "loss": jnp.sum(cross_entropy * weights),
        "mse": jnp.sum(squared_error * weights),
        "count": jnp.sum(weights),
    }


def loss_fn(apply_fn, variables: dict, batch: Batch, rng: jax.Array):
    """The summed per-image cross-entropy of reconstructing `batch["image"]`, with the metric
    sums and the batch statistics: a `gradient_step.LossFn`. `rng` is unused: the
    autoencoder is deterministic."""
    del rng
    images = batch["image"]
    logits, batch_stats = gradient_step.apply_training(
        apply_fn, variables, images, method="reconstruction_logits"
    )
    metrics = reconstruction_metrics(logits, images, jnp.ones(images.shape[0], jnp.float32))
    return metrics["loss"], (metrics, batch_stats)


# One optimizer update on the mean per-image cross-entropy of a batch: the task-independent
# step around this task's `loss_fn` (augmented images are the inputs and the targets).
train_step = functools.partial(gradient_step.gradient_step, loss_fn=loss_fn)


def eval_step(state: TrainState, batch: Batch, rng: jax.Array | None = None) -> Metrics:
    """Summed reconstruction errors over the images of `batch` whose `mask` is set, with the
    evaluation parameters (the moving average when on).

    `rng` is unused: the autoencoder is deterministic."""
    del rng
    images = batch["image"]
    logits = state.apply_fn(state.eval_variables(), images, method="reconstruction_logits")
    weights = batch.get("mask", jnp.ones(images.shape[0], bool)).astype(jnp.float32)
    return reconstruction_metrics(logits, images, weights)


@jax.jit
def reconstruct(state: TrainState, images: jax.Array) -> jax.Array:
    """The reconstructions (N, H, W, C) in [0, 1] of `images`, with the evaluation parameters."""
    return state.apply_fn(state.eval_variables(), images)


def reconstruction_grid(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """An (H', W', C) uint8 grid: rows of `originals` above the same rows of reconstructions."""
    columns = min(len(originals), PICTURE_COLUMNS)
    return image_grid(np.concatenate([originals, reconstructions]), columns)


def picture_batch(images: np.ndarray) -> np.ndarray:
    """The first whole rows of `images`, at most MAX_PICTURES, as float32 in [0, 1]."""
    images = np.asarray(images, np.float32)[:MAX_PICTURES]
    columns = min(len(images), PICTURE_COLUMNS)
    if columns == 0:
        raise ValueError("write_pictures needs at least one image")
    return images[: len(images) // columns * columns]


def save_picture(grid: np.ndarray, name: str, workdir: str, step: int, writer) -> str:
    """Saves `grid` as `workdir/pictures/{name}_step{step}.png` and to `writer`; the path."""
    directory = run_files.path(workdir, run_files.PICTURES)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}_step{step}.png")
    save_png(grid, path)
    writer.write_image(step, name, grid)
    return path


def write_pictures(
    state: TrainState, images: np.ndarray, rng: jax.Array, workdir: str, step: int, writer
) -> None:
    """A grid of (up to 16) validation `images` above their reconstructions."""
    del rng
    originals = picture_batch(images)
    reconstructions = np.asarray(reconstruct(state, originals))
    save_picture(
        reconstruction_grid(originals, reconstructions), "reconstruction", workdir, step, writer
    )
