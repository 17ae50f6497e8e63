"""The loop's side of the streaming input (`config.input`, flaxcnn.data.streaming): which
path a run takes, and the training batches fed to the compiled step.

The compiled step gathers its batch from a device array by indices
(`device_data.gather_batch`). A streamed batch is such an array of exactly one batch, read
with the fixed indices 0..B-1, so the step, its scaling and normalisation, and so its
results, are those of the in-memory path: the same batches in the same order, one step per
dispatch.

The stream's position is a function of the step (epoch = step // steps_per_epoch, batch =
step % steps_per_epoch), so the checkpoint's step is the iterator's state: a resumed run
opens the stream where the checkpoint stands and reads the batches an uninterrupted run
reads next.
"""

import contextlib
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxcnn.data import device_data, input_pipeline, preprocess, sources, streaming


def open_stream_split(config: ml_collections.ConfigDict) -> sources.StreamSplit | None:
    """The training split as a stream source when `config.input` streams it, else None
    ("auto": when its decoded size exceeds `config.input_memory_budget_mb` and it can be
    streamed; a tfds dataset prepared as tfrecord cannot, and stays in memory)."""
    choice = config.get("input", "memory")
    if choice == "memory":
        return None
    if config.task != "classification":
        raise ValueError(f"config.input={choice!r} streams classification, not {config.task}")
    try:
        split = sources.open_split(
            config.dataset, config.train_split, config.data_dir, config.image_size,
            config.color_mode,
        )  # fmt: skip
    except input_pipeline.DataError:
        if choice == "auto":
            return None
        raise
    if streaming.resolve_input(choice, split.decoded_bytes, config.input_memory_budget_mb) == (
        "memory"
    ):
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


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    """Batches split over `data` like the in-memory path's indices, or whole on every device
    when the devices cannot split them (`device_data.index_sharding`)."""
    if device_data.index_sharding(mesh, batch_size).spec == PartitionSpec():
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec("data"))


class TrainFeed:
    """Device batches of the stream from `step` on, as `DeviceSplit`s for the compiled step,
    and the indices that read each whole."""

    def __init__(
        self,
        split: sources.StreamSplit,
        config: ml_collections.ConfigDict,
        mesh: Mesh,
        normalization: preprocess.Normalization | None,
        step: int,
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
        rows = np.arange(batch_size, dtype=np.int32)[None]
        self.indices = device_data.shard_indices(rows, mesh)
        shape = (batch_size, *split.image_shape)
        self.template = {
            "image": jax.ShapeDtypeStruct(shape, np.uint8, sharding=sharding),
            "label": jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=sharding),
            **self.extras,
        }

    def next_data(self) -> device_data.DeviceSplit:
        """The next batch, with the normalisation the step applies."""
        return {**next(self.batches), **self.extras}
