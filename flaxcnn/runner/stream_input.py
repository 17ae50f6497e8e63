"""The loop's side of the streaming input (`config.input`, flaxcnn.data.streaming): which
path a run takes, and the training batches fed to the compiled step.

The compiled step gathers its batch from a device array by indices
(`device_data.gather_batch`). A dispatch of k streamed steps is such an array of the next k
batches one after the other (padded to the most steps a dispatch runs, `MOST_STEPS`),
read with the fixed indices 0..kB-1, so the step, its scaling and normalisation, and so its
results, are those of the in-memory path: the same batches in the same order. A few steps
a dispatch keep the dispatches' own CPU time off a small machine, as in memory; a few, not
more, bound the batches held ahead.

The stream's position is a function of the step (epoch = step // steps_per_epoch, batch =
step % steps_per_epoch), so the checkpoint's step is the iterator's state: a resumed run
opens the stream where the checkpoint stands and reads the batches an uninterrupted run
reads next.

A run whose training split streams streams its validation and test splits too (`EvalFeed`):
`streaming.eval_batches`' padded batches, each read by the compiled evaluation with the
fixed indices 0..B-1 and its mask, so every example counts once and the metrics are the
in-memory path's.
"""

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxcnn.data import batching, device_data, input_pipeline, preprocess, sources, streaming
from flaxcnn.runner import steps as compiled_steps

# The most streamed steps a dispatch runs: as fast as more on a CPU (cifar10_fast: 4 and 16
# steps a dispatch within 2% in memory, 1 step 15% slower), with few batches held ahead.
MOST_STEPS = 4


def open_stream_split(config: ml_collections.ConfigDict) -> sources.StreamSplit | None:
    """The training split as a stream source when `config.input` streams it, else None
    ("auto": when its decoded size exceeds `config.input_memory_budget_mb` and it can be
    streamed, a tfds dataset prepared as tfrecord cannot, and stays in memory; always under
    `config.input_crop="random_resized"`, whose crops need the files)."""
    choice = config.get("input", "memory")
    if choice == "memory":
        return None
    if config.task != "classification":
        raise ValueError(f"config.input={choice!r} streams classification, not {config.task}")
    must_stream = config.input_crop != "resize"
    try:
        split = open_split(config, "train")
    except input_pipeline.DataError:
        if choice == "auto" and not must_stream:
            return None
        raise
    budget = config.input_memory_budget_mb
    if streaming.resolve_input(choice, split.decoded_bytes, budget) == "memory" and not must_stream:
        return None
    if preprocess.parse(config.get("normalize", "none")) == preprocess.DATASET:
        raise ValueError(
            "config.normalize='dataset' needs the training split in memory: give the "
            "numbers, config.normalize=((mean, ...), (std, ...)), to stream it"
        )
    logging.info(
        "Streaming the training split: %d examples, %.0f MB decoded (config.input=%s).",
        split.num_examples, split.decoded_bytes / 2**20, choice,
    )  # fmt: skip
    return split


def open_split(config: ml_collections.ConfigDict, name: str) -> sources.StreamSplit:
    """The `name` split ("train", "validation", "test") of `config.dataset` as a stream
    source."""
    return sources.open_split(
        config.dataset, config[f"{name}_split"], config.data_dir, config.image_size,
        config.color_mode,
    )  # fmt: skip


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    """Batches split over `data` like the in-memory path's indices, or whole on every device
    when the devices cannot split them (`device_data.index_sharding`)."""
    if device_data.index_sharding(mesh, batch_size).spec == PartitionSpec():
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec("data"))


class TrainFeed:
    """Device batches of the stream from `step` on, `steps` (at most `MOST_STEPS`) a
    dispatch, as `DeviceSplit`s for the compiled step, and the indices that read them."""

    def __init__(
        self,
        split: sources.StreamSplit,
        config: ml_collections.ConfigDict,
        mesh: Mesh,
        normalization: preprocess.Normalization | None,
        step: int,
        steps: int,
        resources: contextlib.ExitStack,
    ):
        batch_size = config.batch_size
        sharding = batch_sharding(mesh, batch_size)
        whole = sharding.spec == PartitionSpec()  # Every process reads every row.
        steps_per_epoch = split.num_examples // batch_size
        self.stream = streaming.TrainStream(
            split, batch_size, config.seed, config.input_crop, config.input_workers,
            process_index=0 if whole else jax.process_index(),
            process_count=1 if whole else jax.process_count(),
            epoch=step // steps_per_epoch, step=step % steps_per_epoch,
        )  # fmt: skip
        resources.callback(self.stream.close)
        self.batches: Iterator[dict[str, jax.Array]] = streaming.to_device(self.stream, sharding)
        self.extras = device_data.with_normalization({}, normalization, mesh)
        self.steps = steps
        # Batch j's row c is row j * B + c of the joined batches.
        rows = np.arange(steps * batch_size, dtype=np.int32).reshape(steps, batch_size)
        self.indices = {k: device_data.shard_indices(rows[:k], mesh) for k in range(1, steps + 1)}
        self.join = jax.jit(lambda *batches: jnp.concatenate(batches), out_shardings=sharding)
        shape = (steps * batch_size, *split.image_shape)
        self.template = {
            "image": jax.ShapeDtypeStruct(shape, np.uint8, sharding=sharding),
            "label": jax.ShapeDtypeStruct(shape[:1], np.int32, sharding=sharding),
            **self.extras,
        }

    def next_data(self, k: int) -> tuple[device_data.DeviceSplit, jax.Array]:
        """The next `k` batches joined (the last repeated up to `steps`), with the
        normalisation the step applies, and the (k, B) indices that read them."""
        batches = [next(self.batches) for _ in range(k)]
        batches += batches[-1:] * (self.steps - k)
        joined = {key: self.join(*(b[key] for b in batches)) for key in ("image", "label")}
        return {**joined, **self.extras}, self.indices[k]


class EvalFeed:
    """Splits evaluated from the stream in batches of `batch_size` (global), read by the
    evaluation view of `crop` with `workers` processes, for the compiled evaluation of one
    batch: `template` is the data it is compiled for, `evaluate` its metrics over a split."""

    def __init__(
        self,
        splits: dict[str, sources.StreamSplit],
        batch_size: int,
        crop: str,
        workers: int,
        mesh: Mesh,
        normalization: preprocess.Normalization | None,
    ):
        self.splits, self.batch_size, self.mesh = splits, batch_size, mesh
        self.crop, self.workers = crop, workers
        self.sharding = batch_sharding(mesh, batch_size)
        self.extras = device_data.with_normalization({}, normalization, mesh)
        rows = np.arange(batch_size, dtype=np.int32)[None]
        self.indices = device_data.shard_indices(rows, mesh)
        shape = (batch_size, *next(iter(splits.values())).image_shape)
        self.template = {
            "image": jax.ShapeDtypeStruct(shape, np.uint8, sharding=self.sharding),
            "label": jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=self.sharding),
            **self.extras,
        }

    def evaluate(self, evaluate_one, state, name: str, rng: jax.Array) -> tuple[dict, int]:
        """The metrics of `evaluate_one` (the compiled evaluation of one batch of `template`)
        over every example of split `name` once, and their number."""
        split = self.splits[name]
        whole = self.sharding.spec == PartitionSpec()  # Every process reads every row.
        batches = streaming.eval_batches(
            split, self.batch_size, self.crop, self.workers,
            process_index=0 if whole else jax.process_index(),
            process_count=1 if whole else jax.process_count(),
        )  # fmt: skip
        # The mask is the global one of `padded_indices`, laid out as the indices are.
        _, masks = batching.padded_indices(split.num_examples, self.batch_size)
        images = ({k: v for k, v in b.items() if k != "mask"} for b in batches)
        metrics = []
        for batch, mask in zip(streaming.to_device(images, self.sharding), masks, strict=True):
            mask = device_data.shard_indices(mask[None], self.mesh)
            metrics.append(evaluate_one(state, {**batch, **self.extras}, self.indices, mask, rng))
        count = int(sum(float(m["count"]) for m in metrics))
        return compiled_steps.mean_metrics(metrics), count
