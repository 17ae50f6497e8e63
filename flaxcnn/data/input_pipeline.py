"""tfds input: read and decode each split once into memory (uint8), then per epoch a seeded
shuffle -> batch -> scale to [0, 1] float32 -> numpy batches.

A decoded split is kept on disk (flaxcnn.data.cache), so that tfds, and TensorFlow with it,
is imported only when a split is read through tfds for the first time on a machine, and an
image folder's JPEGs or PNGs are decoded once until its files change.

The training order is a pure function of (seed, epoch), so a resumed run sees the same
batches as an uninterrupted one. Evaluation batches are padded to a fixed size with a
`mask`, so every example counts exactly once and the step never recompiles.
"""

import dataclasses
import functools
import os
import socket
import threading
from typing import TYPE_CHECKING

import numpy as np

from flaxcnn.data import cache, crops, image_folder

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

EMBEDDED = "embedded_mnist"
NETWORK_PROBE = ("storage.googleapis.com", 443)
NETWORK_TIMEOUT_S = 5.0
# Overrides of the probe ("host:port") and its timeout (seconds), e.g. for a proxy, or for a
# test of the offline path against a real unreachable address.
PROBE_ENV, PROBE_TIMEOUT_ENV = "FLAXCNN_NETWORK_PROBE", "FLAXCNN_NETWORK_TIMEOUT"


class DataError(ValueError):
    """A dataset that cannot be found, prepared or used as asked."""


@dataclasses.dataclass
class Split:
    """One split, decoded into memory."""

    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int32
    num_classes: int
    class_names: list[str] | None = None

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.images.shape[1:]


def _network_reachable(timeout: float | None = None, target: tuple[str, int] | None = None) -> bool:
    """Whether `target` (tfds's download host, or $FLAXCNN_NETWORK_PROBE) answers within
    `timeout` seconds (DNS included; $FLAXCNN_NETWORK_TIMEOUT or 5 s)."""
    if target is None:
        host, _, port = os.environ.get(PROBE_ENV, "").rpartition(":")
        target = (host, int(port)) if host else NETWORK_PROBE
    if timeout is None:
        timeout = float(os.environ.get(PROBE_TIMEOUT_ENV, NETWORK_TIMEOUT_S))
    result = []

    def probe():
        try:
            socket.create_connection(target, timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    # DNS lookups ignore the socket timeout: the thread bounds them.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


@functools.cache
def import_tfds():
    """tfds, imported on first use with TensorFlow kept off the accelerators (tf.data only:
    they are JAX's), its C++ logs quiet and its progress bars off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tensorflow_datasets as tfds

    import flaxcnn.data.embedded_mnist  # noqa: F401  (registers the project's builders)

    tf.config.set_visible_devices([], "GPU")
    tfds.disable_progress_bar()
    return tfds


def tfds_data_dir(data_dir: str | None) -> str:
    """`data_dir`, else $TFDS_DATA_DIR, else tfds's default, expanded; an empty value counts
    as unset (tfds itself would read and write the current directory)."""
    chosen = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.abspath(os.path.expanduser(chosen))


def get_builder(name: str, data_dir: str | None) -> "tfds.core.DatasetBuilder":
    """The tfds builder of `name`, prepared: offline for the embedded dataset, else downloaded
    if the network is there; fails fast with a clear message when it is not."""
    if image_folder.is_folder_dataset(name):
        raise DataError(f"{name!r} is an image folder, not a tfds dataset: use load_split")
    tfds = import_tfds()
    try:
        builder = tfds.builder(name, data_dir=tfds_data_dir(data_dir))
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


def load_split(
    name: str,
    split: str,
    data_dir: str | None = None,
    image_size: tuple[int, int] | None = None,
    color_mode: str | None = None,
    crop: str = "resize",
) -> Split:
    """Reads and decodes one split (tfds split syntax, e.g. 'train[:90%]') into memory, or
    maps it from the cache of decoded splits (flaxcnn.data.cache).

    `name` is a tfds dataset or `folder:/path` (flaxcnn.data.image_folder). With
    `image_size` (H, W) or `color_mode` ('grayscale', 'rgb'), images are resized or converted
    as image folders are; folders default to 'rgb' at their images' own size. `crop`
    (`config.input_crop`) picks the evaluation view: "resize" the whole image,
    "random_resized" its centre crop (`crops.evaluation_view`)."""
    view = crops.evaluation_view(crop)
    if image_folder.is_folder_dataset(name):
        return _load_folder_split(name, split, image_size, color_mode, crop)
    key = cache.split_key(name, split, tfds_data_dir(data_dir), image_size, color_mode, crop)
    cached = cache.read_entry(key)
    if cached is not None:
        images, labels, meta = cached
        return Split(np.asarray(images), labels, meta["num_classes"], meta["class_names"])
    result, source = _decode_tfds_split(name, split, data_dir, image_size, color_mode, view)
    cache.save(
        key,
        source,
        result.images,
        result.labels,
        num_classes=result.num_classes,
        class_names=result.class_names,
    )
    return result


def _load_folder_split(
    name: str,
    split: str,
    image_size: tuple[int, int] | None,
    color_mode: str | None,
    crop: str,
) -> Split:
    """A split of an image folder, decoded once and then mapped from the cache: the entry's
    fingerprint covers every file under the folder, so any change decodes it again."""
    try:
        root = os.path.abspath(image_folder.folder_root(name))
        key = cache.split_key(image_folder.PREFIX + root, split, root, image_size, color_mode, crop)
        cached = cache.read_entry(key)
        if cached is not None:
            images, labels, meta = cached
            return Split(np.asarray(images), labels, meta["num_classes"], meta["class_names"])
        images, labels, names = image_folder.load_folder_split(
            name, split, image_size, color_mode, crops.evaluation_view(crop)
        )
    except image_folder.FolderError as e:
        raise DataError(str(e)) from None
    cache.save(key, root, images, labels, num_classes=len(names), class_names=names)
    return Split(images, labels, len(names), names)


def _decode_tfds_split(
    name: str,
    split: str,
    data_dir: str | None,
    image_size: tuple[int, int] | None,
    color_mode: str | None,
    view: image_folder.View,
) -> tuple[Split, str]:
    """The split read through tfds, and the prepared folder it was read from."""
    builder = get_builder(name, data_dir)
    try:
        image_key, label_key = builder.info.supervised_keys
        examples = builder.as_dataset(split=split, as_supervised=True)
    except (TypeError, ValueError, AssertionError) as e:
        raise DataError(f"cannot read split {split!r} of {name!r}: {e}") from None
    image_shape = builder.info.features[image_key].shape
    if None in image_shape:
        raise DataError(f"{name!r} has images of varying size {image_shape}")
    images, labels = [], []
    for image_batch, label_batch in import_tfds().as_numpy(examples.batch(4096)):
        images.append(image_batch)
        labels.append(label_batch.astype(np.int32))
    if not labels:
        raise DataError(f"split {split!r} of {name!r} is empty")
    labels_feature = builder.info.features[label_key]
    try:
        images = image_folder.convert_images(np.concatenate(images), image_size, color_mode, view)
    except image_folder.FolderError as e:
        raise DataError(f"{name!r}: {e}") from None
    result = Split(
        images, np.concatenate(labels), labels_feature.num_classes, list(labels_feature.names)
    )
    return result, str(builder.data_dir)
