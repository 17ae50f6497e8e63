"""k-means clusters of images, the labels of an unconditional GAN conditioned on its own data
(self-conditioning, Liu et al., 2020, "Diverse Image Generation via Self-Conditioned GANs").

`fit` finds the clusters once, before training; `nearest` labels an image with its cluster,
and `of_latents` draws a cluster for a latent vector, with each cluster's share of the data,
from the latent's first coordinate, so that a generator of latents alone stays a function of
them (sampling, interpolation, export).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# k-means fits a random subset of at most this many images (60 a cluster for 1,000 clusters).
MAX_FIT_IMAGES = 60_000
ITERATIONS = 10

Clusters = dict[str, jax.Array]  # {"centers": (K, D) float32, "cum_share": (K,) float32}


def empty(num_clusters: int, image_shape: tuple[int, int, int]) -> Clusters:
    """Placeholder clusters of the right shapes (all centres at 0, equal shares), which `fit`
    replaces and a checkpoint restores into."""
    dim = int(np.prod(image_shape))
    return {
        "centers": jnp.zeros((num_clusters, dim), jnp.float32),
        "cum_share": jnp.arange(1, num_clusters + 1, dtype=jnp.float32) / num_clusters,
    }


def _squared_distances(points: jax.Array, centers: jax.Array) -> jax.Array:
    """(N, K) squared Euclidean distances of `points` (N, D) to `centers` (K, D)."""
    return (
        jnp.sum(points**2, axis=1, keepdims=True)
        - 2 * points @ centers.T
        + jnp.sum(centers**2, axis=1)
    )


def _seed_centers(points: jax.Array, k: int, rng: jax.Array) -> jax.Array:
    """k-means++ seeds (Arthur & Vassilvitskii, 2007): each next centre is a point drawn with
    probability proportional to its squared distance to the nearest centre so far."""
    first = jax.random.randint(rng, (), 0, len(points))
    centers = jnp.zeros((k, points.shape[1]), points.dtype).at[0].set(points[first])
    nearest = _squared_distances(points, centers[:1])[:, 0]

    def add(i, carry):
        centers, nearest = carry
        logits = jnp.log(jnp.maximum(nearest, 1e-12))
        pick = jax.random.categorical(jax.random.fold_in(rng, i), logits)
        centers = centers.at[i].set(points[pick])
        nearest = jnp.minimum(nearest, _squared_distances(points, points[pick][None])[:, 0])
        return centers, nearest

    return jax.lax.fori_loop(1, k, add, (centers, nearest))[0]


@functools.partial(jax.jit, static_argnums=1)
def _lloyd(points: jax.Array, k: int, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Lloyd's iterations from k-means++ seeds: centres (k, D) and each point's cluster. A
    centre left without points stays where it was."""

    def step(centers, _):
        assign = jnp.argmin(_squared_distances(points, centers), axis=1)
        one_hot = jax.nn.one_hot(assign, k, dtype=points.dtype)
        counts = one_hot.sum(axis=0)
        means = (one_hot.T @ points) / jnp.maximum(counts, 1)[:, None]
        return jnp.where(counts[:, None] > 0, means, centers), None

    centers, _ = jax.lax.scan(step, _seed_centers(points, k, rng), length=ITERATIONS)
    return centers, jnp.argmin(_squared_distances(points, centers), axis=1)


def fit_clusters(
    images: np.ndarray, labels: np.ndarray, num_clusters: int, seed: int
) -> tuple[Clusters, float]:
    """k-means of `images` (N, H, W, C) uint8, in pixels scaled to [0, 1]: the centres and the
    running sum of each cluster's share of the images ("cum_share", ending at 1); and the
    clusters' purity under `labels` (N,), the share of images whose label is the most common
    one of their cluster (a yardstick only: the labels are not used)."""
    rng = np.random.default_rng(seed)
    if len(images) > MAX_FIT_IMAGES:
        subset = rng.choice(len(images), MAX_FIT_IMAGES, replace=False)
        images, labels = images[subset], labels[subset]
    points = jnp.asarray(images.reshape(len(images), -1), jnp.float32) / 255
    centers, assign = _lloyd(points, num_clusters, jax.random.key(seed))
    assign = np.asarray(assign)
    counts = np.bincount(assign, minlength=num_clusters)
    cum_share = np.cumsum(counts) / len(assign)
    cum_share[-1] = 1.0
    purity = sum(np.bincount(labels[assign == k]).max(initial=0) for k in range(num_clusters))
    clusters = {"centers": centers, "cum_share": jnp.asarray(cum_share, jnp.float32)}
    return clusters, purity / len(labels)


def nearest(clusters: Clusters, images: jax.Array) -> jax.Array:
    """The cluster (B,) int32 whose centre is nearest each image (B, H, W, C) in [0, 1]."""
    points = images.reshape(len(images), -1).astype(jnp.float32)
    return jnp.argmin(_squared_distances(points, clusters["centers"]), axis=1).astype(jnp.int32)


def of_latents(clusters: Clusters, z: jax.Array) -> jax.Array:
    """A cluster (B,) int32 for each standard-normal latent (B, D): its first coordinate's
    quantile, cut at the clusters' running shares, so clusters come with their share of the
    data."""
    quantile = jax.scipy.special.ndtr(z[:, 0])
    index = jnp.searchsorted(clusters["cum_share"], quantile, side="right")
    return jnp.minimum(index, len(clusters["cum_share"]) - 1).astype(jnp.int32)
