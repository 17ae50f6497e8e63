"""Image classification: softmax cross-entropy on integer labels.

The steps take and return plain pytrees, so they run eagerly, under `jax.jit`, and over a mesh
unchanged. Metrics come back as sums with an example `count`, so that batches of any size
and padded evaluation batches (`mask`) average correctly on the host.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flaxcnn.data import augment, input_pipeline
from flaxcnn.models import create_model
from flaxcnn.reporting import reports
from flaxcnn.runtime import sharding
from flaxcnn.training import regularization
from flaxcnn.training.state import TrainState, create_optimizer, create_train_state, model_kwargs

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def create_state(
    config: ml_collections.ConfigDict,
    rng: jax.Array,
    input_shape: tuple[int, int, int],
    num_classes: int,
    total_steps: int,
) -> TrainState:
    """`config.model` with `num_classes` outputs in `config.compute_dtype`, and
    `config.optimizer`, initialised (with a moving average when `config.ema_decay` > 0)."""
    model = create_model(config.model, num_classes=num_classes, **model_kwargs(config))
    tx = create_optimizer(config, total_steps)
    return create_train_state(model, tx, rng, input_shape, ema_decay=config.ema_decay)


def step_kwargs(config: ml_collections.ConfigDict) -> dict:
    """`train_step`'s static settings from the config. A microbatch size of -1 means 32 per
    device on CPUs and 0 (whole batch) elsewhere."""
    microbatch_size = config.microbatch_size
    if microbatch_size < 0:
        microbatch_size = 32 * jax.device_count() if jax.default_backend() == "cpu" else 0
    return {
        "microbatch_size": microbatch_size,
        "augmentation": augment.from_config(config),
        "l2": config.l2,
        "skip_nonfinite": config.skip_nonfinite,
    }


def classification_metrics(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> Metrics:
    """Summed cross-entropy and correct predictions over the examples with weight 1."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    return {
        "loss": jnp.sum(losses * weights),
        "accuracy": jnp.sum(correct * weights),
        "count": jnp.sum(weights),
    }


def num_microbatches(batch_size: int, microbatch_size: int) -> int:
    """The fewest equal microbatches of at most `microbatch_size` (0: one) the batch splits into."""
    if microbatch_size <= 0:
        return 1
    return next(
        n for n in range(-(-batch_size // microbatch_size), batch_size + 1) if batch_size % n == 0
    )


def _microbatches(x: jax.Array, num: int) -> jax.Array:
    """(B, ...) -> (num, B // num, ...), microbatch i holding examples i, i + num, ...

    Strided rather than contiguous, so a batch sharded over devices stays evenly sharded.
    """
    return x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    microbatch_size: int = 0,
    augmentation: dict[str, float] | None = None,
    l2: float = 0.0,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, Metrics]:
    """One optimizer update on the mean cross-entropy of `batch` (plus `l2` times
    `regularization.l2_penalty`), after random `augmentation` of its images
    (`augment.augment`'s strengths).

    `rng` is the run's key; the step folds in `state.step`, so each step draws fresh
    augmentation and dropout noise and a resumed run draws the same. With `microbatch_size`
    smaller than the batch, gradients are summed over equal microbatches: the same update
    (up to summation order; batch norm then sees microbatch statistics) with a working set
    that stays in cache, which is several times faster on CPUs. With `skip_nonfinite`, an
    update whose loss or gradients are not finite is skipped (parameters and optimizer
    unchanged, the step still counted) and reported in the "skipped" metric instead of
    the loss and accuracy.
    """
    rng, augment_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    images = augment.augment(batch["image"], augment_rng, **(augmentation or {}))
    labels = batch["label"]
    batch_size = labels.shape[0]

    def loss_and_grads(batch_stats, images, labels, rng):
        def loss_fn(params):
            variables = {"params": params}
            if batch_stats:
                variables["batch_stats"] = batch_stats
            logits, updates = state.apply_fn(
                variables, images, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
            )
            metrics = classification_metrics(logits, labels, jnp.ones_like(labels, jnp.float32))
            return metrics["loss"], (metrics, updates.get("batch_stats", batch_stats))

        grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        return grads, metrics, batch_stats

    num_micro = num_microbatches(batch_size, microbatch_size)
    micro_rngs = jax.random.split(rng, num_micro) if num_micro > 1 else [rng]
    grads, metrics, batch_stats = None, None, state.batch_stats
    # Unrolled rather than a lax.scan: XLA:CPU runs convolutions inside loops far slower.
    for i in range(num_micro):
        micro = jax.tree.map(lambda x, i=i: _microbatches(x, num_micro)[i], (images, labels))
        g, m, batch_stats = loss_and_grads(batch_stats, *micro, micro_rngs[i])
        grads, metrics = (g, m) if i == 0 else jax.tree.map(jnp.add, (grads, metrics), (g, m))

    grads = jax.tree.map(lambda g: g / batch_size, grads)
    grads = regularization.add_l2_gradient(grads, state.params, l2)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if not skip_nonfinite:
        return new_state, metrics
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.global_norm(grads))
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = jax.tree.map(lambda m: jnp.where(finite, m, 0.0), metrics)
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return kept.replace(step=new_state.step), metrics


def eval_step(state: TrainState, batch: Batch, rng: jax.Array | None = None) -> Metrics:
    """Summed loss and accuracy over the examples of `batch` whose `mask` is set.

    `rng` is unused: evaluation of a classifier is deterministic."""
    del rng
    logits = state.apply_fn(state.eval_variables(), batch["image"], train=False)
    weights = batch.get("mask", jnp.ones_like(batch["label"], bool)).astype(jnp.float32)
    return classification_metrics(logits, batch["label"], weights)


def predict(state: TrainState, batch: Batch) -> jax.Array:
    """The predicted class of every example of `batch`."""
    logits = state.apply_fn(state.eval_variables(), batch["image"], train=False)
    return jnp.argmax(logits, axis=-1)


def extra_results(
    state: TrainState,
    config: ml_collections.ConfigDict,
    workdir: str,
    test_split: input_pipeline.Split,
) -> dict:
    """Per-class accuracy and the confusion matrix of the test split (also drawn in
    `workdir/confusion_test.png`)."""
    mesh = sharding.create_mesh()
    # The mask comes back replicated with the predictions: every process keeps all of them.
    predict_fn = jax.jit(
        lambda state, batch: (predict(state, batch), batch["mask"]),
        out_shardings=sharding.replicated(mesh),
    )
    predictions = []
    for batch in input_pipeline.eval_batches(test_split, config.eval_batch_size):
        batch_predictions, mask = predict_fn(state, sharding.shard_batch(batch, mesh))
        predictions.append(np.asarray(batch_predictions)[np.asarray(mask)])
    report = reports.classification_report(
        test_split.labels,
        np.concatenate(predictions),
        test_split.num_classes,
        test_split.class_names,
    )
    if jax.process_index() == 0:
        path = os.path.join(workdir, "confusion_test.png")
        reports.plot_confusion_matrix(
            np.array(report["confusion_matrix"]), report["class_names"], path, "test"
        )
    return {key: report[key] for key in ("per_class_accuracy", "confusion_matrix")}
