"""A task's pure steps, compiled for the loop: several training steps per dispatch on the data
kept on the device, evaluation over any rows of a device split, and the host-side averaging
of their metric sums.

Every task's `train_step(state, batch, rng) -> (state, metrics)` and
`eval_step(state, batch, rng) -> metrics` return sums over examples plus their "count"; the
functions here only add the dispatching, so the steps themselves stay unit-testable.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxcnn import config as config_lib
from flaxcnn import cpu
from flaxcnn.data import batching, device_data
from flaxcnn.runtime import sharding

# Metrics that stay totals on the host rather than being divided by the example count.
TOTAL_METRICS = ("skipped", "confusion")


def mean_metrics(batch_metrics: list[dict]) -> dict:
    """Sums metric sums (of batches, or stacked per step) on the host and divides them by
    the example count. "skipped" (steps) stays a total, and so does "confusion", a
    (true, predicted) count matrix summed over the batches."""
    fetched = jax.device_get(batch_metrics)
    totals = {
        name: (
            sum(np.asarray(m[name]) for m in fetched)
            if name == "confusion"
            else float(sum(np.sum(m[name]) for m in fetched))
        )
        for name in fetched[0]
    }
    count = totals.pop("count")
    return {
        name: value if name in TOTAL_METRICS else (value / count if count else float("nan"))
        for name, value in totals.items()
    }


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The metrics a log line, JSONL record or TensorBoard scalar can hold."""
    return {name: value for name, value in metrics.items() if np.ndim(value) == 0}


def first_nonfinite_step(step_metrics: list[dict], last_step: int) -> int:
    """The step whose loss was first not finite, given the stacked per-step metrics of the
    steps up to `last_step`."""
    losses = np.concatenate([np.ravel(m["loss"]) for m in jax.device_get(step_metrics)])
    return last_step - len(losses) + 1 + int(np.argmin(np.isfinite(losses)))


def multi_step(train_step, state, data: device_data.DeviceSplit, indices: jax.Array, rng):
    """`len(indices)` training steps in one dispatch, each on the batch `data[indices[i]]`,
    with the per-step metrics stacked. `train_step` stays the pure single step."""
    if len(indices) == 1:  # Not a loop of one: XLA:CPU runs convolutions in loops slowly.
        state, metrics = train_step(state, device_data.gather_batch(data, indices[0]), rng)
        return state, jax.tree.map(lambda m: m[None], metrics)

    def body(state, batch_indices):
        return train_step(state, device_data.gather_batch(data, batch_indices), rng)

    return jax.lax.scan(body, state, indices)


def multi_eval(eval_step, state, data: device_data.DeviceSplit, indices, mask, rng):
    """The summed metrics of `len(indices)` evaluation batches `data[indices[i]]` (examples
    where `mask[i]` is False not counted) in one dispatch."""

    def batch_metrics(batch_indices, batch_mask):
        batch = {**device_data.gather_batch(data, batch_indices), "mask": batch_mask}
        return eval_step(state, batch, rng)

    totals = batch_metrics(indices[0], mask[0])
    if len(indices) == 1:
        return totals

    def body(totals, batch):
        return jax.tree.map(jnp.add, totals, batch_metrics(*batch)), None

    return jax.lax.scan(body, totals, (indices[1:], mask[1:]))[0]


def resolve_steps_per_dispatch(requested: int, has_convolutions: bool) -> int:
    """`config.steps_per_dispatch`, with -1 resolved to 16, or to 1 on CPUs for models with
    `lax.conv` convolutions, which XLA:CPU runs many times slower inside a loop."""
    if requested > 0:
        return requested
    return 1 if has_convolutions and jax.default_backend() == "cpu" else 16


@dataclasses.dataclass
class CompiledSteps:
    """`train[k]` runs k training steps per dispatch; `evaluate[k]` sums the metrics of k
    evaluation batches per dispatch; compiled ahead of time for the shapes they see, so that
    another shape is an error rather than a silent recompilation."""

    train: dict
    evaluate: dict
    compile_time_s: float


def _index_spec(mesh, k: int, batch_size: int, dtype=np.int32) -> jax.ShapeDtypeStruct:
    sharded = device_data.index_sharding(mesh, batch_size)
    return jax.ShapeDtypeStruct((k, batch_size), dtype, sharding=sharded)


def lower_evaluation(eval_step, state, data, batch_size: int, mesh, rng, k: int):
    """`multi_eval` of k batches of `batch_size` rows of `data`, lowered for these shapes."""
    specs = [_index_spec(mesh, k, batch_size, dtype) for dtype in (np.int32, bool)]
    evaluate = jax.jit(
        functools.partial(multi_eval, eval_step), out_shardings=sharding.replicated(mesh)
    )
    return evaluate.lower(state, data, *specs, rng)


def compile_evaluation(
    eval_step, state, data, batch_size: int, mesh, rng, num_examples: int
) -> dict:
    """{k: compiled `multi_eval`}, what `evaluate` takes, for evaluation outside a training
    run: k = 1, and 16 batches per dispatch when `num_examples` make that many."""
    return {
        k: cpu.compile_for_this_backend(
            lower_evaluation(eval_step, state, data, batch_size, mesh, rng, k)
        )
        for k in sizes_up_to((16, 1), -(-num_examples // batch_size))
    }


def sizes_up_to(sizes: tuple[int, ...], most: int | None) -> list[int]:
    """`sizes` without those over `most` (a run never dispatches more at once), 1 kept."""
    return sorted(k for k in set(sizes) if k == 1 or most is None or k <= most)


def compile_steps(
    task,
    config,
    state,
    data,
    eval_data,
    mesh,
    rng,
    most_steps: int | None = None,
    most_eval_batches: int | None = None,
) -> CompiledSteps:
    """The task's steps for `data` (training) and `eval_data` (evaluation): for training k in
    (steps per dispatch, a quarter of it, 1), which cover what is left before a log step in a
    few dispatches (each dispatch takes CPU time from the step on a small machine; each size
    is one more compilation); for evaluation k in (steps per dispatch, 1). Sizes over
    `most_steps` (`most_eval_batches`), the most the run dispatches at once, are left out."""
    start = time.perf_counter()
    eval_batch_size = config_lib.eval_batch_size(config)

    def lower_eval(k):
        return lower_evaluation(task.eval_step, state, eval_data, eval_batch_size, mesh, rng, k)

    single_eval = lower_eval(1)
    steps_per_dispatch = resolve_steps_per_dispatch(
        config.steps_per_dispatch, "stablehlo.convolution" in single_eval.as_text()
    )
    # Jitted on its own, the step is traced once for all the dispatch sizes.
    train_step = jax.jit(functools.partial(task.train_step, **task.step_kwargs(config)))
    train = jax.jit(
        functools.partial(multi_step, train_step),
        donate_argnums=0,
        out_shardings=sharding.replicated(mesh),
    )
    train_fns = {
        k: cpu.compile_for_this_backend(
            train.lower(state, data, _index_spec(mesh, k, config.batch_size), rng)
        )
        for k in sizes_up_to((steps_per_dispatch, max(steps_per_dispatch // 4, 1), 1), most_steps)
    }
    eval_fns = {
        k: cpu.compile_for_this_backend(single_eval if k == 1 else lower_eval(k))
        for k in sizes_up_to((steps_per_dispatch, 1), most_eval_batches)
    }
    return CompiledSteps(train_fns, eval_fns, time.perf_counter() - start)


def evaluate(
    eval_fns: dict, state, data: device_data.DeviceSplit, rows: range, batch_size: int, mesh, rng
) -> tuple[dict, int]:
    """The task's metrics over the examples `rows` of `data`, and their number: padded and
    masked batches of `batch_size`, as many per dispatch as `eval_fns` allows."""
    indices, mask = batching.padded_indices(len(rows), batch_size)
    indices += rows.start
    k = max(eval_fns)
    batch_metrics, start = [], 0
    while start < len(indices):
        n = k if len(indices) - start >= k else 1
        chunk = [device_data.shard_indices(a[start : start + n], mesh) for a in (indices, mask)]
        batch_metrics.append(eval_fns[n](state, data, *chunk, rng))
        start += n
    count = int(sum(float(m["count"]) for m in batch_metrics))
    return mean_metrics(batch_metrics), count
