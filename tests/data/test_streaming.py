"""The streaming input (flaxcnn.data.streaming, sources, crops): order, resume, shards,
evaluation coverage, odd files and random-resized crops, on small folders of JPEGs."""

import os
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from flaxcnn import default_config
from flaxcnn.config import validate
from flaxcnn.data import batching, crops, image_folder, input_pipeline, sources, streaming

REPO = pathlib.Path(__file__).resolve().parents[2]

TFDS_DIR = REPO.parent / "shared" / "data" / "tfds"


def make_folder(root, per_class: int = 12, classes: int = 3, sizes=((20, 30), (41, 17))):
    """root/<class>/<i>.jpg, images of the given (H, W) sizes in turn, each pixel value
    unique to its file, so that a batch shows which files it holds."""
    for label in range(classes):
        os.makedirs(root / f"c{label}")
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            value = (label * per_class + i) * 255 // (classes * per_class)
            image = np.full((h, w, 3), value, np.uint8)
            Image.fromarray(image).save(root / f"c{label}" / f"{i}.jpg", quality=95)
    return f"folder:{root}"


@pytest.fixture
def folder(tmp_path):
    return sources.open_split(make_folder(tmp_path), "train", image_size=(16, 16))


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_order_is_the_in_memory_order_and_a_pure_function_of_seed_and_epoch(folder):
    labels = folder.source.labels
    a = streaming.TrainStream(folder, batch_size=8, seed=3)
    batches = take(a, 2 * a.steps_per_epoch)
    for epoch in range(2):
        expected = labels[batching.epoch_indices(folder.num_examples, 8, 3, epoch)]
        got = [b["label"] for b in batches[epoch * a.steps_per_epoch :][: a.steps_per_epoch]]
        np.testing.assert_array_equal(np.stack(got), expected)
    b = streaming.TrainStream(folder, batch_size=8, seed=3, epoch=1)
    np.testing.assert_array_equal(next(b)["image"], batches[a.steps_per_epoch]["image"])
    other = streaming.TrainStream(folder, batch_size=8, seed=4)
    assert not np.array_equal(next(other)["label"], batches[0]["label"])


@pytest.mark.parametrize("crop", crops.CROPS)
def test_a_restored_iterator_continues_with_exactly_the_same_batches(folder, crop):
    stream = streaming.TrainStream(folder, batch_size=8, seed=0, crop=crop)
    take(stream, 3)  # 36 images, 4 steps an epoch: the state below is mid-epoch ...
    state = stream.get_state()
    expected = take(stream, 4)  # ... and the next batches cross into epoch 1.
    resumed = streaming.TrainStream(folder, batch_size=8, seed=0, crop=crop)
    resumed.set_state(state)
    for want, got in zip(expected, take(resumed, 4)):
        np.testing.assert_array_equal(want["image"], got["image"])
        np.testing.assert_array_equal(want["label"], got["label"])
    assert resumed.get_state() == stream.get_state() == {"epoch": 1, "step": 3}


def test_a_state_from_another_split_is_refused(folder):
    stream = streaming.TrainStream(folder, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="outside this split"):
        stream.set_state({"epoch": 0, "step": 99})


def test_two_shards_are_disjoint_and_together_are_the_one_process_batches(folder):
    whole = streaming.TrainStream(folder, batch_size=8, seed=1)
    shards = [
        streaming.TrainStream(folder, batch_size=8, seed=1, process_index=p, process_count=2)
        for p in range(2)
    ]
    for epoch in range(2):
        a, b = (shard.epoch_indices(epoch) for shard in shards)
        assert not set(a.ravel()) & set(b.ravel())
        joined = np.concatenate([a, b], axis=1)
        np.testing.assert_array_equal(joined, whole.epoch_indices(epoch))
        assert len(set(joined.ravel())) == joined.size  # Each example at most once ...
    for want in take(whole, 2):
        got = [next(shard) for shard in shards]
        np.testing.assert_array_equal(np.concatenate([g["image"] for g in got]), want["image"])
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        streaming.TrainStream(folder, batch_size=8, seed=1, process_index=0, process_count=3)


def test_evaluation_counts_every_example_once(folder):
    batches = list(streaming.eval_batches(folder, batch_size=10))
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[mask]
    assert mask.sum() == folder.num_examples == 36 and len(batches) == 4
    np.testing.assert_array_equal(labels, folder.source.labels)  # The split's own order.
    shards = [
        list(streaming.eval_batches(folder, 10, process_index=p, process_count=2)) for p in (0, 1)
    ]
    rows = [np.concatenate([b["image"] for b in s]) for s in shards]
    assert sum(int(np.concatenate([b["mask"] for b in s]).sum()) for s in shards) == 36
    assert rows[0].shape == rows[1].shape == (20, 16, 16, 3)


def test_resize_gives_the_in_memory_pixels(tmp_path):
    name = make_folder(tmp_path)
    images, labels, _ = image_folder.load_folder_split(name, "train[:50%]", (16, 16))
    split = sources.open_split(name, "train[:50%]", image_size=(16, 16))
    batches = list(streaming.eval_batches(split, batch_size=len(labels)))
    np.testing.assert_array_equal(batches[0]["image"], images)
    np.testing.assert_array_equal(batches[0]["label"], labels)


def test_worker_processes_give_the_same_batches_as_threads(folder):
    threads = take(streaming.TrainStream(folder, batch_size=8, seed=0, crop="random_resized"), 3)
    stream = streaming.TrainStream(folder, batch_size=8, seed=0, crop="random_resized", workers=2)
    try:
        for want, got in zip(threads, take(stream, 3)):
            np.testing.assert_array_equal(want["image"], got["image"])
    finally:
        stream.close()


def write_odd(root, name: str, data: bytes | None = None, image=None):
    os.makedirs(root / "c0", exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "c0" / "good.png")
    path = root / "c0" / name
    if image is not None:
        image.save(path)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("bad.png", b"not an image at all", "not an image"),
        ("cut.png", None, "not a readable image"),
    ],
)
def test_odd_files_stop_the_stream_with_the_in_memory_error(tmp_path, name, data, message):
    if data is None:  # A PNG cut short.
        whole = tmp_path / "whole.png"
        Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(whole)
        data = whole.read_bytes()[:60]
    path = write_odd(tmp_path / "d", name, data)
    split = sources.open_split(f"folder:{tmp_path / 'd'}", "train", image_size=(8, 8))
    with pytest.raises(image_folder.FolderError, match=message) as streamed:
        list(streaming.eval_batches(split, batch_size=2))
    assert str(path) in str(streamed.value) and "\n" not in str(streamed.value)
    with pytest.raises(image_folder.FolderError) as in_memory:
        image_folder.load_folder_split(f"folder:{tmp_path / 'd'}", "train", (8, 8))
    assert str(in_memory.value) == str(streamed.value)


def test_other_colour_modes_are_converted_and_unknown_ones_refused(tmp_path):
    cmyk = Image.fromarray(np.full((8, 8, 4), 9, np.uint8), "CMYK")
    write_odd(tmp_path, "cmyk.jpg", image=cmyk)
    gray = sources.open_split(
        f"folder:{tmp_path}", "train", image_size=(8, 8), color_mode="grayscale"
    )
    assert next(iter(streaming.eval_batches(gray, 2)))["image"].shape == (2, 8, 8, 1)
    with pytest.raises(input_pipeline.DataError, match="unknown color_mode 'cmyk'"):
        sources.open_split(f"folder:{tmp_path}", "train", image_size=(8, 8), color_mode="cmyk")


@pytest.mark.skipif(not TFDS_DIR.is_dir(), reason="no prepared tfds data in ../shared/data")
def test_a_tfds_dataset_prepared_as_tfrecord_says_how_to_stream_it():
    with pytest.raises(input_pipeline.DataError, match="prepared as tfrecord.*array_record"):
        sources.open_split("mnist", "train", data_dir=str(TFDS_DIR))


def test_random_resized_boxes_lie_inside_in_scale_and_ratio():
    rng = np.random.default_rng(0)
    for height, width in [(32, 32), (480, 640), (37, 500), (500, 37), (1, 1)]:
        for _ in range(200):
            top, left, h, w = crops.random_resized_box(height, width, rng)
            assert top >= 0 and top + h <= height and left >= 0 and left + w <= width
            assert h >= 1 and w >= 1
            if (height, width) == (480, 640):  # Fits at the first draw: in range.
                assert 0.07 <= h * w / (height * width) <= 1.0
                assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    boxes = {crops.random_resized_box(100, 100, np.random.default_rng(5)) for _ in range(3)}
    assert len(boxes) == 1  # A pure function of the generator.
    assert crops.centre_box(100, 200, 50, 50) == (6, 56, 88, 88)


def test_random_resized_crops_have_the_model_shape_and_vary_by_epoch(folder):
    stream = streaming.TrainStream(folder, batch_size=8, seed=0, crop="random_resized")
    batches = take(stream, stream.steps_per_epoch + 1)
    assert all(b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.uint8 for b in batches)
    image = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    views = [
        crops.preprocess(image, (16, 16, 3), "random_resized", np.random.default_rng(s))
        for s in range(4)
    ]
    assert len({v.tobytes() for v in views}) == 4
    centre = crops.preprocess(image, (16, 16, 3), "random_resized", None)
    np.testing.assert_array_equal(
        centre, crops.preprocess(image, (16, 16, 3), "random_resized", None)
    )


def test_batches_reach_the_devices_in_order(folder):
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    host = take(streaming.TrainStream(folder, batch_size=8, seed=0), 5)
    device = streaming.to_device(streaming.TrainStream(folder, batch_size=8, seed=0), sharding)
    for want in host:
        got = next(device)
        assert isinstance(got["image"], jax.Array)
        np.testing.assert_array_equal(np.asarray(got["image"]), want["image"])


def test_auto_streams_a_split_over_the_budget_and_settings_are_validated():
    assert streaming.resolve_input("auto", 5 * 2**20, 4.0) == "stream"
    assert streaming.resolve_input("auto", 3 * 2**20, 4.0) == "memory"
    assert streaming.resolve_input("stream", 0, 4.0) == "stream"
    config = default_config.get_config()
    for key, value, message in [
        ("input", "disk", "config.input must be one of memory, stream, auto"),
        ("input_crop", "random", "config.input_crop must be one of"),
        ("input_workers", -1, "config.input_workers must be >= 0"),
    ]:
        bad = config.copy_and_resolve_references()
        bad[key] = value
        with pytest.raises(ValueError, match=message):
            validate(bad)
