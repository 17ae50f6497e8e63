"""Random-access sources of undecoded examples for the streaming input: `source[i]` is
(PIL image, label), read and decoded only when asked, so a split never has to fit in memory.

- Image folders (`folder:/path`): the split's file paths in its fixed order
  (`image_folder.split_paths`), each opened by `image_folder.open_image`, so an odd file
  (empty, truncated, not an image, a decompression bomb) stops the run with the same
  one-line error naming it as the in-memory path gives.
- tfds datasets: `builder.as_data_source`, which reads the array_record (or parquet) files
  of a prepared dataset by index. A dataset prepared as tfrecord (tfds's default) has no
  random access: it gives a DataError saying how to prepare it, or to use
  `config.input = "memory"`.
"""

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from flaxcnn.data import image_folder, input_pipeline


@dataclasses.dataclass(frozen=True)
class FolderSource:
    """The images of a folder split by index: (PIL image, label)."""

    paths: list[str]
    labels: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return image_folder.open_image(self.paths[index]), int(self.labels[index])


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A tfds random-access data source, its records as (PIL image, label)."""

    records: Any  # tfds's data source: len() and [index] -> {image_key: array, ...}
    image_key: str
    label_key: str

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        record = self.records[int(index)]
        image = np.asarray(record[self.image_key], np.uint8)
        if image.ndim != 3 or image.shape[2] not in (1, 3):
            raise input_pipeline.DataError(
                f"record {index}: images must be (H, W, 1) or (H, W, 3), not {image.shape}"
            )
        pixels = image[:, :, 0] if image.shape[2] == 1 else image  # PIL: grayscale is (H, W).
        return Image.fromarray(pixels), int(record[self.label_key])


@dataclasses.dataclass(frozen=True)
class StreamSplit:
    """A split to stream: its source, and what is known of it without decoding it."""

    source: FolderSource | TfdsSource
    num_classes: int
    class_names: list[str] | None
    image_shape: tuple[int, int, int]  # (H, W, C) of the model's input.

    @property
    def num_examples(self) -> int:
        return len(self.source)

    @property
    def decoded_bytes(self) -> int:
        """The memory the split would take decoded (uint8 at `image_shape`)."""
        return self.num_examples * int(np.prod(self.image_shape))


def open_split(
    name: str,
    split: str,
    data_dir: str | None = None,
    image_size: tuple[int, int] | None = None,
    color_mode: str | None = None,
) -> StreamSplit:
    """The split `split` of dataset `name` (tfds or `folder:/path`) as a stream source.
    Images come out at `image_size` (H, W) (None: a folder's first training image's size, a
    tfds dataset's fixed size) and `color_mode` ("grayscale", "rgb"; None: folders "rgb",
    tfds images as stored)."""
    try:
        if image_folder.is_folder_dataset(name):
            paths, labels, classes = image_folder.split_paths(name, split)
            shape, _ = image_folder.folder_info(name, image_size, color_mode)
            return StreamSplit(FolderSource(paths, labels), len(classes), classes, shape)
        return _open_tfds(name, split, data_dir, image_size, color_mode)
    except image_folder.FolderError as e:
        raise input_pipeline.DataError(str(e)) from None


def _open_tfds(
    name: str,
    split: str,
    data_dir: str | None,
    image_size: tuple[int, int] | None,
    color_mode: str | None,
) -> StreamSplit:
    builder = input_pipeline.get_builder(name, data_dir)
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format not in ("array_record", "parquet"):
        raise input_pipeline.DataError(
            f"tfds dataset {name!r} is prepared as {file_format}, which has no random access: "
            f"streaming needs array_record (tfds build {name} --file_format=array_record, "
            f"or tfds convert_format), or set config.input='memory'"
        )
    try:
        image_key, label_key = builder.info.supervised_keys
        records = builder.as_data_source(split=split)
    except (TypeError, ValueError, AssertionError, NotImplementedError) as e:
        reason = str(e).splitlines()[0]
        raise input_pipeline.DataError(
            f"cannot stream split {split!r} of {name!r}: {reason}"
        ) from None
    stored = builder.info.features[image_key].shape  # (H, W, C), None where it varies.
    size = image_folder.check_image_size(image_size) or stored[:2]
    if None in size:
        raise input_pipeline.DataError(
            f"{name!r} has images of varying size {stored}: set config.image_size=(H, W)"
        )
    num_channels = image_folder.channels(color_mode) if color_mode else stored[2]
    labels = builder.info.features[label_key]
    return StreamSplit(
        TfdsSource(records, image_key, label_key),
        labels.num_classes,
        list(labels.names),
        (*size, num_channels),
    )
