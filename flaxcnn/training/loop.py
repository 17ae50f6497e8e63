"""The training loop, shared by every task: data, state, restore-or-init, compiled steps,
validation, checkpoints, and the final test evaluation written to `results.json`."""

import functools
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from flaxcnn import run_files, tasks
from flaxcnn.data import device_data, input_pipeline
from flaxcnn.models import MODELS
from flaxcnn.reporting import reports
from flaxcnn.reporting.writers import MetricWriter, Progress, plot_curves
from flaxcnn.runtime import sharding
from flaxcnn.training.checkpointing import Checkpointer
from flaxcnn.training.early_stopping import EarlyStopping
from flaxcnn.training.signals import StopOnSignal
from flaxcnn.training.state import validate_optimization

RESULTS_FILE = "results.json"
EARLY_STOPPING_FILE = "early_stopping.json"
BEST_CHECKPOINTS = "checkpoints_best"
NUM_PICTURE_IMAGES = 32


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first setting that cannot work (before anything is
    traced, so that the message stays one line)."""
    tasks.get_task(config.task)
    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; valid: {', '.join(sorted(MODELS))}")
    validate_optimization(config)
    for key in ("learning_rate", "batch_size", "eval_batch_size"):
        if not config[key] > 0:
            raise ValueError(f"config.{key} must be positive, got {config[key]}")
    if not (config.steps_per_dispatch > 0 or config.steps_per_dispatch == -1):
        raise ValueError(
            f"config.steps_per_dispatch must be positive or -1, got {config.steps_per_dispatch}"
        )
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ValueError(f"config.num_epochs must be positive, got {config.num_epochs}")
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % jax.device_count():
            raise ValueError(
                f"config.{key}={config[key]} is not divisible by the {jax.device_count()} devices"
            )


def write_json_atomically(path: str, data: dict) -> None:
    """Writes `data` so that `path` holds either the old or the complete new content."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def mean_metrics(batch_metrics: list[dict]) -> dict[str, float]:
    """Sums metric sums (of batches, or stacked per step) on the host and divides them by
    the example count; "skipped" (steps) stays a total."""
    totals = jax.tree.map(
        lambda *xs: float(sum(np.sum(x) for x in xs)), *jax.device_get(batch_metrics)
    )
    count = totals.pop("count")
    return {
        name: value if name == "skipped" else (value / count if count else float("nan"))
        for name, value in totals.items()
    }


def first_nonfinite_step(step_metrics: list[dict], last_step: int) -> int:
    """The step whose loss was first not finite, given the stacked per-step metrics of the
    steps up to `last_step`."""
    losses = np.concatenate([np.ravel(m["loss"]) for m in jax.device_get(step_metrics)])
    return last_step - len(losses) + 1 + int(np.argmin(np.isfinite(losses)))


def evaluate(
    eval_fns: dict, state, data: device_data.DeviceSplit, rows: range, batch_size: int, mesh, rng
):
    """The task's metrics over the examples `rows` of `data`, and their number: batches of
    `batch_size`, as many per dispatch as `eval_fns` (see `compile_steps`) allows."""
    indices, mask = device_data.eval_indices(len(rows), batch_size)
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


def compile_steps(task, config, state, data, eval_data, mesh, rng):
    """The task's steps, compiled ahead of time for the shapes they see (so that another
    shape is an error rather than a silent recompilation): `{k: fn}` running k training
    steps per dispatch on `data`, and `{k: fn}` summing the metrics of k evaluation batches
    of `eval_data` per dispatch: for training k in (steps per dispatch, a quarter of it, 1),
    which cover what is left before a log step in a few dispatches (each dispatch takes CPU
    time from the step on a small machine; each size is one more compilation); for
    evaluation k in (steps per dispatch, 1)."""
    replicated = sharding.replicated(mesh)

    def index_spec(k, batch_size, dtype=np.int32):
        return jax.ShapeDtypeStruct(
            (k, batch_size),
            dtype,
            sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data")),
        )

    def lower_eval(k):
        spec = index_spec(k, config.eval_batch_size)
        mask = index_spec(k, config.eval_batch_size, bool)
        return jax.jit(
            functools.partial(multi_eval, task.eval_step), out_shardings=replicated
        ).lower(state, eval_data, spec, mask, rng)

    single_eval = lower_eval(1)
    steps_per_dispatch = resolve_steps_per_dispatch(
        config.steps_per_dispatch, "stablehlo.convolution" in single_eval.as_text()
    )
    train_step = functools.partial(task.train_step, **task.step_kwargs(config))
    train_fns = {
        k: jax.jit(
            functools.partial(multi_step, train_step), donate_argnums=0, out_shardings=replicated
        )
        .lower(state, data, index_spec(k, config.batch_size), rng)
        .compile()
        for k in sorted({steps_per_dispatch, max(steps_per_dispatch // 4, 1), 1})
    }
    eval_fns = {
        k: (single_eval if k == 1 else lower_eval(k)).compile()
        for k in sorted({steps_per_dispatch, 1})
    }
    return train_fns, eval_fns


def load_early_stopping(config: ml_collections.ConfigDict, workdir: str, epoch: int):
    """The early-stopping record of the run in `workdir` (forgetting epochs after `epoch`,
    which a resumed run redoes), or a fresh one."""
    path = os.path.join(workdir, EARLY_STOPPING_FILE)
    history = []
    if os.path.exists(path):
        with open(path) as f:
            history = EarlyStopping.from_dict(json.load(f)).history
    stopper = EarlyStopping.from_config(config, history)
    stopper.truncate_after(epoch)
    return stopper


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config.model` for `config.task` on `config.dataset`, resuming from `workdir`
    if it holds a run, and returns (and writes to `workdir/results.json`) the test metrics.

    With early stopping on, the best validation checkpoint is kept beside the newest ones
    and the test evaluation uses it. SIGTERM or SIGINT saves a checkpoint of the current
    step and raises `preemption.Interrupted`."""
    start_time = time.perf_counter()
    validate_config(config)
    task = tasks.get_task(config.task)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.create_mesh()

    splits = {
        name: input_pipeline.load_split(
            config.dataset,
            config[f"{name}_split"],
            config.data_dir,
            config.image_size,
            config.color_mode,
        )
        for name in ("train", "validation", "test")
    }
    train_split = splits["train"]
    steps_per_epoch = train_split.num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"config.batch_size={config.batch_size} is larger than the "
            f"{train_split.num_examples} training examples"
        )
    total_steps = config.num_train_steps
    if total_steps <= 0:
        total_steps = config.num_epochs * steps_per_epoch

    init_rng, step_rng, eval_rng = jax.random.split(jax.random.key(config.seed), 3)
    create_state = functools.partial(
        task.create_state,
        config,
        input_shape=train_split.image_shape,
        num_classes=train_split.num_classes,
        total_steps=total_steps,
    )
    state = jax.jit(create_state, out_shardings=sharding.replicated(mesh))(init_rng)
    checkpointer = Checkpointer(workdir, config.keep_checkpoints)
    state = checkpointer.restore_or(state)
    step = int(state.step)
    if step:
        logging.info("Resumed from the checkpoint at step %d.", step)
    stopper = load_early_stopping(config, workdir, step // steps_per_epoch)
    best_checkpointer = Checkpointer(workdir, 1, BEST_CHECKPOINTS) if stopper.enabled else None

    results_path = os.path.join(workdir, RESULTS_FILE)
    if (step >= total_steps or stopper.should_stop) and os.path.exists(results_path):
        checkpointer.close()
        if best_checkpointer is not None:
            best_checkpointer.close()
        with open(results_path) as f:
            results = json.load(f)
        logging.info("The run in %s is finished; its results: %s", workdir, results)
        return results

    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        # What a trained model needs to know of its data, so that it loads without it.
        run_files.write_dataset_info(
            workdir,
            run_files.DatasetInfo(
                tuple(train_split.image_shape),
                train_split.num_classes,
                train_split.class_names or reports.default_class_names(train_split.num_classes),
            ),
        )
        logging.info(
            "%s/%s: %s parameters; %d steps of %d examples (%d per epoch); %d devices.",
            config.task,
            config.model,
            f"{sum(x.size for x in jax.tree.leaves(getattr(state, 'params', {}))):,}",
            total_steps,
            config.batch_size,
            steps_per_epoch,
            jax.device_count(),
        )
    writer = MetricWriter(workdir, enabled=is_main)
    writer.truncate_after(step)
    if step == 0:
        writer.write_hparams(config.to_json_best_effort(indent=2))

    data = device_data.put_split(train_split, mesh)
    eval_data, (validation_rows, test_rows) = device_data.put_splits(
        [splits["validation"], splits["test"]], mesh
    )
    compile_start = time.perf_counter()
    train_fns, eval_fns = compile_steps(task, config, state, data, eval_data, mesh, step_rng)
    compile_time = time.perf_counter() - compile_start
    picture_images = splits["validation"].images[:NUM_PICTURE_IMAGES].astype(np.float32) / 255

    progress = Progress(total_steps, step, config.batch_size, config.log_every_steps)
    train_start, first_step = time.perf_counter(), step
    pending = []  # Device-side metrics of the steps since the last log, fetched in one go.
    skipped = 0  # Steps with non-finite values skipped (config.skip_nonfinite).
    with StopOnSignal() as stop:
        while step < total_steps and not stopper.should_stop:
            epoch, position = divmod(step, steps_per_epoch)
            indices = device_data.epoch_indices(
                train_split.num_examples, config.batch_size, config.seed, epoch
            )
            epoch_end = min(steps_per_epoch, position + total_steps - step)
            while position < epoch_end:
                # Several steps per dispatch, each dispatch ending at a log step or the end
                # of the epoch; what is left over runs in fewer steps per dispatch. The
                # choice is a function of the step alone, so a resumed run computes what an
                # uninterrupted one does.
                next_log = config.log_every_steps - step % config.log_every_steps
                room = min(epoch_end - position, next_log)
                k = max(size for size in train_fns if size <= room)
                chunk = device_data.shard_indices(indices[position : position + k], mesh)
                state, metrics = train_fns[k](state, data, chunk, step_rng)
                pending.append(metrics)
                step, position = step + k, position + k
                if step % config.log_every_steps == 0 or position == epoch_end:
                    train_metrics = mean_metrics(pending)
                    if not (config.skip_nonfinite or np.isfinite(train_metrics["loss"])):
                        raise FloatingPointError(
                            "non-finite training loss at step "
                            f"{first_nonfinite_step(pending, step)} (the last checkpoint is "
                            "kept; config.skip_nonfinite=True skips such steps)"
                        )
                    pending = []
                    skipped += int(train_metrics.get("skipped", 0))
                    writer.write(step, "train", train_metrics)
                    progress.update(step, train_metrics)
                if stop.should_stop():
                    if pending:
                        writer.write(step, "train", mean_metrics(pending))
                    checkpointer.save(state)
                    checkpointer.close()
                    if best_checkpointer is not None:
                        best_checkpointer.close()
                    writer.close()
                    raise stop.interrupted(step)
            epoch_done = position == steps_per_epoch
            if epoch_done or step >= total_steps:
                val_metrics, _ = evaluate(
                    eval_fns,
                    state,
                    eval_data,
                    validation_rows,
                    config.eval_batch_size,
                    mesh,
                    eval_rng,
                )
                writer.write(step, "validation", val_metrics)
                logging.info(
                    "epoch %d step %d: validation %s",
                    step // steps_per_epoch,
                    step,
                    " ".join(f"{k} {v:.4f}" for k, v in val_metrics.items()),
                )
                if is_main and hasattr(task, "write_pictures"):
                    task.write_pictures(state, picture_images, eval_rng, workdir, step, writer)
                if stopper.enabled:
                    if stopper.update(step // steps_per_epoch, val_metrics[stopper.metric]):
                        best_checkpointer.save(state)
                    if is_main:
                        write_json_atomically(
                            os.path.join(workdir, EARLY_STOPPING_FILE), stopper.to_dict()
                        )
                    if stopper.should_stop:
                        logging.info(
                            "Early stop: validation %s last improved at epoch %d (%.4f).",
                            stopper.metric,
                            stopper.best_epoch,
                            stopper.best_value,
                        )
            checkpoint_due = (step // steps_per_epoch) % config.checkpoint_every_epochs == 0
            if checkpoint_due or step >= total_steps or stopper.should_stop:
                checkpointer.save(state)
    progress.close()
    jax.block_until_ready(state)
    train_time = time.perf_counter() - train_start
    checkpointer.close()

    if best_checkpointer is not None:
        # The test evaluation (and what the run reports) uses the best validation state.
        state = best_checkpointer.restore_or(state)
        best_checkpointer.close()
        logging.info("Testing the best checkpoint, of step %d.", int(state.step))
    test_metrics, test_count = evaluate(
        eval_fns, state, eval_data, test_rows, config.eval_batch_size, mesh, eval_rng
    )
    writer.close()
    steps_this_run = step - first_step
    results = {
        **{f"test_{name}": value for name, value in test_metrics.items()},
        "num_test_examples": test_count,
        "steps": step,
        "tested_step": int(state.step),
        "steps_this_run": steps_this_run,
        "compile_time_s": compile_time,
        "train_time_s": train_time,
        "steps_per_s": steps_this_run / train_time if train_time else 0.0,
        "examples_per_s": steps_this_run * config.batch_size / train_time if train_time else 0.0,
        "skipped_steps": skipped,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if hasattr(task, "extra_results"):
        results.update(task.extra_results(state, config, workdir, splits["test"]))
    results["wall_time_s"] = time.perf_counter() - start_time
    if is_main:
        plot_curves(run_files.path(workdir, run_files.METRICS), os.path.join(workdir, "curves.png"))
        write_json_atomically(results_path, results)
    logging.info(
        "test %s on %d examples",
        " ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()),
        test_count,
    )
    return results
