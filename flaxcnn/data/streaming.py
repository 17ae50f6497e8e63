"""The streaming input: batches read, decoded and preprocessed from disk while the model
trains, for splits larger than memory (`config.input`: "stream", or "auto" over
`config.input_memory_budget_mb`).

Built on Grain (`grain.MapDataset`): each epoch is a random-access dataset over this
process's share of the epoch's batches, read by `config.input_workers` worker processes
(0: threads of this process) with a bounded buffer, so memory does not grow with the
split. The guarantees of the in-memory path hold:

- The order of an epoch is `batching.epoch_indices(n, batch, seed, epoch)`, the in-memory
  path's own: a pure function of (seed, epoch), and the same batches in both paths.
- Process p of P reads columns [p * B / P, (p + 1) * B / P) of every global batch, the
  share `device_data.shard_indices` gives it: the shards are disjoint and cover each epoch's
  batches once.
- A random crop of an example is drawn from a generator seeded with (seed, epoch, index),
  so no worker count, buffering or resume changes it.
- The iterator's state is (epoch, step): `get_state()` after a batch, saved with a
  checkpoint and passed to `set_state`, continues with exactly the batches an uninterrupted
  run reads next.
- Evaluation streams `batching.padded_indices` with its mask: every example counts once.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import jax
import numpy as np
from absl import flags

from flaxcnn.data import batching, crops, sources

if TYPE_CHECKING:  # Imported where a run streams: a quarter second of every other command.
    import grain

INPUTS = ("memory", "stream", "auto")
PREFETCH_BATCHES = 4  # Host batches buffered ahead of the step.


def resolve_input(choice: str, decoded_bytes: int, budget_mb: float) -> str:
    """ "memory" or "stream" for `config.input` `choice`: "auto" streams a split whose decoded
    size exceeds `budget_mb`."""
    if choice not in INPUTS:
        raise ValueError(f"config.input must be one of {', '.join(INPUTS)}, got {choice!r}")
    if choice != "auto":
        return choice
    return "stream" if decoded_bytes > budget_mb * 2**20 else "memory"


def validate(config) -> None:
    """ValueError naming the first streaming setting that cannot work."""
    resolve_input(config.input, 0, 1.0)
    if not config.input_memory_budget_mb > 0:
        raise ValueError(
            f"config.input_memory_budget_mb must be positive, got {config.input_memory_budget_mb}"
        )
    if config.input_workers < 0:
        raise ValueError(f"config.input_workers must be >= 0, got {config.input_workers}")
    if config.input_crop not in crops.CROPS:
        raise ValueError(
            f"config.input_crop must be one of {', '.join(crops.CROPS)}, got {config.input_crop!r}"
        )
    if config.input == "memory" and config.input_crop != "resize":
        raise ValueError(
            f"config.input_crop={config.input_crop!r} crops the files as they stream; a split "
            "in memory is resized whole: set config.input='stream' or 'auto'"
        )


def local_columns(batch_size: int, process_index: int, process_count: int) -> slice:
    """The columns of every global batch that process `process_index` reads."""
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} does not split over {process_count} processes")
    share = batch_size // process_count
    return slice(process_index * share, (process_index + 1) * share)


@dataclasses.dataclass(frozen=True)
class _Load:
    """Example index -> (image (H, W, C) uint8, label): run in the workers, so picklable."""

    source: sources.FolderSource | sources.TfdsSource
    image_shape: tuple[int, int, int]
    crop: str
    seed: int | None  # None: the evaluation view, no randomness.
    epoch: int

    def __call__(self, index: np.integer) -> tuple[np.ndarray, np.int32]:
        image, label = self.source[int(index)]
        rng = None
        if self.seed is not None and self.crop != "resize":  # Only random crops draw.
            rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        return crops.preprocess(image, self.image_shape, self.crop, rng), np.int32(label)


@dataclasses.dataclass(frozen=True)
class _LoadBatch:
    """A row of example indices (and, for evaluation, its mask) -> one batch."""

    load: _Load

    def __call__(self, row) -> dict[str, np.ndarray]:
        indices, mask = row if isinstance(row, tuple) else (row, None)
        examples = [self.load(i) for i in indices]
        batch = {
            "image": np.stack([image for image, _ in examples]),
            "label": np.asarray([label for _, label in examples], np.int32),
        }
        return batch if mask is None else {**batch, "mask": np.asarray(mask)}


def _read(rows, load: _Load, workers: int) -> grain.DatasetIterator:
    """The batches of `rows` (example indices, or (indices, mask) pairs) read by `load`,
    ahead of the step by `workers` processes (0: threads of this process)."""
    import grain  # Here, not at the top: a quarter second of every run that does not stream.

    threads = max(1, min(PREFETCH_BATCHES, os.cpu_count() or 1))
    stream = (
        grain.MapDataset.source(rows)
        .map(_LoadBatch(load))
        .to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=PREFETCH_BATCHES)
        )
    )
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags' defaults.
            flags.FLAGS(sys.argv[:1], known_only=True)
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(stream)


@dataclasses.dataclass
class TrainStream:
    """Endless training batches, epoch after epoch, of this process's share: dicts of
    "image" (B / P, H, W, C) uint8 and "label" (B / P,) int32."""

    split: sources.StreamSplit
    batch_size: int  # Global, over all processes.
    seed: int
    crop: str = "resize"
    workers: int = 0
    process_index: int = 0
    process_count: int = 1
    epoch: int = 0
    step: int = 0  # The next batch of `epoch`.

    def __post_init__(self) -> None:
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the split's {self.split.num_examples} examples make no batch of {self.batch_size}"
            )
        self._columns = local_columns(self.batch_size, self.process_index, self.process_count)
        self._batches: grain.DatasetIterator | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.split.num_examples // self.batch_size

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """(steps, B / P) example indices this process reads in `epoch`."""
        indices = batching.epoch_indices(self.split.num_examples, self.batch_size, self.seed, epoch)
        return indices[:, self._columns]

    def _open(self) -> None:
        local = self.epoch_indices(self.epoch)
        load = _Load(self.split.source, self.split.image_shape, self.crop, self.seed, self.epoch)
        self._batches = _read(local[self.step :], load, self.workers)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.step == self.steps_per_epoch:
            self.close()
            self.epoch, self.step = self.epoch + 1, 0
        if self._batches is None:
            self._open()
        batch = next(self._batches)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, int]:
        """Where the stream stands: the epoch and step of the next batch."""
        return {"epoch": self.epoch, "step": self.step}

    def set_state(self, state: dict[str, int]) -> None:
        """Continue from `state` (a `get_state()`): the next batch is the one that followed
        it."""
        epoch, step = int(state["epoch"]), int(state["step"])
        if not 0 <= step <= self.steps_per_epoch or epoch < 0:
            raise ValueError(
                f"stream state {state} is outside this split: {self.steps_per_epoch} steps "
                f"an epoch; resume with the dataset and batch size the run was saved with"
            )
        self.close()
        self.epoch, self.step = epoch, step

    def close(self) -> None:
        """Stops the workers of the current epoch."""
        if self._batches is not None:
            getattr(self._batches, "close", lambda: None)()
            self._batches = None


def eval_batches(
    split: sources.StreamSplit,
    batch_size: int,
    crop: str = "resize",
    workers: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `split` once, in its order, in batches padded to `batch_size` (global)
    with "mask" False on the padding: this process's share of each, evaluation view."""
    indices, mask = batching.padded_indices(split.num_examples, batch_size)
    columns = local_columns(batch_size, process_index, process_count)
    load = _Load(split.source, split.image_shape, crop, None, 0)
    iterator = _read(list(zip(indices[:, columns], mask[:, columns])), load, workers)
    try:
        yield from iterator
    finally:
        getattr(iterator, "close", lambda: None)()


def read_examples(split: sources.StreamSplit, rows: np.ndarray, crop: str = "resize"):
    """The images (N, H, W, C) uint8 of the examples `rows` of `split`, evaluation view,
    decoded here (a sample, e.g. to fit a layer to the data)."""
    return _LoadBatch(_Load(split.source, split.image_shape, crop, None, 0))(rows)["image"]


def to_device(
    batches: Iterator[dict[str, np.ndarray]], sharding: jax.sharding.Sharding, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """`batches` (this process's rows of each global batch) as global arrays laid out by
    `sharding`, put on the devices by a background thread `size` batches ahead, so that the
    copy overlaps the step."""
    ready: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def put(local: np.ndarray) -> jax.Array:
        rows = local.shape[0] * jax.process_count()
        return jax.make_array_from_process_local_data(sharding, local, (rows, *local.shape[1:]))

    def fill() -> None:
        try:
            for batch in batches:
                ready.put({key: put(value) for key, value in batch.items()})
        except BaseException as error:  # Raised again on the consuming thread.
            ready.put(error)
        ready.put(done)

    threading.Thread(target=fill, daemon=True).start()
    while (item := ready.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
