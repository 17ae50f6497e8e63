"""Variational autoencoding: maximise the evidence lower bound (ELBO) of the images.

The loss is the negative ELBO in nats per image: the reconstruction term, a Bernoulli
likelihood of the pixel intensities in [0, 1] (sigmoid cross-entropy against the continuous
targets, summed over pixels), plus the KL divergence of the Gaussian posterior from the
standard-normal prior (summed over latents). The expectation over the posterior is estimated
with one reparameterised sample drawn from the step's rng.

Config keys of this task, each optional: `conditional` (False: q(z|x, y) and p(x|z, y), the
batch labels passed to the model), `iw_samples` (0, off: importance samples per test image of
the log-likelihood estimate in results.json), `iw_examples` (0: every test image),
`score_samples` and `scorer_dir` (see flaxcnn.scoring: the run scores `generator`'s samples).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flaxcnn.data import input_pipeline
from flaxcnn.reporting.pictures import image_grid
from flaxcnn.tasks import autoencoder
from flaxcnn.tasks.autoencoder import (
    picture_batch,
    reconstruction_grid,
    save_picture,
)
from flaxcnn.tasks.autoencoder import step_kwargs as step_kwargs  # The autoencoder's settings,
from flaxcnn.tasks.autoencoder import validate as validate  # all of them honoured.
from flaxcnn.tasks.base import Sampling
from flaxcnn.training import gradient_step
from flaxcnn.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# Sample pictures decode the same prior latents every epoch, so that they compare.
SAMPLE_PICTURE_SEED = 0
NUM_SAMPLE_PICTURES = 64
IW_SEED = 0  # The importance samples of the test estimate: the same for every run.
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
    # The labels condition a conditional model; an unconditional one ignores them.
    (logits, mean, log_variance), batch_stats = gradient_step.apply_training(
        apply_fn, variables, images, batch["label"], rngs={"sample": rng}
    )
    weights = jnp.ones(images.shape[0], jnp.float32)
    metrics = vae_metrics(logits, images, mean, log_variance, weights)
    return metrics["loss"], (metrics, batch_stats)


# One optimizer update on the mean negative ELBO of a batch: the task-independent step
# around this task's `loss_fn` (augmented images are encoded and are the targets). The step
# folds `state.step` into the run's key, so each step draws fresh posterior samples and a
# resumed run draws the same ones.
train_step = functools.partial(gradient_step.gradient_step, loss_fn=loss_fn)


def eval_step(state: TrainState, batch: Batch, rng: jax.Array) -> Metrics:
    """The negative ELBO and its terms summed over the images of `batch` whose `mask` is set,
    with the evaluation parameters; the posterior samples come from `rng` (the same `rng`
    gives the same numbers)."""
    images = batch["image"]
    logits, mean, log_variance = state.apply_fn(
        state.eval_variables(), images, batch["label"], rngs={"sample": rng}
    )
    weights = batch.get("mask", jnp.ones(images.shape[0], bool)).astype(jnp.float32)
    return vae_metrics(logits, images, mean, log_variance, weights)


def latent_dim(state: TrainState) -> int:
    """The size of the model's latent space, read off its posterior-mean layer."""
    return state.params["mean"]["bias"].shape[-1]


def num_classes(state: TrainState) -> int:
    """The classes a conditional model is conditioned on; 0 for an unconditional one."""
    return getattr(getattr(state.apply_fn, "__self__", None), "num_classes", 0)


def create_state(
    config: ml_collections.ConfigDict,
    rng: jax.Array,
    input_shape: tuple[int, int, int],
    num_classes: int,
    total_steps: int,
) -> TrainState:
    """The autoencoder's state of `config.model`; with `config.conditional` the model is
    conditioned on the dataset's `num_classes` labels."""
    if config.conditional:
        config = ml_collections.ConfigDict(config.to_dict())
        config.model_kwargs.num_classes = num_classes
    return autoencoder.create_state(config, rng, input_shape, num_classes, total_steps)


def decode(state: TrainState, z: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """Latents (N, latent_dim) [and labels] -> the Bernoulli means (N, H, W, C) in [0, 1]."""
    return state.apply_fn(state.eval_variables(), z, labels, method="generate")


def prior_labels(state: TrainState, rng: jax.Array, num: int) -> jax.Array | None:
    """Uniform labels for a conditional model's samples; None for an unconditional one."""
    if not num_classes(state):
        return None
    return jax.random.randint(rng, (num,), 0, num_classes(state), jnp.int32)


@functools.partial(jax.jit, static_argnums=2)
def generate(
    state: TrainState, rng: jax.Array, num: int, labels: jax.Array | None = None
) -> jax.Array:
    """`num` images (num, H, W, C) in [0, 1]: the Bernoulli means of the decoded latents drawn
    from the prior with `rng`, for `labels` (a conditional model; uniform when None)."""
    z_rng, label_rng = jax.random.split(rng)
    if labels is None:
        labels = prior_labels(state, label_rng, num)
    return decode(state, jax.random.normal(z_rng, (num, latent_dim(state))), labels)


@functools.partial(jax.jit, static_argnums=2)
def sample(state: TrainState, rng: jax.Array, num: int) -> jax.Array:
    """`num` samples (num, H, W, C) of the generative model: prior latents, decoded, and
    pixels drawn from their Bernoulli distributions (values 0 or 1, float32)."""
    latent_rng, pixel_rng = jax.random.split(rng)
    means = generate(state, latent_rng, num)
    return jax.random.bernoulli(pixel_rng, means).astype(jnp.float32)


def _log_normal(z: jax.Array, mean: jax.Array, log_variance: jax.Array) -> jax.Array:
    """log N(z; mean, exp(log_variance)), summed over the last axis."""
    return -0.5 * jnp.sum(
        jnp.log(2 * jnp.pi) + log_variance + (z - mean) ** 2 / jnp.exp(log_variance), axis=-1
    )


@functools.partial(jax.jit, static_argnums=4)
def importance_weighted_nll(
    state: TrainState, images: jax.Array, labels: jax.Array, rng: jax.Array, k: int
) -> jax.Array:
    """-log p(x) per image (nats), estimated with `k` importance samples from the posterior
    (Burda et al., 2016): -log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x). An upper bound on the
    negative log-likelihood, tightening with `k` (k = 1: the negative ELBO, in expectation)."""
    variables = state.eval_variables()
    mean, log_variance = state.apply_fn(variables, images, labels, method="encode")
    noise = jax.random.normal(rng, (k, *mean.shape), mean.dtype)
    z = mean + jnp.exp(0.5 * log_variance) * noise  # (k, B, latent_dim)

    def log_weight(z_i):
        logits = state.apply_fn(variables, z_i, labels, method="decode_logits")
        log_likelihood = -reconstruction_loss(logits, images)
        zeros = jnp.zeros_like(z_i)
        return (
            log_likelihood + _log_normal(z_i, zeros, zeros) - _log_normal(z_i, mean, log_variance)
        )

    log_weights = jax.lax.map(log_weight, z)  # (k, B), one decoder pass per sample.
    return -(jax.scipy.special.logsumexp(log_weights, axis=0) - jnp.log(k))


def importance_weighted_estimate(
    state: TrainState, split: input_pipeline.Split, k: int, num: int, batch_size: int = 100
) -> float:
    """The mean of `importance_weighted_nll` with `k` samples over the first `num` images of
    `split` (all when `num` is 0), in batches of `batch_size`."""
    images, labels = split.images, split.labels
    num = len(images) if not num else min(num, len(images))
    total, rng = 0.0, jax.random.key(IW_SEED)
    for start in range(0, num, batch_size):
        stop = min(start + batch_size, num)
        batch = to_float(images[start:stop])
        nll = importance_weighted_nll(
            state,
            batch,
            jnp.asarray(labels[start:stop], jnp.int32),
            jax.random.fold_in(rng, start),
            k,
        )
        total += float(jnp.sum(nll))
    return total / num


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1] (float images unchanged)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255)
    return images.astype(np.float32)


def generator(state: TrainState) -> Sampling:
    """The decoder with the evaluation parameters; prior draws as `generate` makes them, and
    the manifold picture's latents for a model of 2 latents."""
    size = latent_dim(state)
    return Sampling(
        latent_dim=size,
        num_classes=num_classes(state),
        decode=jax.jit(lambda z, labels: decode(state, z, labels)),
        draw=lambda rng, num, labels=None: generate(state, rng, num, labels),
        manifold=manifold_latents if size == 2 else None,
    )


def manifold_latents(size: int = 20) -> np.ndarray:
    """`size` x `size` 2-latent vectors at evenly spaced quantiles (5% to 95%) of the prior,
    row-major with the second latent falling down the rows: decoded and tiled, the classic
    latent-manifold picture of a 2-latent model."""
    from scipy.stats import norm

    values = norm.ppf(np.linspace(0.05, 0.95, size)).astype(np.float32)
    return np.stack(np.meshgrid(values, values[::-1]), axis=-1).reshape(-1, 2)


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
    means at the posterior mean; a conditional model reconstructs them without labels), and a
    grid of samples decoded from fixed prior latents (a conditional model's labels cycle
    through the classes)."""
    del rng  # Both pictures are deterministic, so that epochs compare.
    originals = picture_batch(images)
    reconstruction = reconstruction_grid(originals, np.asarray(reconstruct(state, originals)))
    save_picture(reconstruction, "reconstruction", workdir, step, writer)
    labels = None
    if num_classes(state):
        labels = jnp.arange(NUM_SAMPLE_PICTURES, dtype=jnp.int32) % num_classes(state)
    samples = generate(state, jax.random.key(SAMPLE_PICTURE_SEED), NUM_SAMPLE_PICTURES, labels)
    grid = image_grid(np.asarray(samples), SAMPLE_PICTURE_COLUMNS)
    save_picture(grid, "samples", workdir, step, writer)


def extra_results(
    state: TrainState,
    config: ml_collections.ConfigDict,
    workdir: str,
    test_split: input_pipeline.Split,
) -> dict:
    """The importance-weighted estimate of the test negative log-likelihood
    ("test_iw_nll", with `config.iw_samples` samples per image over the first
    `config.iw_examples` test images; 0 samples: off)."""
    del workdir
    results = {}
    k = config.iw_samples
    if k:
        num = config.iw_examples
        results["test_iw_nll"] = importance_weighted_estimate(state, test_split, k, num)
        results["iw_samples"] = k
        results["iw_examples"] = min(num, len(test_split.images)) or len(test_split.images)
    return results
