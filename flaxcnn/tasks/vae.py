"""Variational autoencoding: maximise the evidence lower bound (ELBO) of the images.

The loss is the negative ELBO in nats per image: the reconstruction term, a Bernoulli
likelihood of the pixel intensities in [0, 1] (sigmoid cross-entropy against the continuous
targets, summed over pixels), plus the KL divergence of the Gaussian posterior from the
standard-normal prior (summed over latents). The expectation over the posterior is estimated
with one reparameterised sample drawn from the step's rng.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flaxcnn.data import input_pipeline
from flaxcnn.reporting import generative_metrics
from flaxcnn.reporting.pictures import image_grid
from flaxcnn.tasks.autoencoder import create_state as create_state  # The autoencoder's state,
from flaxcnn.tasks.autoencoder import (
    picture_batch,
    reconstruction_grid,
    save_picture,
)
from flaxcnn.tasks.autoencoder import step_kwargs as step_kwargs  # and its settings,
from flaxcnn.tasks.autoencoder import validate as validate  # all of them honoured.
from flaxcnn.training import gradient_step
from flaxcnn.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# Sample pictures decode the same prior latents every epoch, so that they compare.
SAMPLE_PICTURE_SEED = 0
NUM_SAMPLE_PICTURES = 64
SAMPLE_PICTURE_COLUMNS = 8


def kl_divergence(mean: jax.Array, log_variance: jax.Array) -> jax.Array:
    """KL(N(mean, exp(log_variance)) || N(0, 1)) in nats, summed over the last axis."""
    return 0.5 * jnp.sum(jnp.exp(log_variance) + mean**2 - 1.0 - log_variance, axis=-1)


def reconstruction_loss(logits: jax.Array, images: jax.Array) -> jax.Array:
    """-log p(images | logits) in nats per image: Bernoulli cross-entropy summed over the
    pixels, with the intensities in [0, 1] as (continuous) targets."""
    return optax.sigmoid_binary_cross_entropy(logits, images).sum(axis=(1, 2, 3))


def vae_metrics(
    logits: jax.Array,
    images: jax.Array,
    mean: jax.Array,
    log_variance: jax.Array,
    weights: jax.Array,
) -> Metrics:
    """Sums over the images with weight 1 of the negative ELBO ("loss") and its two terms
    ("reconstruction", "kl"), all in nats per image, and their "count"."""
    reconstruction = reconstruction_loss(logits, images)
    kl = kl_divergence(mean, log_variance)
    return {
        "loss": jnp.sum((reconstruction + kl) * weights),
        "reconstruction": jnp.sum(reconstruction * weights),
        "kl": jnp.sum(kl * weights),
        "count": jnp.sum(weights),
    }


def loss_fn(apply_fn, variables: dict, batch: Batch, rng: jax.Array):
    """The summed negative ELBO of `batch["image"]`, one posterior sample per image drawn
    with `rng`, with the metric sums and the batch statistics: a `gradient_step.LossFn`."""
    images = batch["image"]
    (logits, mean, log_variance), batch_stats = gradient_step.apply_training(
        apply_fn, variables, images, rngs={"sample": rng}
    )
    weights = jnp.ones(images.shape[0], jnp.float32)
    metrics = vae_metrics(logits, images, mean, log_variance, weights)
    return metrics["loss"], (metrics, batch_stats)


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    microbatch_size: int = 0,
    augmentation: dict | None = None,
    l2: float = 0.0,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, Metrics]:
    """One optimizer update on the mean negative ELBO of `batch`:
    `gradient_step.gradient_step` with this task's `loss_fn` (augmented images are encoded
    and are the targets).

    `rng` is the run's key; the step folds in `state.step`, so each step draws fresh
    posterior samples and a resumed run draws the same ones."""
    return gradient_step.gradient_step(
        state,
        batch,
        rng,
        loss_fn,
        microbatch_size=microbatch_size,
        augmentation=augmentation,
        l2=l2,
        skip_nonfinite=skip_nonfinite,
    )


def eval_step(state: TrainState, batch: Batch, rng: jax.Array) -> Metrics:
    """The negative ELBO and its terms summed over the images of `batch` whose `mask` is set,
    with the evaluation parameters; the posterior samples come from `rng` (the same `rng`
    gives the same numbers)."""
    images = batch["image"]
    logits, mean, log_variance = state.apply_fn(
        state.eval_variables(), images, rngs={"sample": rng}
    )
    weights = batch.get("mask", jnp.ones(images.shape[0], bool)).astype(jnp.float32)
    return vae_metrics(logits, images, mean, log_variance, weights)


def latent_dim(state: TrainState) -> int:
    """The size of the model's latent space, read off its posterior-mean layer."""
    return state.params["mean"]["bias"].shape[-1]


def decode(state: TrainState, z: jax.Array) -> jax.Array:
    """Latents (N, latent_dim) -> the Bernoulli means (N, H, W, C) in [0, 1]."""
    return state.apply_fn(state.eval_variables(), z, method="generate")


@functools.partial(jax.jit, static_argnums=2)
def generate(state: TrainState, rng: jax.Array, num: int) -> jax.Array:
    """`num` images (num, H, W, C) in [0, 1]: the Bernoulli means of the decoded latents drawn
    from the prior with `rng`."""
    return decode(state, jax.random.normal(rng, (num, latent_dim(state))))


@functools.partial(jax.jit, static_argnums=2)
def sample(state: TrainState, rng: jax.Array, num: int) -> jax.Array:
    """`num` samples (num, H, W, C) of the generative model: prior latents, decoded, and
    pixels drawn from their Bernoulli distributions (values 0 or 1, float32)."""
    latent_rng, pixel_rng = jax.random.split(rng)
    means = generate(state, latent_rng, num)
    return jax.random.bernoulli(pixel_rng, means).astype(jnp.float32)


@jax.jit
def reconstruct(state: TrainState, images: jax.Array) -> jax.Array:
    """The Bernoulli means (N, H, W, C) in [0, 1] decoded from the posterior means of
    `images`: the model's deterministic reconstructions."""
    logits, _, _ = state.apply_fn(state.eval_variables(), images)
    return jax.nn.sigmoid(logits)


def write_pictures(
    state: TrainState, images: np.ndarray, rng: jax.Array, workdir: str, step: int, writer
) -> None:
    """A grid of (up to 16) validation `images` above their reconstructions (the Bernoulli
    means at the posterior mean), and a grid of samples decoded from fixed prior latents."""
    del rng  # Both pictures are deterministic, so that epochs compare.
    originals = picture_batch(images)
    reconstruction = reconstruction_grid(originals, np.asarray(reconstruct(state, originals)))
    save_picture(reconstruction, "reconstruction", workdir, step, writer)
    samples = generate(state, jax.random.key(SAMPLE_PICTURE_SEED), NUM_SAMPLE_PICTURES)
    grid = image_grid(np.asarray(samples), SAMPLE_PICTURE_COLUMNS)
    save_picture(grid, "samples", workdir, step, writer)


def extra_results(
    state: TrainState,
    config: ml_collections.ConfigDict,
    workdir: str,
    test_split: input_pipeline.Split,
) -> dict:
    """Inception score and Frechet distance (to the test split) of `config.score_samples`
    prior samples under the dataset's scoring classifier (flaxcnn.generative_metrics)."""
    del workdir
    return generative_metrics.evaluate_generator(
        lambda rng, num: generate(state, rng, num), config, test_split.images
    )
