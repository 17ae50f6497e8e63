"""Sample quality of generative models, measured with a classifier of the dataset's own.

The Inception Score and the Frechet Inception Distance (Salimans et al., 2016; Heusel et al.,
2017) use an ImageNet Inception network; for MNIST-like data the usual stand-in, used here, is
a CNN classifier trained on the same dataset ("scorer"): its class probabilities give the
score and the inputs of its last dense layer (the penultimate features) the distance.

- inception_score: exp(E_x KL(p(y|x) || p(y))), from 1 (every sample classified alike or
  uncertain) to K (each sample confidently one class, all K classes equally often).
- frechet_distance: between Gaussians fitted to two feature sets,
  ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)); 0 for identical statistics.

Scores are comparable only under the same scorer: it is trained once per dataset by this
project's own training loop into `cache_dir/<dataset>` and restored from there afterwards.
"""

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

try:
    import scipy.linalg as _scipy_linalg
except ImportError:  # scipy comes with jax; the eigen-decomposition route needs only numpy.
    _scipy_linalg = None

DEFAULT_SCORER_DIR = "~/.cache/flaxcnn/scorers"
SCORER_CONFIG_FILE = "scorer_config.json"
RESULTS_FILE = "results.json"  # Written by the training loop when a run finishes.


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
    """Tr((S_a S_b)^(1/2)): scipy's sqrtm when scipy is there (the reference FID code's
    route), dropping imaginary round-off; the eigen route otherwise or when sqrtm fails."""
    if _scipy_linalg is not None:
        with warnings.catch_warnings():  # A singular product is handled below.
            warnings.simplefilter("ignore", _scipy_linalg.LinAlgWarning)
            root = _scipy_linalg.sqrtm(cov_a @ cov_b)
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


def _capture_dense_inputs(apply: Callable) -> tuple:
    """Runs `apply()` and returns its output and the input of the last `nn.Dense` it called
    (a classifier's penultimate features), flattened per example."""
    inputs = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            inputs.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        out = apply()
    if not inputs:
        raise ValueError("the scorer model has no dense layer to take features from")
    return out, inputs[-1].reshape(inputs[-1].shape[0], -1)


@dataclasses.dataclass
class Scorer:
    """A trained classifier: class probabilities and penultimate features of images."""

    apply_fn: Callable  # (variables, images, train=False) -> logits, a Flax `Module.apply`.
    variables: dict
    batch_size: int = 500

    def __post_init__(self):
        def probs_and_features(variables, images):
            logits, features = _capture_dense_inputs(
                lambda: self.apply_fn(variables, images, train=False)
            )
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


def scorer_config(dataset: str, data_dir: str | None) -> ml_collections.ConfigDict:
    """The scorer's recipe: a small `CNN` (widths 16, 32, 64: 576 penultimate features on
    28x28 images, few enough for fast covariance square roots), 3 epochs of Adam 1e-3 on a cosine
    schedule, batch 128, on the whole train split (99% on MNIST's test set)."""
    from flaxcnn import default_config

    config = default_config.get_config()
    config.task = "classification"
    config.dataset = dataset
    config.data_dir = data_dir
    config.model = "CNN"
    config.model_kwargs = ml_collections.ConfigDict({"widths": (16, 32, 64), "dropout_rate": 0.3})
    config.train_split = "train[:95%]"
    config.validation_split = "train[95%:]"
    config.batch_size = 128
    config.num_epochs = 3
    config.lr_schedule = "cosine"
    config.keep_checkpoints = 1
    config.checkpoint_every_epochs = config.num_epochs
    return config


def load_or_train_scorer(
    dataset: str, data_dir: str | None, cache_dir: str, *, overrides: dict | None = None
) -> Scorer:
    """The scorer of `dataset` kept in `cache_dir/<dataset>`, trained there first (with
    `scorer_config` updated by `overrides`) when that folder holds no finished run.

    A kept scorer is restored with the config it was trained with, whatever `overrides` say.
    """
    # Imported here: the training loop imports the tasks, and the tasks import this module.
    from flaxcnn.data import input_pipeline
    from flaxcnn.tasks import classification
    from flaxcnn.training import loop
    from flaxcnn.training.checkpointing import Checkpointer

    workdir = os.path.join(os.path.expanduser(cache_dir), re.sub(r"[^\w.-]+", "_", dataset))
    config_path = os.path.join(workdir, SCORER_CONFIG_FILE)
    if not os.path.exists(os.path.join(workdir, RESULTS_FILE)):
        config = scorer_config(dataset, data_dir)
        config.update(overrides or {})
        os.makedirs(workdir, exist_ok=True)
        with open(config_path, "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        loop.train_and_evaluate(config, workdir)
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.data_dir = data_dir  # The data may have moved since; the model has not.
    # The model's input shape and classes, from the split its training was tested on.
    test = input_pipeline.load_split(
        dataset, config.test_split, data_dir, config.get("image_size"), config.get("color_mode")
    )
    state = classification.create_state(
        config, jax.random.key(0), test.image_shape, test.num_classes, 1
    )
    checkpointer = Checkpointer(workdir, 1)
    if checkpointer.latest_step() is None:
        checkpointer.close()
        raise ValueError(f"no scorer checkpoint in {workdir}: delete the folder to retrain it")
    state = checkpointer.restore_or(state)
    checkpointer.close()
    # The variables evaluation uses (a moving average of the parameters, where kept).
    variables = getattr(state, "eval_variables", state.variables)()
    return Scorer(state.apply_fn, jax.device_get(variables))


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
    samples = [
        np.asarray(
            jax.device_get(
                generate_fn(jax.random.fold_in(rng, i), min(chunk_size, num_samples - start))
            )
        )
        for i, start in enumerate(range(0, num_samples, chunk_size))
    ]
    probs, features = scorer.logits_and_features(np.concatenate(samples))
    _, test_features = scorer.logits_and_features(test_images)
    return {
        "inception_score": inception_score(probs),
        "frechet_distance": frechet_distance(features, test_features),
    }


def evaluate_generator(
    generate_fn: Callable[[jax.Array, int], np.ndarray],
    config: ml_collections.ConfigDict,
    test_images: np.ndarray | None = None,
    rng: jax.Array | None = None,
) -> dict[str, float]:
    """`score_generator` as a task's `extra_results` runs it: `config.score_samples` samples
    (0 or absent: off, {}) against `test_images` (by default `config.test_split` of
    `config.dataset`), under the scorer kept in `config.scorer_dir`. Also reports the
    inception score of the test images themselves: what a perfect generator would reach."""
    num_samples = config.get("score_samples", 0)
    if not num_samples:
        return {}
    # The scorer sees images as the generator's data were read.
    image_settings = {key: config.get(key) for key in ("image_size", "color_mode")}
    scorer = load_or_train_scorer(
        config.dataset,
        config.data_dir,
        config.get("scorer_dir", DEFAULT_SCORER_DIR),
        overrides={k: v for k, v in image_settings.items() if v is not None},
    )
    if test_images is None:
        from flaxcnn.data import input_pipeline

        test_images = input_pipeline.load_split(
            config.dataset, config.test_split, config.data_dir, **image_settings
        ).images
    scores = score_generator(generate_fn, scorer, test_images, num_samples, rng)
    real_probs, _ = scorer.logits_and_features(test_images)
    return {**scores, "real_inception_score": inception_score(real_probs)}
