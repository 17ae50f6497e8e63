"""k-means clusters of images, the labels of a GAN conditioned on its own data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn.data import clusters


def three_groups(sizes=(10, 20, 30), seed=0):
    """uint8 images (N, 4, 4, 1) of three brightnesses with a little noise, and their group."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(3), sizes)
    levels = np.array([20, 120, 230])[groups]
    noise = rng.integers(-5, 6, (len(groups), 4, 4, 1))
    return (levels[:, None, None, None] + noise).astype(np.uint8), groups.astype(np.int32)


def test_fit_finds_separated_groups_and_their_shares():
    images, groups = three_groups()
    fitted, purity = clusters.fit_clusters(images, groups, 3, seed=0)
    assert fitted["centers"].shape == (3, 16) and purity == 1.0
    assigned = np.asarray(clusters.nearest(fitted, jnp.asarray(images / 255, jnp.float32)))
    # Each group is one cluster, and each cluster one group.
    assert all(len(set(assigned[groups == g])) == 1 for g in range(3))
    assert len(set(assigned)) == 3
    shares = np.diff(np.concatenate([[0.0], np.asarray(fitted["cum_share"])]))
    np.testing.assert_allclose(shares, np.bincount(assigned) / len(images), atol=1e-6)
    # A centre is its group's mean image.
    for g in range(3):
        mean = images[groups == g].reshape(-1, 16).mean(axis=0) / 255
        np.testing.assert_allclose(fitted["centers"][assigned[groups == g][0]], mean, atol=1e-5)


def test_fit_is_deterministic_and_fits_a_subset_of_a_large_split(monkeypatch):
    images, groups = three_groups()
    first, _ = clusters.fit_clusters(images, groups, 3, seed=1)
    again, _ = clusters.fit_clusters(images, groups, 3, seed=1)
    np.testing.assert_array_equal(first["centers"], again["centers"])
    monkeypatch.setattr(clusters, "MAX_FIT_IMAGES", 12)
    subset, purity = clusters.fit_clusters(images, groups, 3, seed=1)
    assert purity == 1.0 and float(subset["cum_share"][-1]) == 1.0
    np.testing.assert_allclose(
        np.sort(subset["centers"][:, 0]), [20 / 255, 120 / 255, 230 / 255], atol=0.03
    )


def test_purity_counts_the_commonest_label_of_each_cluster():
    images, groups = three_groups()
    labels = groups.copy()
    labels[:5] = 2  # Half of the first group carries another label.
    _, purity = clusters.fit_clusters(images, labels, 3, seed=0)
    assert purity == pytest.approx(55 / 60)


def test_latents_fall_in_clusters_with_their_shares():
    fitted = {"centers": jnp.zeros((4, 16)), "cum_share": jnp.array([0.1, 0.4, 0.5, 1.0])}
    z = jax.random.normal(jax.random.key(0), (200_000, 8))
    counts = np.bincount(np.asarray(clusters.of_latents(fitted, z)), minlength=4)
    np.testing.assert_allclose(counts / len(z), [0.1, 0.3, 0.1, 0.5], atol=0.005)
    # Only the first coordinate decides.
    other = z.at[:, 1:].set(0.0)
    np.testing.assert_array_equal(
        clusters.of_latents(fitted, z), clusters.of_latents(fitted, other)
    )
    extreme = jnp.array([[-40.0], [40.0]])
    assert clusters.of_latents(fitted, extreme).tolist() == [0, 3]


def test_empty_clusters_have_the_shapes_fit_returns():
    images, groups = three_groups()
    fitted, _ = clusters.fit_clusters(images, groups, 3, seed=0)
    placeholder = clusters.empty(3, (4, 4, 1))
    assert jax.tree.map(jnp.shape, placeholder) == jax.tree.map(jnp.shape, fitted)
    assert jax.tree.map(jnp.dtype, placeholder) == jax.tree.map(jnp.dtype, fitted)
