"""The VAE's importance-weighted likelihood, conditioning and samples, on a tiny model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn import default_config
from flaxcnn.tasks import vae


def vae_config(**overrides):
    config = default_config.get_config()
    config.task = "vae"
    config.model = "ConvVAE"
    config.model_kwargs.update(dict(latent_dim=3, widths=(4, 8)))
    config.update(overrides)
    return config


@functools.cache
def make_state(conditional: bool = False):
    config = vae_config(conditional=conditional)
    state = vae.create_state(config, jax.random.key(0), (28, 28, 1), 10, 10)
    # A posterior unlike the prior (an untrained one is close to N(0, 1)), so that the
    # densities' every term matters.
    params = dict(state.params)
    params["log_variance"] = {**params["log_variance"], "bias": jnp.full(3, -2.0)}
    params["mean"] = {**params["mean"], "bias": jnp.full(3, 0.5)}
    return state.replace(params=params)


def images(num: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((num, 28, 28, 1)).astype(np.float32)


def negative_elbo(state, x, labels) -> np.ndarray:
    """The analytic-KL negative ELBO per image, averaged over many posterior samples."""
    totals = []
    for seed in range(64):
        logits, mean, log_variance = state.apply_fn(
            state.eval_variables(), x, labels, rngs={"sample": jax.random.key(seed)}
        )
        totals.append(vae.reconstruction_loss(logits, x) + vae.kl_divergence(mean, log_variance))
    return np.mean(totals, axis=0)


@pytest.mark.slow
def test_one_importance_sample_estimates_the_negative_elbo():
    state, x = make_state(), images()
    labels = jnp.zeros(len(x), jnp.int32)
    draws = [vae.importance_weighted_nll(state, x, labels, jax.random.key(s), 1) for s in range(64)]
    # Means over the images and 64 draws: sampling errors well under a nat.
    assert abs(np.mean(draws) - np.mean(negative_elbo(state, x, labels))) < 1.0


@pytest.mark.slow
def test_more_importance_samples_tighten_the_bound_and_a_key_repeats_it():
    state, x = make_state(), images()
    labels = jnp.zeros(len(x), jnp.int32)
    one = np.mean(
        [vae.importance_weighted_nll(state, x, labels, jax.random.key(s), 1) for s in range(8)]
    )
    many = vae.importance_weighted_nll(state, x, labels, jax.random.key(0), 64)
    assert float(jnp.mean(many)) < one  # Jensen: the k-sample bound is tighter.
    again = vae.importance_weighted_nll(state, x, labels, jax.random.key(0), 64)
    np.testing.assert_array_equal(many, again)


@pytest.mark.slow
def test_the_estimate_over_a_split_covers_the_images_asked_for():
    from flaxcnn.data.input_pipeline import Split

    x = (images(30) * 255).astype(np.uint8)
    split = Split(images=x, labels=np.zeros(30, np.int32), num_classes=10, class_names=None)
    state = make_state()
    first = vae.importance_weighted_estimate(state, split, 4, 12, batch_size=5)
    direct = vae.importance_weighted_nll(
        state,
        x[:5].astype(np.float32) / 255,
        jnp.zeros(5, jnp.int32),
        jax.random.fold_in(jax.random.key(vae.IW_SEED), 0),
        4,
    )
    assert np.isfinite(first) and first > 0
    assert vae.importance_weighted_estimate(state, split, 4, 12, batch_size=5) == first
    assert vae.importance_weighted_estimate(state, split, 4, 5, batch_size=5) == pytest.approx(
        float(jnp.mean(direct)), rel=1e-5
    )


def test_conditional_vae_generates_the_labels_asked_for_deterministically():
    state = make_state(conditional=True)
    assert vae.num_classes(state) == 10 and vae.num_classes(make_state()) == 0
    twos = vae.generate(state, jax.random.key(1), 4, jnp.full(4, 2, jnp.int32))
    assert twos.shape == (4, 28, 28, 1)
    np.testing.assert_array_equal(
        twos, vae.generate(state, jax.random.key(1), 4, jnp.full(4, 2, jnp.int32))
    )
    sevens = vae.generate(state, jax.random.key(1), 4, jnp.full(4, 7, jnp.int32))
    assert float(jnp.max(jnp.abs(twos - sevens))) > 0


def test_manifold_latents_span_the_prior_quantiles():
    z = vae.manifold_latents(5)
    assert z.shape == (25, 2)
    np.testing.assert_allclose(z[0], [-1.6449, 1.6449], atol=1e-3)  # Top left: 5%, 95%.
    np.testing.assert_allclose(z[-1], [1.6449, -1.6449], atol=1e-3)
