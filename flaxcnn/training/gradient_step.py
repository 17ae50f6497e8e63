"""The task-independent gradient step: everything of a training step but the loss.

A task gives its loss as a pure function (`LossFn`); `gradient_step` does the rest, the same
for every task: per-step randomness, augmentation, microbatches, the mean over the batch,
the L2 term, the optimizer update (clipping and the moving average of the parameters live in
the optimizer and `TrainState`) and the skipping of non-finite updates. So a training
setting works for every task that uses it, or the task rejects it (`validate`).

`keep_if_finite` is the one copy of the skip: tasks with a step of their own (the GAN's two
updates) call it too.
"""

from typing import Any, Protocol, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flaxcnn.data import augment
from flaxcnn.training import regularization
from flaxcnn.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
State = TypeVar("State")


class LossFn(Protocol):
    """A task's loss, summed (not averaged) over the examples of `batch`.

    `variables` holds "params" and, when the model has batch norm, "batch_stats"; `rng` is
    this step's (and microbatch's) key for dropout or sampling. Returns the summed loss to
    differentiate, and as auxiliaries the metric sums (with the example "count"; the loop
    logs their means) and the updated batch statistics (the given ones when the model has
    none: `apply_training` returns them so).
    """

    def __call__(
        self, apply_fn: Any, variables: dict, batch: Batch, rng: jax.Array
    ) -> tuple[jax.Array, tuple[Metrics, Any]]: ...


def apply_training(apply_fn: Any, variables: dict, *args, **kwargs) -> tuple[Any, Any]:
    """`apply_fn(variables, *args, train=True, **kwargs)` with the batch statistics mutable:
    (output, updated batch statistics, or `variables`' own, {} when the model has none)."""
    output, updates = apply_fn(variables, *args, train=True, mutable=["batch_stats"], **kwargs)
    return output, updates.get("batch_stats", variables.get("batch_stats", {}))


def step_kwargs(config: ml_collections.ConfigDict, cpu_microbatch_size: int = 0) -> dict:
    """`gradient_step`'s settings from the config. A microbatch size of -1 means
    `cpu_microbatch_size` on CPUs (the task's choice) and 0 (whole batch) elsewhere. It is
    the global microbatch, whatever the number of devices, so that a model with batch norm
    (statistics over each microbatch) trains alike on 1 device or 8."""
    validate(config)
    microbatch_size = config.microbatch_size
    if microbatch_size < 0:
        on_cpu = jax.default_backend() == "cpu"
        microbatch_size = cpu_microbatch_size if on_cpu else 0
    return {
        "microbatch_size": microbatch_size,
        "augmentation": augment.from_config(config),
        "l2": config.l2,
        "skip_nonfinite": bool(config.skip_nonfinite),
    }


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError (one line) for a setting of this step that cannot work. (The
    augmentation settings are checked by `augment.from_config`, in `step_kwargs`.)"""
    size = config.microbatch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < -1:
        raise ValueError(
            "config.microbatch_size must be >= 0 (0: whole batch) or -1 (the task's choice), "
            f"got {size!r}"
        )


def num_microbatches(batch_size: int, microbatch_size: int) -> int:
    """The fewest equal microbatches of at most `microbatch_size` (0: one) the batch splits into."""
    if microbatch_size <= 0:
        return 1
    return next(
        n for n in range(-(-batch_size // microbatch_size), batch_size + 1) if batch_size % n == 0
    )


def microbatches(x: jax.Array, num: int) -> jax.Array:
    """(B, ...) -> (num, B // num, ...), microbatch i holding examples i, i + num, ...

    Strided rather than contiguous, so a batch sharded over devices stays evenly sharded.
    """
    return x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)


def keep_if_finite(
    new_state: State, state: State, metrics: Metrics, finite: jax.Array
) -> tuple[State, Metrics]:
    """`new_state` where `finite` (a scalar bool) holds; else `state` with `new_state`'s
    step, so that the skipped step still counts. The metrics are zeroed when skipped, and
    "skipped" (1.0 or 0.0) is added: the loop totals it instead of stopping the run."""
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = jax.tree.map(lambda m: jnp.where(finite, m, 0.0), metrics)
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return kept.replace(step=new_state.step), metrics


def _grads(loss_fn: LossFn, state: TrainState, batch_stats: Any, batch: Batch, rng: jax.Array):
    def loss_of_params(params):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        return loss_fn(state.apply_fn, variables, batch, rng)

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_of_params, has_aux=True)(
        state.params
    )
    return grads, loss, metrics, batch_stats


def gradient_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    loss_fn: LossFn,
    *,
    microbatch_size: int = 0,
    augmentation: dict[str, Any] | None = None,
    l2: float = 0.0,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, Metrics]:
    """One optimizer update on `loss_fn`'s mean over `batch` (plus `l2` times
    `regularization.l2_penalty`), after random `augmentation` of `batch["image"]`
    (`augment.augment`'s strengths).

    `rng` is the run's key; the step folds in `state.step`, so each step draws fresh
    augmentation, dropout and sampling noise and a resumed run draws the same. With
    `microbatch_size` smaller than the batch, gradients are summed over equal strided
    microbatches, each with its own key: the same update (up to summation order; batch norm
    then sees microbatch statistics, threaded from one microbatch to the next) with a working
    set that stays in cache, which is several times faster on CPUs. With `skip_nonfinite`,
    an update whose loss or gradients are not finite is skipped (`keep_if_finite`).
    """
    rng, augment_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    batch = augment.augment_batch(batch, augment_rng, **(augmentation or {}))
    batch_size = batch["image"].shape[0]
    num = num_microbatches(batch_size, microbatch_size)
    micro_rngs = jax.random.split(rng, num) if num > 1 else [rng]
    totals, batch_stats = None, state.batch_stats
    # Unrolled rather than a lax.scan: XLA:CPU runs convolutions inside loops far slower.
    for i in range(num):
        micro = jax.tree.map(lambda x, i=i: microbatches(x, num)[i], batch)
        *sums, batch_stats = _grads(loss_fn, state, batch_stats, micro, micro_rngs[i])
        # Sums of (gradients, loss, metrics) over the microbatches.
        totals = sums if i == 0 else jax.tree.map(jnp.add, totals, sums)
    grads, loss, metrics = totals

    grads = jax.tree.map(lambda g: g / batch_size, grads)
    grads = regularization.add_l2_gradient(grads, state.params, l2)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if not skip_nonfinite:
        return new_state, metrics
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    return keep_if_finite(new_state, state, metrics, finite)
