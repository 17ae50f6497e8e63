"""The training loop, shared by every task, in four parts:

1. Preparing a run: `open_run` reads the data and builds the state, restored from the
   newest checkpoint; `start_run` records the run in its workdir, puts the data on the
   device and compiles the steps.
2. `train_to_boundary`: the compiled steps up to the end of an epoch (or of the run), with
   the training metrics logged every `log_every_steps`.
3. The hooks, called in order where the loop aligns after every epoch: `DEFAULT_HOOKS`
   (validation, pictures, early stopping, checkpoint), then the caller's own: each is a
   callable `hook(run, state)` of the `TrainingRun` and the state (a `Hook`).
4. `finish`: the test evaluation (of the best checkpoint with early stopping), the scores of
   a generator's samples (given a scorer), results.json and the curves.

The caller checks the config (`flaxcnn.config.validate`) and prepares the workdir
(flaxcnn.workdir) first: the train command and `flaxcnn.fit` do both, once.

Checkpointers, writers and signal handlers are closed in one place, the `ExitStack` of
`train_and_evaluate`, however the run ends.
"""

import contextlib
import dataclasses
import functools
import os
import resource
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from absl import logging

from flaxcnn import config as config_lib
from flaxcnn import run_files, tasks
from flaxcnn.data import batching, device_data, input_pipeline, preprocess
from flaxcnn.reporting import generative_metrics, reports, summary
from flaxcnn.reporting.generative_metrics import Scorer
from flaxcnn.reporting.writers import MetricWriter, Progress, plot_curves
from flaxcnn.runner import steps as compiled_steps
from flaxcnn.runner import stream_input
from flaxcnn.runtime import sharding
from flaxcnn.training.checkpointing import Checkpointer
from flaxcnn.training.early_stopping import EarlyStopping
from flaxcnn.training.signals import StopOnSignal

NUM_PICTURE_IMAGES = 32
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class TrainingRun:
    """What the loop knows of a run: its settings, data, where it stands, and where it
    writes. `step` is the host's count of the steps done (read from the state once, at
    restore, so the loop never waits on the device for it)."""

    config: ml_collections.ConfigDict
    workdir: str
    task: Any
    mesh: jax.sharding.Mesh
    # In memory, or, when config.input streams them, stream sources (sources.StreamSplit).
    splits: dict[str, input_pipeline.Split]
    steps_per_epoch: int
    total_steps: int
    step: int
    checkpointer: Checkpointer
    stopper: EarlyStopping
    best_checkpointer: Checkpointer | None
    rngs: dict[str, jax.Array]  # "init", "step" and "eval" keys of the run's seed.
    # The resolved config.normalize (None: inputs in [0, 1]), carried by the device data.
    normalization: preprocess.Normalization | None = None
    is_main: bool = dataclasses.field(default_factory=lambda: jax.process_index() == 0)
    # Set by `start_run`.
    writer: MetricWriter | None = None
    data: device_data.DeviceSplit | None = None
    eval_data: device_data.DeviceSplit | None = None
    eval_rows: dict[str, range] = dataclasses.field(default_factory=dict)
    steps: compiled_steps.CompiledSteps | None = None
    feed: stream_input.TrainFeed | None = None  # Streamed training batches (config.input).
    eval_feed: stream_input.EvalFeed | None = None  # Streamed validation and test batches.
    progress: Progress | None = None
    skipped: int = 0  # Steps with non-finite values skipped (config.skip_nonfinite).
    # The metrics of the latest validation, set by the `evaluate_validation` hook.
    validation_metrics: dict = dataclasses.field(default_factory=dict)

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps or self.stopper.should_stop

    def evaluate(self, state, split: str) -> tuple[dict, int]:
        """The task's metrics over the `split` ("validation" or "test") rows on the device,
        or over its streamed batches."""
        if self.eval_feed:
            evaluate_one = self.steps.evaluate[1]
            return self.eval_feed.evaluate(evaluate_one, state, split, self.rngs["eval"])
        return compiled_steps.evaluate(
            self.steps.evaluate,
            state,
            self.eval_data,
            self.eval_rows[split],
            config_lib.eval_batch_size(self.config),
            self.mesh,
            self.rngs["eval"],
        )


def load_splits(
    config: ml_collections.ConfigDict, names: tuple[str, ...] = SPLITS
) -> dict[str, input_pipeline.Split]:
    """The `names` splits (train, validation, test) of `config.dataset`, in memory; none for
    an empty `validation_split` (a run without validation). Validation and test images are
    read by the evaluation view of `config.input_crop`."""
    return {
        name: input_pipeline.load_split(
            config.dataset,
            config[f"{name}_split"],
            config.data_dir,
            config.image_size,
            config.color_mode,
            "resize" if name == "train" else config.get("input_crop", "resize"),
        )
        for name in names
        if config[f"{name}_split"]
    }


def schedule_length(config: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run over `num_examples` training examples."""
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"config.batch_size={config.batch_size} is larger than the "
            f"{num_examples} training examples"
        )
    total_steps = config.num_train_steps
    if total_steps <= 0:
        total_steps = config.num_epochs * steps_per_epoch
    return steps_per_epoch, total_steps


def load_early_stopping(config: ml_collections.ConfigDict, workdir: str, epoch: int):
    """The early-stopping record of the run in `workdir` (forgetting epochs after `epoch`,
    which a resumed run redoes), or a fresh one."""
    path = run_files.path(workdir, run_files.EARLY_STOPPING)
    history = []
    if os.path.exists(path):
        history = EarlyStopping.from_dict(run_files.read_json(path)).history
    stopper = EarlyStopping.from_config(config, history)
    stopper.truncate_after(epoch)
    return stopper


def open_run(
    config: ml_collections.ConfigDict, workdir: str, resources: contextlib.ExitStack
) -> tuple[TrainingRun, Any]:
    """Preparing a run, part one: the data in memory, the state restored from the newest
    checkpoint (or initialised), and the early-stopping record."""
    os.makedirs(workdir, exist_ok=True)
    task = tasks.get_task(config.task)
    mesh = sharding.create_mesh()
    streamed = stream_input.open_stream_split(config)
    if streamed:  # Validation and test stream too.
        names = [name for name in SPLITS[1:] if config[f"{name}_split"]]
        splits = {"train": streamed, **{n: stream_input.open_split(config, n) for n in names}}
    else:
        splits = load_splits(config)
    # "dataset" becomes the training split's numbers, in the config config.json records.
    train_images = np.empty((0, *streamed.image_shape)) if streamed else splits["train"].images
    normalization = preprocess.resolve_config(config, train_images)
    steps_per_epoch, total_steps = schedule_length(config, splits["train"].num_examples)
    rngs = dict(zip(("init", "step", "eval"), jax.random.split(jax.random.key(config.seed), 3)))
    create_state = functools.partial(
        task.create_state,
        config,
        input_shape=splits["train"].image_shape,
        num_classes=splits["train"].num_classes,
        total_steps=total_steps,
    )
    state = jax.jit(create_state, out_shardings=sharding.replicated(mesh))(rngs["init"])
    checkpointer = resources.enter_context(
        contextlib.closing(Checkpointer(workdir, config.keep_checkpoints))
    )
    state = checkpointer.restore_or(state)
    step = int(state.step)
    if step:
        logging.info("Resumed from the checkpoint at step %d.", step)
    elif hasattr(task, "fit_to_data"):
        state = sharding.replicate(task.fit_to_data(state, config, splits["train"]), mesh)
    stopper = load_early_stopping(config, workdir, step // steps_per_epoch)
    best = None
    if stopper.enabled:
        best = Checkpointer(workdir, 1, run_files.BEST_CHECKPOINTS)
        resources.callback(best.close)
    run = TrainingRun(
        config, workdir, task, mesh, splits, steps_per_epoch, total_steps, step,
        checkpointer, stopper, best, rngs, normalization,
    )  # fmt: skip
    return run, state


def finished_results(run: TrainingRun) -> dict | None:
    """The results of a run that had already finished, or None."""
    path = run_files.path(run.workdir, run_files.RESULTS)
    if not (run.done and os.path.exists(path)):
        return None
    try:
        results = run_files.read_json(path)
    except ValueError as e:  # Damaged: the run is finished, so its test is run again.
        logging.warning("%s; testing the final state again to rewrite it.", e)
        return None
    logging.info("The run in %s is finished; its results: %s", run.workdir, results)
    return results


def record_run(run: TrainingRun, state) -> None:
    """The resolved config and what a trained model needs to know of its data, so that it
    loads without the data; a line saying what is trained."""
    config, train = run.config, run.splits["train"]
    with open(run_files.path(run.workdir, run_files.CONFIG), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    class_names = train.class_names or reports.default_class_names(train.num_classes)
    mean, std = run.normalization or (None, None)
    info = run_files.DatasetInfo(
        tuple(train.image_shape), train.num_classes, class_names, mean, std
    )
    run_files.write_dataset_info(run.workdir, info)
    model_summary = summary.model_summary(state, train.image_shape)
    with open(run_files.path(run.workdir, run_files.MODEL_SUMMARY), "w") as f:
        f.write(model_summary)
    logging.info("%s", model_summary)
    logging.info(
        "%s/%s: %s parameters; %d steps of %d examples (%d per epoch); %d devices.",
        config.task,
        config.model,
        f"{sum(x.size for x in jax.tree.leaves(getattr(state, 'params', {}))):,}",
        run.total_steps,
        config.batch_size,
        run.steps_per_epoch,
        jax.device_count(),
    )


def start_run(run: TrainingRun, state, resources: contextlib.ExitStack) -> None:
    """Preparing a run, part two: its records, its writer, the data on the device and the
    compiled steps."""
    if run.is_main:
        record_run(run, state)
    run.writer = resources.enter_context(
        contextlib.closing(MetricWriter(run.workdir, enabled=run.is_main))
    )
    run.writer.truncate_after(run.step)
    if run.step == 0:
        run.writer.write_hparams(run.config.to_json_best_effort(indent=2))
    config = run.config
    most_steps = min(run.steps_per_epoch, run.total_steps, config.log_every_steps)
    if isinstance(run.splits["train"], input_pipeline.Split):
        run.data = device_data.with_normalization(
            device_data.put_split(run.splits["train"], run.mesh), run.normalization, run.mesh
        )
    else:  # Streamed (stream_input).
        most_steps = min(most_steps, stream_input.MOST_STEPS)
        run.feed = stream_input.TrainFeed(
            run.splits["train"], config, run.mesh, run.normalization, run.step, most_steps,
            resources,
        )  # fmt: skip
        run.data = run.feed.template
    eval_batch_size = config_lib.eval_batch_size(config)
    evaluated = [name for name in ("validation", "test") if name in run.splits]
    if run.feed:  # The compiled evaluation reads one streamed batch a dispatch.
        eval_splits = {name: run.splits[name] for name in evaluated}
        run.eval_feed = stream_input.EvalFeed(
            eval_splits, eval_batch_size, config.input_crop, config.input_workers, run.mesh,
            run.normalization,
        )  # fmt: skip
        run.eval_data, most_eval_batches = run.eval_feed.template, 1
    else:
        run.eval_data, rows = device_data.put_splits([run.splits[n] for n in evaluated], run.mesh)
        run.eval_data = device_data.with_normalization(run.eval_data, run.normalization, run.mesh)
        run.eval_rows = dict(zip(evaluated, rows))
        most_eval_batches = max(-(-len(r) // eval_batch_size) for r in rows)
    run.steps = compiled_steps.compile_steps(
        run.task, config, state, run.data, run.eval_data, run.mesh, run.rngs["step"],
        most_steps=most_steps, most_eval_batches=most_eval_batches,
    )  # fmt: skip
    # The progress display, one more writer (on every process), timed from the first step.
    run.progress = Progress(run.total_steps, run.step, config.batch_size, config.log_every_steps)
    run.writer.add(run.progress)


def log_train_metrics(run: TrainingRun, pending: list[dict]) -> None:
    """Writes the mean of the steps' metrics since the last log; stops the run at a
    non-finite loss unless `config.skip_nonfinite`."""
    metrics = compiled_steps.mean_metrics(pending)
    if not (run.config.skip_nonfinite or np.isfinite(metrics["loss"])):
        raise FloatingPointError(
            f"non-finite training loss at step "
            f"{compiled_steps.first_nonfinite_step(pending, run.step)} (the last checkpoint is "
            "kept; config.skip_nonfinite=True skips such steps)"
        )
    run.skipped += int(metrics.get("skipped", 0))
    run.writer.write(run.step, "train", metrics)


def save_pending_metrics(run: TrainingRun, pending: list[dict]) -> None:
    """Keeps the metrics of the steps since the last log (exact values and dtypes) for the
    run that resumes from this step."""
    if run.is_main:
        fetched = [
            {name: [str(v.dtype), v.tolist()] for name, v in m.items()}
            for m in jax.device_get(pending)
        ]
        path = run_files.path(run.workdir, run_files.PENDING_METRICS)
        run_files.write_json_atomically(path, {"step": run.step, "metrics": fetched})


def resumed_pending_metrics(run: TrainingRun) -> list[dict]:
    """The metrics `save_pending_metrics` kept at this step, else none."""
    path = run_files.path(run.workdir, run_files.PENDING_METRICS)
    if not os.path.exists(path):
        return []
    saved = run_files.read_json(path)
    if saved["step"] != run.step:
        return []
    return [
        {name: np.asarray(value, dtype) for name, (dtype, value) in m.items()}
        for m in saved["metrics"]
    ]


def train_to_boundary(run: TrainingRun, state, stop: StopOnSignal):
    """The steps up to the end of the epoch or of the run. Each dispatch runs as many steps
    as fit before the next log step; the choice is a function of the step alone, so a
    resumed run computes what an uninterrupted one does. A stop signal saves a checkpoint
    of the current step (and the metrics since the last log) and raises
    `signals.Interrupted`."""
    config = run.config
    position = run.step % run.steps_per_epoch
    indices = batching.epoch_indices(
        run.splits["train"].num_examples, config.batch_size, config.seed, run.epoch
    )
    epoch_end = min(run.steps_per_epoch, position + run.total_steps - run.step)
    # Device-side metrics of the steps since the last log, fetched in one go.
    pending = resumed_pending_metrics(run)
    while position < epoch_end:
        room = min(epoch_end - position, config.log_every_steps - run.step % config.log_every_steps)
        k = max(size for size in run.steps.train if size <= room)
        if run.feed:  # The next k batches of the stream.
            data, chunk = run.feed.next_data(k)
        else:
            data = run.data
            chunk = device_data.shard_indices(indices[position : position + k], run.mesh)
        state, metrics = run.steps.train[k](state, data, chunk, run.rngs["step"])
        pending.append(metrics)
        run.step, position = run.step + k, position + k
        if run.step % config.log_every_steps == 0 or position == epoch_end:
            log_train_metrics(run, pending)
            pending = []
        if stop.should_stop():
            if pending:
                save_pending_metrics(run, pending)
            run.checkpointer.save(state)
            raise stop.interrupted(run.step)
    return state


class Hook(Protocol):
    """Work at the end of every epoch (and of the run): `hook(run, state)`, where `run` is
    the `TrainingRun` (its `step`, `epoch`, `workdir`, `config`, `writer`, `is_main` and the
    latest `validation_metrics`) and `state` the task's state. Hooks run on every process."""

    def __call__(self, run: "TrainingRun", state: Any) -> None: ...


def evaluate_validation(run: TrainingRun, state) -> None:
    """Hook: the validation metrics, written, logged and kept in `run.validation_metrics`
    (none in a run without a validation split)."""
    if "validation" not in run.splits:
        return
    metrics, _ = run.evaluate(state, "validation")
    metrics = compiled_steps.scalar_metrics(metrics)
    run.writer.write(run.step, "validation", metrics)
    text = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    logging.info("epoch %d step %d: validation %s", run.epoch, run.step, text)
    run.validation_metrics = metrics


def write_pictures(run: TrainingRun, state) -> None:
    """Hook: the task's pictures of a fixed batch of validation images (test images in a run
    without a validation split)."""
    if run.is_main and hasattr(run.task, "write_pictures"):
        split = run.splits.get("validation", run.splits["test"])
        images = split.images[:NUM_PICTURE_IMAGES].astype(np.float32) / 255
        run.task.write_pictures(state, images, run.rngs["eval"], run.workdir, run.step, run.writer)


def update_early_stopping(run: TrainingRun, state) -> None:
    """Hook: records the epoch's validation metric, keeps the best checkpoint."""
    stopper = run.stopper
    if not stopper.enabled:
        return
    if stopper.update(run.epoch, run.validation_metrics[stopper.metric]):
        run.best_checkpointer.save(state)
        # Committed before the record names it and before the newest checkpoint passes it.
        run.best_checkpointer.wait_until_finished()
    if run.is_main:
        path = run_files.path(run.workdir, run_files.EARLY_STOPPING)
        run_files.write_json_atomically(path, stopper.to_dict())
    if stopper.should_stop:
        logging.info(
            "Early stop: validation %s last improved at epoch %d (%.4f).",
            stopper.metric,
            stopper.best_epoch,
            stopper.best_value,
        )


def save_checkpoint(run: TrainingRun, state) -> None:
    """Hook: a checkpoint every `checkpoint_every_epochs` and at the end."""
    if run.epoch % run.config.checkpoint_every_epochs == 0 or run.done:
        run.checkpointer.save(state)


# What happens after every epoch (and at the end of the run), in order, before the caller's.
DEFAULT_HOOKS: tuple[Hook, ...] = (
    evaluate_validation, write_pictures, update_early_stopping, save_checkpoint,
)  # fmt: skip


def confusion_report(run: TrainingRun, test_metrics: dict) -> dict:
    """Per-class accuracy and the confusion matrix of a task whose evaluation counts one
    (also drawn in `workdir/confusion_test.png`); {} for other tasks."""
    if "confusion" not in test_metrics:
        return {}
    report = reports.report_from_confusion(
        test_metrics.pop("confusion"), run.splits["test"].class_names
    )
    if run.is_main:
        path = os.path.join(run.workdir, "confusion_test.png")
        reports.plot_confusion_matrix(
            np.array(report["confusion_matrix"]), report["class_names"], path, "test"
        )
    return {key: report[key] for key in ("per_class_accuracy", "confusion_matrix")}


def sample_scores(run: TrainingRun, state, scorer: Scorer | None) -> dict:
    """The scores of `config.score_samples` samples of the task's generator under `scorer`
    (flaxcnn.scoring prepares it), against the test split; {} when nothing is scored."""
    num_samples = run.config.get("score_samples", 0)
    if not (num_samples and hasattr(run.task, "generator")):
        return {}
    if scorer is None:
        logging.warning("No scorer given: samples not scored (see flaxcnn.scoring).")
        return {}
    generator = run.task.generator(state)
    return generative_metrics.evaluate_generator(
        generator.draw,
        scorer,
        run.splits["test"].images,
        run.splits["train"].images,
        num_samples,
        generator.num_classes,
    )


def finish(
    run: TrainingRun, state, first_step: int, train_time: float, scorer: Scorer | None = None
) -> dict:
    """The test evaluation (of the best validation state with early stopping), the task's
    extra results and its samples' scores."""
    if run.best_checkpointer is not None:
        state = run.best_checkpointer.restore_or(state)
        logging.info("Testing the best checkpoint, of step %d.", int(state.step))
    test_metrics, test_count = run.evaluate(state, "test")
    extra = confusion_report(run, test_metrics)
    steps_this_run = run.step - first_step
    steps_per_s = steps_this_run / train_time if train_time else 0.0
    results = {
        **{f"test_{name}": value for name, value in test_metrics.items()},
        "num_test_examples": test_count,
        "steps": run.step,
        "tested_step": int(state.step),
        "steps_this_run": steps_this_run,
        "compile_time_s": run.steps.compile_time_s,
        "train_time_s": train_time,
        "steps_per_s": steps_per_s,
        "examples_per_s": steps_per_s * run.config.batch_size,
        "skipped_steps": run.skipped,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **extra,
    }
    if hasattr(run.task, "extra_results"):
        results.update(run.task.extra_results(state, run.config, run.workdir, run.splits["test"]))
    results.update(sample_scores(run, state, scorer))
    logging.info(
        "test %s on %d examples",
        " ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()),
        test_count,
    )
    return results


def write_results(run: TrainingRun, results: dict) -> None:
    """results.json (atomically: a run killed here leaves no partial file) and the curves."""
    if run.is_main:
        plot_curves(
            run_files.path(run.workdir, run_files.METRICS),
            run_files.path(run.workdir, run_files.CURVES),
        )
        run_files.write_json_atomically(run_files.path(run.workdir, run_files.RESULTS), results)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    hooks: Sequence[Hook] = (),
    scorer: Scorer | None = None,
) -> dict:
    """Trains `config.model` for `config.task` on `config.dataset`, resuming from `workdir`
    if it holds a run, and returns (and writes to `workdir/results.json`) the test metrics.

    After every epoch the `DEFAULT_HOOKS` run, then `hooks` in order. With early stopping on,
    the best validation checkpoint is kept beside the newest ones and the test evaluation
    uses it. A task with a generator and `config.score_samples` > 0 has its samples scored
    under `scorer`. SIGTERM or SIGINT saves a checkpoint of the current step and raises
    `signals.Interrupted`."""
    start_time = time.perf_counter()
    all_hooks = (*DEFAULT_HOOKS, *hooks)
    with contextlib.ExitStack() as resources:
        run, state = open_run(config, workdir, resources)
        results = finished_results(run)
        if results is not None:
            return results
        start_run(run, state, resources)
        first_step, train_start = run.step, time.perf_counter()
        with StopOnSignal() as stop:
            while not run.done:
                state = train_to_boundary(run, state, stop)
                for hook in all_hooks:
                    hook(run, state)
        run.progress.close()
        jax.block_until_ready(state)
        train_time = time.perf_counter() - train_start
        run.checkpointer.wait_until_finished()
        results = finish(run, state, first_step, train_time, scorer)
        results["wall_time_s"] = time.perf_counter() - start_time
        write_results(run, results)
        return results
