"""The training loop: data, state, restore-or-init, jitted steps, validation, checkpoints,
and the final test evaluation written to `results.json`."""

import functools
import json
import os
import resource
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from flaxcnn import input_pipeline, sharding, steps
from flaxcnn.checkpointing import Checkpointer
from flaxcnn.models import create_model
from flaxcnn.state import TrainState, create_optimizer, create_train_state
from flaxcnn.writers import METRICS_FILE, MetricWriter, Progress, plot_curves

RESULTS_FILE = "results.json"


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first setting that cannot work."""
    for key in ("learning_rate", "batch_size", "eval_batch_size"):
        if not config[key] > 0:
            raise ValueError(f"config.{key} must be positive, got {config[key]}")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ValueError(f"config.num_epochs must be positive, got {config.num_epochs}")
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % jax.device_count():
            raise ValueError(
                f"config.{key}={config[key]} is not divisible by the {jax.device_count()} devices"
            )


def resolve_microbatch_size(config: ml_collections.ConfigDict) -> int:
    """`config.microbatch_size`, with -1 resolved to 32 per device on CPUs and 0 elsewhere."""
    if config.microbatch_size >= 0:
        return config.microbatch_size
    return 32 * jax.device_count() if jax.default_backend() == "cpu" else 0


def batch_spec(
    split: input_pipeline.Split, batch_size: int, mesh, with_mask: bool = False
) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes, dtypes and sharding of the batches the pipeline yields for `split`."""
    data = sharding.batch_sharding(mesh)
    spec = {
        "image": jax.ShapeDtypeStruct((batch_size, *split.image_shape), np.float32, sharding=data),
        "label": jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=data),
    }
    if with_mask:
        spec["mask"] = jax.ShapeDtypeStruct((batch_size,), np.bool_, sharding=data)
    return spec


def write_json_atomically(path: str, data: dict) -> None:
    """Writes `data` so that `path` holds either the old or the complete new content."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def mean_metrics(batch_metrics: list[dict]) -> dict[str, float]:
    """Sums per-batch metric sums on the host and divides by the example count."""
    totals = jax.tree.map(lambda *xs: float(np.sum(xs)), *jax.device_get(batch_metrics))
    count = totals.pop("count")
    return {name: value / count for name, value in totals.items()}


def evaluate(eval_fn, state: TrainState, split: input_pipeline.Split, batch_size: int, mesh):
    """Loss and accuracy over every example of `split`, and the number of examples."""
    batch_metrics = [
        eval_fn(state, sharding.shard_batch(batch, mesh))
        for batch in input_pipeline.eval_batches(split, batch_size)
    ]
    count = int(sum(float(m["count"]) for m in batch_metrics))
    return mean_metrics(batch_metrics), count


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config.model` on `config.dataset`, resuming from `workdir` if it holds a run,
    and returns (and writes to `workdir/results.json`) the test metrics."""
    start_time = time.perf_counter()
    validate_config(config)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.create_mesh()

    splits = {
        name: input_pipeline.load_split(config.dataset, config[f"{name}_split"], config.data_dir)
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

    model = create_model(config.model, num_classes=train_split.num_classes, **config.model_kwargs)
    tx = create_optimizer(config, total_steps)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    init = functools.partial(create_train_state, model, tx, input_shape=train_split.image_shape)
    state = jax.jit(init, out_shardings=sharding.replicated(mesh))(init_rng)
    checkpointer = Checkpointer(workdir, config.keep_checkpoints)
    state = checkpointer.restore_or(state)
    step = int(state.step)
    if step:
        logging.info("Resumed from the checkpoint at step %d.", step)

    results_path = os.path.join(workdir, RESULTS_FILE)
    if step >= total_steps and os.path.exists(results_path):
        checkpointer.close()
        with open(results_path) as f:
            results = json.load(f)
        logging.info("The run in %s is finished; its results: %s", workdir, results)
        return results

    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        logging.info(
            "%s: %s parameters; %d steps of %d examples (%d per epoch); %d devices.",
            config.model,
            f"{sum(x.size for x in jax.tree.leaves(state.params)):,}",
            total_steps,
            config.batch_size,
            steps_per_epoch,
            jax.device_count(),
        )
    writer = MetricWriter(workdir, enabled=is_main)
    writer.truncate_after(step)
    if step == 0:
        writer.write_hparams(config.to_json_best_effort(indent=2))

    # Compiled ahead of time for the one batch shape each step sees: a batch of another
    # shape is an error rather than a silent recompilation, and compile time is measured.
    compile_start = time.perf_counter()
    replicated = sharding.replicated(mesh)
    train_fn = (
        jax.jit(
            functools.partial(steps.train_step, microbatch_size=resolve_microbatch_size(config)),
            donate_argnums=0,
            out_shardings=replicated,
        )
        .lower(state, batch_spec(train_split, config.batch_size, mesh), step_rng)
        .compile()
    )
    eval_spec = batch_spec(train_split, config.eval_batch_size, mesh, with_mask=True)
    eval_fn = jax.jit(steps.eval_step, out_shardings=replicated).lower(state, eval_spec).compile()
    compile_time = time.perf_counter() - compile_start

    progress = Progress(total_steps, step, config.batch_size, config.log_every_steps)
    train_start, first_step = time.perf_counter(), step
    pending = []  # Device-side metrics of the steps since the last log, fetched in one go.
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        for batch in input_pipeline.train_batches(
            train_split, config.batch_size, config.seed, epoch, skip
        ):
            state, metrics = train_fn(state, sharding.shard_batch(batch, mesh), step_rng)
            pending.append(metrics)
            step += 1
            if step % config.log_every_steps == 0 or step % steps_per_epoch == 0:
                train_metrics = mean_metrics(pending)
                pending = []
                if not np.isfinite(train_metrics["loss"]):
                    raise FloatingPointError(f"non-finite training loss at step {step}")
                writer.write(step, "train", train_metrics)
                progress.update(step, train_metrics)
            if step >= total_steps:
                break
        if pending:
            writer.write(step, "train", mean_metrics(pending))
            pending = []
        epoch_done = step // steps_per_epoch
        if step % steps_per_epoch == 0 or step >= total_steps:
            val_metrics, _ = evaluate(
                eval_fn, state, splits["validation"], config.eval_batch_size, mesh
            )
            writer.write(step, "validation", val_metrics)
            logging.info(
                "epoch %d step %d: validation loss %.4f accuracy %.4f",
                epoch_done,
                step,
                val_metrics["loss"],
                val_metrics["accuracy"],
            )
        if epoch_done % config.checkpoint_every_epochs == 0 or step >= total_steps:
            checkpointer.save(state)
    progress.close()
    jax.block_until_ready(state)
    train_time = time.perf_counter() - train_start

    test_metrics, test_count = evaluate(
        eval_fn, state, splits["test"], config.eval_batch_size, mesh
    )
    checkpointer.close()
    writer.close()
    results = {
        "test_loss": test_metrics["loss"],
        "test_accuracy": test_metrics["accuracy"],
        "num_test_examples": test_count,
        "steps": step,
        "steps_this_run": step - first_step,
        "compile_time_s": compile_time,
        "train_time_s": train_time,
        "steps_per_s": (step - first_step) / train_time if train_time else 0.0,
        "examples_per_s": (step - first_step) * config.batch_size / train_time
        if train_time
        else 0.0,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_time_s": time.perf_counter() - start_time,
    }
    if is_main:
        plot_curves(os.path.join(workdir, METRICS_FILE), os.path.join(workdir, "curves.png"))
        write_json_atomically(results_path, results)
    logging.info(
        "test accuracy %.4f, loss %.4f on %d examples",
        results["test_accuracy"],
        results["test_loss"],
        test_count,
    )
    return results
