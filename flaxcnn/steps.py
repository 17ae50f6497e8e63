"""Pure training and evaluation steps for image classification.

Both take and return plain pytrees, so they run eagerly, under `jax.jit`, and over a mesh
unchanged. Metrics come back as sums with an example `count`, so that batches of any size
and padded evaluation batches (`mask`) average correctly on the host.
"""

import jax
import jax.numpy as jnp
import optax

from flaxcnn.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


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
    state: TrainState, batch: Batch, rng: jax.Array, *, microbatch_size: int = 0
) -> tuple[TrainState, Metrics]:
    """One optimizer update on the mean cross-entropy of `batch`.

    `rng` is the run's key; the step folds in `state.step`, so each step draws fresh
    dropout noise and a resumed run draws the same noise. With `microbatch_size` smaller
    than the batch, gradients are summed over equal microbatches: the same update
    (up to summation order; batch norm then sees microbatch statistics) with a working set
    that stays in cache, which is several times faster on CPUs.
    """
    rng = jax.random.fold_in(rng, state.step)
    images, labels = batch["image"], batch["label"]
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
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def eval_step(state: TrainState, batch: Batch) -> Metrics:
    """Summed loss and accuracy over the examples of `batch` whose `mask` is set."""
    logits = state.apply_fn(state.variables(), batch["image"], train=False)
    weights = batch.get("mask", jnp.ones_like(batch["label"], bool)).astype(jnp.float32)
    return classification_metrics(logits, batch["label"], weights)
