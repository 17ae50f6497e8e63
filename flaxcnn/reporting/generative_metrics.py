"""Sample quality of generative models, measured with a classifier of the dataset's own.

The Inception Score and the Frechet Inception Distance (Salimans et al., 2016; Heusel et al.,
2017) use an ImageNet Inception network; for MNIST-like data the usual stand-in, used here, is
a CNN classifier trained on the same dataset ("scorer"): its class probabilities give the
score and the inputs of its last dense layer (the penultimate features) the distance.

- inception_score: exp(E_x KL(p(y|x) || p(y))), from 1 (every sample classified alike or
  uncertain) to K (each sample confidently one class, all K classes equally often).
- frechet_distance: between Gaussians fitted to two feature sets,
  ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)); 0 for identical statistics.

Scores are comparable only under the same scorer. Training and loading it is
flaxcnn.scoring's work; this module computes scores over a loaded `Scorer`.
"""

import dataclasses
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# The scorer model sows its penultimate features under this name ("intermediates"), so they
# do not depend on which layer class comes last.
FEATURES = "features"


def inception_score(probs: np.ndarray) -> float:
    """exp of the mean KL divergence between each row of `probs` (N, K), a sample's class
    distribution, and their mean, the marginal class distribution: in [1, K]."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty (N, K) array, got shape {probs.shape}")
    if np.any(probs < 0) or not np.all(np.isfinite(probs)):
        raise ValueError("probs must be finite and non-negative")
    probs = probs / probs.sum(axis=1, keepdims=True)
    marginal = probs.mean(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        # 0 log 0 = 0; where a probability is positive, so is the marginal.
        kl = np.sum(np.where(probs > 0, probs * np.log(probs / marginal), 0.0), axis=1)
    return float(np.exp(np.mean(kl)))


def _trace_sqrt_product_eigh(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """Tr((S_a S_b)^(1/2)) through symmetric eigen-decompositions: the eigenvalues of S_a S_b
    are those of the PSD matrix S_a^(1/2) S_b S_a^(1/2), so the trace is the sum of their
    square roots (tiny negative round-off clipped to 0)."""
    values, vectors = np.linalg.eigh(cov_a)
    sqrt_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    return float(np.sum(np.sqrt(np.clip(inner, 0, None))))


def _trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """Tr((S_a S_b)^(1/2)): scipy's sqrtm (the reference FID code's route), dropping
    imaginary round-off; the eigen route when sqrtm fails."""
    import scipy.linalg  # Here, not at the top: 0.2 s off the start of every command.

    with warnings.catch_warnings():  # A singular product is handled below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(cov_a @ cov_b)
    if np.all(np.isfinite(root)):
        trace = np.trace(root)
        # Round-off in a (near-)singular product leaves small imaginary parts.
        if abs(trace.imag) <= 1e-3 * max(1.0, abs(trace.real)):
            return float(trace.real)
    return _trace_sqrt_product_eigh(cov_a, cov_b)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted (mean, covariance) to two (N, D) feature
    sets: ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)), clipped at 0."""
    feats_a, feats_b = (np.asarray(f, np.float64) for f in (feats_a, feats_b))
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(
            f"features must be (N, D) arrays of the same D, got {feats_a.shape} {feats_b.shape}"
        )
    if min(len(feats_a), len(feats_b)) < 2:
        raise ValueError("each feature set needs at least 2 rows for a covariance")
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a = np.atleast_2d(np.cov(feats_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(feats_b, rowvar=False))
    distance = (
        np.sum((mu_a - mu_b) ** 2)
        + np.trace(cov_a)
        + np.trace(cov_b)
        - 2 * _trace_sqrt_product(cov_a, cov_b)
    )
    return float(max(distance, 0.0))


def _sown_features(intermediates: dict) -> jax.Array:
    """The one array sown as `FEATURES` anywhere in a model's "intermediates", flattened per
    example."""
    found = [
        value
        for path, value in traverse_util.flatten_dict(intermediates).items()
        if path[-1] == FEATURES
    ]
    if len(found) != 1:
        raise ValueError(
            f"the scorer model must sow exactly one {FEATURES!r} array into 'intermediates' "
            f"(self.sow('intermediates', {FEATURES!r}, x)); found {len(found)}"
        )
    features = found[0][-1] if isinstance(found[0], tuple) else found[0]  # sow keeps a tuple.
    return features.reshape(features.shape[0], -1)


@dataclasses.dataclass
class Scorer:
    """A trained classifier: class probabilities and penultimate features of images."""

    apply_fn: Callable  # (variables, images, train=False, mutable=...) -> logits, Module.apply.
    variables: dict
    batch_size: int = 500
    test_accuracy: float | None = None  # On its dataset's test split, when known.

    def __post_init__(self):
        def probs_and_features(variables, images):
            logits, state = self.apply_fn(variables, images, train=False, mutable=["intermediates"])
            features = _sown_features(state.get("intermediates", {}))
            return jax.nn.softmax(logits.astype(jnp.float32)), features.astype(jnp.float32)

        self._apply = jax.jit(probs_and_features)

    def logits_and_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, C) images (floats in [0, 1], or uint8 0-255) -> class probabilities
        (N, K) and penultimate features (N, D), computed in batches of `batch_size` (the last
        padded, so one compilation serves every batch)."""
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / np.float32(255)
        images = images.astype(np.float32)
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"images must be a non-empty (N, H, W, C) array, got {images.shape}")
        probs, features = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            padded = np.pad(chunk, [(0, self.batch_size - len(chunk))] + [(0, 0)] * 3)
            p, f = jax.device_get(self._apply(self.variables, padded))
            probs.append(p[: len(chunk)])
            features.append(f[: len(chunk)])
        return np.concatenate(probs), np.concatenate(features)


def draw_samples(
    generate_fn: Callable[[jax.Array, int], np.ndarray],
    num_samples: int,
    rng: jax.Array,
    chunk_size: int = 1000,
) -> np.ndarray:
    """`num_samples` images of `generate_fn(rng, num)`, drawn in chunks of `chunk_size` with
    keys folded from `rng`."""
    return np.concatenate(
        [
            np.asarray(
                jax.device_get(
                    generate_fn(jax.random.fold_in(rng, i), min(chunk_size, num_samples - start))
                )
            )
            for i, start in enumerate(range(0, num_samples, chunk_size))
        ]
    )


def score_generator(
    generate_fn: Callable[[jax.Array, int], np.ndarray],
    scorer: Scorer,
    test_images: np.ndarray,
    num_samples: int = 10_000,
    rng: jax.Array | None = None,
    chunk_size: int = 1000,
) -> dict[str, float]:
    """Inception score of `num_samples` images of `generate_fn(rng, num) -> (num, H, W, C) in
    [0, 1]` (drawn in chunks of `chunk_size`) and their Frechet distance to `test_images`."""
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    rng = jax.random.key(0) if rng is None else rng
    probs, features = scorer.logits_and_features(
        draw_samples(generate_fn, num_samples, rng, chunk_size)
    )
    _, test_features = scorer.logits_and_features(test_images)
    return {
        "inception_score": inception_score(probs),
        "frechet_distance": frechet_distance(features, test_features),
    }


def real_scores(scorer: Scorer, real_images: np.ndarray, test_images: np.ndarray) -> dict:
    """The scale of the scores: the inception score of real (train) images and their Frechet
    distance to the test images, what a generator of perfect samples would reach."""
    probs, features = scorer.logits_and_features(real_images)
    _, test_features = scorer.logits_and_features(test_images)
    return {
        "real_inception_score": inception_score(probs),
        "real_frechet_distance": frechet_distance(features, test_features),
    }


def conditional_accuracy(
    generate_fn: Callable[[jax.Array, jax.Array], np.ndarray],
    scorer: Scorer,
    num_classes: int,
    per_class: int = 1000,
    rng: jax.Array | None = None,
) -> dict:
    """The scorer's accuracy on `per_class` samples of `generate_fn(rng, labels)` drawn for
    each class: "conditional_accuracy" (mean over the classes) and, per class,
    "per_class_conditional_accuracy"."""
    rng = jax.random.key(1) if rng is None else rng
    accuracies = []
    for label in range(num_classes):
        labels = jnp.full((per_class,), label, jnp.int32)
        images = np.asarray(jax.device_get(generate_fn(jax.random.fold_in(rng, label), labels)))
        probs, _ = scorer.logits_and_features(images)
        accuracies.append(float(np.mean(np.argmax(probs, axis=1) == label)))
    return {
        "conditional_accuracy": float(np.mean(accuracies)),
        "per_class_conditional_accuracy": accuracies,
    }


def evaluate_generator(
    draw: Callable[..., np.ndarray],
    scorer: Scorer,
    test_images: np.ndarray,
    train_images: np.ndarray,
    num_samples: int,
    num_classes: int = 0,
) -> dict:
    """`score_generator` of `num_samples` samples of `draw(rng, num, labels=None)` against
    `test_images`, with the scorer's test accuracy and `real_scores` of as many
    `train_images`; for a model of `num_classes` classes also their `conditional_accuracy`."""
    results = score_generator(lambda rng, num: draw(rng, num), scorer, test_images, num_samples)
    results["scorer_test_accuracy"] = scorer.test_accuracy
    results.update(real_scores(scorer, train_images[:num_samples], test_images))
    if num_classes:
        per_class = max(num_samples // num_classes, 1)
        results.update(
            conditional_accuracy(
                lambda rng, labels: draw(rng, len(labels), labels), scorer, num_classes, per_class
            )
        )
    return results
