"""The cache of decoded splits: tfds decodes a split once; a changed source is decoded again."""

import os
import subprocess
import sys

import numpy as np
import pytest

from flaxcnn.data import cache, input_pipeline


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> str:
    path = str(tmp_path / "splits")
    monkeypatch.setenv(cache.CACHE_ENV, path)
    return path


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """The splits read through tfds (not from the cache), in order."""
    calls = []
    decode = input_pipeline._decode_tfds_split

    def counting(name, split, *args):
        calls.append(split)
        return decode(name, split, *args)

    monkeypatch.setattr(input_pipeline, "_decode_tfds_split", counting)
    return calls


def test_second_read_comes_from_the_cache_and_equals_the_first(data_dir, cache_dir, decodes):
    first = input_pipeline.load_split("embedded_mnist", "train[90%:]", data_dir)
    second = input_pipeline.load_split("embedded_mnist", "train[90%:]", data_dir)
    assert decodes == ["train[90%:]"]
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert second.images.dtype == np.uint8 and second.labels.dtype == np.int32
    assert (second.num_classes, second.class_names) == (first.num_classes, first.class_names)
    assert second.image_shape == (28, 28, 1) and len(os.listdir(cache_dir)) == 1


def test_each_split_size_and_colour_mode_is_its_own_entry(data_dir, cache_dir, decodes):
    gray = input_pipeline.load_split("embedded_mnist", "test", data_dir)
    rgb = input_pipeline.load_split("embedded_mnist", "test", data_dir, (14, 14), "rgb")
    again = input_pipeline.load_split("embedded_mnist", "test", data_dir, (14, 14), "rgb")
    assert decodes == ["test", "test"]
    assert gray.image_shape == (28, 28, 1) and rgb.image_shape == again.image_shape == (14, 14, 3)
    np.testing.assert_array_equal(again.images, rgb.images)


def test_a_changed_source_is_decoded_again(data_dir, cache_dir, decodes):
    input_pipeline.load_split("embedded_mnist", "test", data_dir)
    source = os.path.join(data_dir, "embedded_mnist", "1.0.0")
    info = os.path.join(source, "dataset_info.json")
    stat = os.stat(info)
    try:
        os.utime(info, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # Re-prepared.
        input_pipeline.load_split("embedded_mnist", "test", data_dir)
        input_pipeline.load_split("embedded_mnist", "test", data_dir)
    finally:
        os.utime(info, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert decodes == ["test", "test"]


def test_a_changed_decoder_is_decoded_again(data_dir, cache_dir, decodes, monkeypatch):
    input_pipeline.load_split("embedded_mnist", "test", data_dir)
    input_pipeline.load_split("embedded_mnist", "test", data_dir)
    monkeypatch.setattr(cache, "_decoder_hash", lambda: "another decoder")
    input_pipeline.load_split("embedded_mnist", "test", data_dir)
    monkeypatch.setattr(cache, "_version", lambda distribution: "0.0")  # Another Pillow, tfds.
    input_pipeline.load_split("embedded_mnist", "test", data_dir)
    assert decodes == ["test", "test", "test"]


def test_entries_of_a_vanished_source_are_pruned(data_dir, cache_dir):
    key = cache.split_key("gone", "train", data_dir, None, None)
    images, labels = np.zeros((2, 3, 3, 1), np.uint8), np.zeros(2, np.int32)
    source = os.path.join(cache_dir, "..", "source")
    os.makedirs(source)
    cache.save(key, source, images, labels, num_classes=1, class_names=["a"])
    assert cache.read_entry(key) is not None
    os.rmdir(source)
    assert cache.read_entry(key) is None
    input_pipeline.load_split("embedded_mnist", "test", data_dir)  # Saves, and prunes.
    assert len(os.listdir(cache_dir)) == 1


def test_cache_off(data_dir, monkeypatch, decodes):
    monkeypatch.setenv(cache.CACHE_ENV, "off")
    input_pipeline.load_split("embedded_mnist", "test", data_dir)
    input_pipeline.load_split("embedded_mnist", "test", data_dir)
    assert decodes == ["test", "test"]


def test_a_cached_split_is_read_without_tensorflow(data_dir, cache_dir):
    input_pipeline.load_split("embedded_mnist", "train[:90%]", data_dir)
    code = (
        "import sys\n"
        "from flaxcnn.data import input_pipeline\n"
        f"s = input_pipeline.load_split('embedded_mnist', 'train[:90%]', {data_dir!r})\n"
        "assert s.num_examples == 9000, s.num_examples\n"
        "assert not [m for m in sys.modules if m.startswith('tensorflow')]\n"
    )
    env = {**os.environ, cache.CACHE_ENV: cache_dir}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_a_folder_split_is_decoded_once_until_a_file_changes(tmp_path, cache_dir, monkeypatch):
    from PIL import Image

    from flaxcnn.data import image_folder

    root = tmp_path / "folder"  # Beside the cache, not above it.
    for label in ("a", "b"):
        (root / "train" / label).mkdir(parents=True)
        for i in range(3):
            pixels = np.full((8, 8, 3), 40 * i + (label == "b") * 120, np.uint8)
            Image.fromarray(pixels).save(root / "train" / label / f"{i}.png")
    decoded = []
    load = image_folder.load_folder_split
    monkeypatch.setattr(
        image_folder, "load_folder_split", lambda *a: decoded.append(a[1]) or load(*a)
    )
    name = f"folder:{root}"
    first = input_pipeline.load_split(name, "train[:50%]")
    second = input_pipeline.load_split(name, "train[:50%]")
    assert decoded == ["train[:50%]"] and second.class_names == ["a", "b"]
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(root / "train" / "a" / "0.png")
    third = input_pipeline.load_split(name, "train[:50%]")
    assert len(decoded) == 2 and not np.array_equal(third.images, first.images)
