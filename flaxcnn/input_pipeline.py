"""tfds input: load and decode once, then seeded shuffle -> batch -> scale -> prefetch -> numpy.

The training order is a pure function of (seed, epoch), so a resumed run sees the same
batches as an uninterrupted one. Evaluation batches are padded to a fixed size with a
`mask`, so every example counts exactly once and the step never recompiles.
"""

import dataclasses
import socket
import threading
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import flaxcnn.datasets  # noqa: F401  (registers the project's own builders with tfds)

EMBEDDED = "embedded_mnist"
NETWORK_PROBE = ("storage.googleapis.com", 443)


class DataError(ValueError):
    """A dataset that cannot be found, prepared or used as asked."""


@dataclasses.dataclass
class Split:
    """One split, decoded and cached: (uint8 image, int label) examples."""

    examples: tf.data.Dataset
    num_examples: int
    image_shape: tuple[int, int, int]
    num_classes: int


def _network_reachable(timeout: float = 5.0) -> bool:
    """Whether tfds's download host answers within `timeout` seconds (DNS included)."""
    result = []

    def probe():
        try:
            socket.create_connection(NETWORK_PROBE, timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def get_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The tfds builder of `name`, prepared: offline for the embedded dataset, else downloaded
    if the network is there; fails fast with a clear message when it is not."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"unknown tfds dataset {name!r}: {str(e).splitlines()[0]}") from None
    if not builder.is_prepared():
        if name != EMBEDDED and not _network_reachable():
            raise DataError(
                f"dataset {name!r} is not prepared in {builder.data_dir} and the network is "
                f"unreachable: prepare it on a connected machine (tfds build {name}) and point "
                f"--config.data_dir or TFDS_DATA_DIR at it, or use --config.dataset={EMBEDDED}"
            )
        builder.download_and_prepare()
    return builder


def load_split(name: str, split: str, data_dir: str | None = None) -> Split:
    """Reads one split (tfds split syntax, e.g. 'train[:90%]') into an in-memory cache."""
    builder = get_builder(name, data_dir)
    try:
        image_key, label_key = builder.info.supervised_keys
        examples = builder.as_dataset(split=split, as_supervised=True)
    except (TypeError, ValueError, AssertionError) as e:
        raise DataError(f"cannot read split {split!r} of {name!r}: {e}") from None
    image_shape = builder.info.features[image_key].shape
    if None in image_shape:
        raise DataError(f"{name!r} has images of varying size {image_shape}")
    examples = examples.map(lambda image, label: (image, tf.cast(label, tf.int32))).cache()
    num_examples = int(examples.cardinality())
    if num_examples < 0:  # Unknown (e.g. under tfds.testing.mock_data): count once.
        num_examples = int(examples.reduce(0, lambda count, _: count + 1))
    num_classes = builder.info.features[label_key].num_classes
    return Split(examples, num_examples, tuple(image_shape), num_classes)


def _to_numpy_batch(images: tf.Tensor, labels: tf.Tensor) -> dict[str, tf.Tensor]:
    return {"image": tf.cast(images, tf.float32) / 255.0, "label": labels}


def _process_slice(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous share of a global batch."""
    per_process = len(batch["label"]) // jax.process_count()
    start = jax.process_index() * per_process
    return {key: value[start : start + per_process] for key, value in batch.items()}


def train_batches(
    split: Split, batch_size: int, seed: int, epoch: int, skip: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """The epoch's full batches of `batch_size` (global), in an order fixed by (seed, epoch),
    starting after `skip` batches. The last partial batch is dropped (a new one each epoch)."""
    ds = split.examples.shuffle(
        split.num_examples, seed=seed * 1_000_003 + epoch, reshuffle_each_iteration=False
    )
    ds = ds.batch(batch_size, drop_remainder=True).skip(skip)
    ds = ds.map(_to_numpy_batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    for batch in tfds.as_numpy(ds):
        yield _process_slice(batch)


def eval_batches(split: Split, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in batches padded to `batch_size` with `mask` False on padding."""
    ds = split.examples.batch(batch_size).map(_to_numpy_batch).prefetch(tf.data.AUTOTUNE)
    for batch in tfds.as_numpy(ds):
        size = len(batch["label"])
        batch = {key: _pad(value, batch_size) for key, value in batch.items()}
        batch["mask"] = np.arange(batch_size) < size
        yield _process_slice(batch)


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    return np.pad(array, [(0, size - len(array))] + [(0, 0)] * (array.ndim - 1))
