import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from flaxcnn.data import batching, input_pipeline


def test_embedded_dataset_prepares_offline_with_the_right_splits(data_dir):
    sizes = {}
    for split in ("train[:90%]", "train[90%:]", "test"):
        s = input_pipeline.load_split("embedded_mnist", split, data_dir)
        assert s.image_shape == (28, 28, 1) and s.num_classes == 10
        sizes[split] = s.num_examples
    assert sizes == {"train[:90%]": 9000, "train[90%:]": 1000, "test": 2000}
    assert s.images.dtype == np.uint8 and s.images.max() == 255  # Real digits.
    assert s.labels.dtype == np.int32 and set(s.labels) == set(range(10))


def test_embedded_classes_are_stratified(data_dir):
    split = input_pipeline.load_split("embedded_mnist", "test", data_dir)
    np.testing.assert_array_equal(np.bincount(split.labels), [200] * 10)


def test_training_order_is_a_function_of_seed_and_epoch():
    first = batching.epoch_indices(2000, 100, seed=0, epoch=0)
    assert first.shape == (20, 100) and sorted(first.ravel()) == list(range(2000))
    np.testing.assert_array_equal(first, batching.epoch_indices(2000, 100, seed=0, epoch=0))
    assert not np.array_equal(first, batching.epoch_indices(2000, 100, seed=0, epoch=1))
    assert not np.array_equal(first, batching.epoch_indices(2000, 100, seed=1, epoch=0))


def test_training_drops_only_the_last_partial_batch():
    indices = batching.epoch_indices(2000, 300, seed=0, epoch=0)
    assert indices.shape == (6, 300) and len(set(indices.ravel())) == 1800


def test_evaluation_counts_every_example_once_with_padding():
    indices, mask = batching.padded_indices(2000, 768)  # 2000 = 2 * 768 + 464
    assert indices.shape == mask.shape == (3, 768)
    assert [int(m.sum()) for m in mask] == [768, 768, 464]
    np.testing.assert_array_equal(np.sort(indices[mask]), np.arange(2000))


def test_map_padded_drops_the_padding_and_keeps_the_order():
    inputs = np.arange(37, dtype=np.float32)[:, None]
    shapes = []

    def double(x):
        shapes.append(x.shape)
        return 2 * x, x[:, 0]

    doubled, same = batching.map_padded(double, inputs, 16)
    np.testing.assert_array_equal(doubled, 2 * inputs)
    np.testing.assert_array_equal(same, inputs[:, 0])
    assert set(shapes) == {(16, 1)}
    batching.map_padded(double, inputs[:3], 16)
    assert shapes[-1] == (4, 1)  # A small input runs in the power of two that holds it.


def test_any_tfds_dataset_by_name_under_mock_data(monkeypatch):
    # mock_data makes the "download" a no-op; pretend the network is there so we ask for it.
    monkeypatch.setattr(input_pipeline, "_network_reachable", lambda: True)
    monkeypatch.setenv("FLAXCNN_SPLIT_CACHE", "off")  # Not a real MNIST decoded before.
    with tfds.testing.mock_data(num_examples=50):
        split = input_pipeline.load_split("mnist", "train", data_dir=None)
        assert split.num_examples == 50 and split.image_shape == (28, 28, 1)
        assert split.images.shape == (50, 28, 28, 1)


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(input_pipeline.DataError, match="unknown tfds dataset 'no_such_set'"):
        input_pipeline.load_split("no_such_set", "train", str(tmp_path))


def test_unprepared_dataset_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(input_pipeline, "_network_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(input_pipeline.DataError, match="not prepared .* unreachable"):
        input_pipeline.load_split("mnist", "train", str(tmp_path))
    assert time.perf_counter() - start < 10


def test_an_empty_tfds_data_dir_is_tfds_default_not_the_current_folder(tmp_path):
    # tfds reads TFDS_DATA_DIR when imported and would take "" as the current folder, preparing
    # datasets there: so a fresh interpreter, with the network stubbed out.
    code = (
        "from flaxcnn.data import input_pipeline as p\n"
        "p._network_reachable = lambda: False\n"
        "try:\n    p.load_split('mnist', 'train', None)\n"
        "except p.DataError as e:\n    print(e)\n"
    )
    env = {**os.environ, "TFDS_DATA_DIR": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    default = os.path.expanduser(os.path.join("~", "tensorflow_datasets"))
    assert f"not prepared in {default}/mnist/" in result.stdout, result.stdout + result.stderr
    assert os.listdir(tmp_path) == []


def test_network_probe_gives_up_on_a_closed_port(monkeypatch):
    monkeypatch.setattr(input_pipeline, "NETWORK_PROBE", ("127.0.0.1", 1))
    assert input_pipeline._network_reachable(timeout=2) is False


def test_real_mnist_splits(shared_tfds):
    # The slices the default config trains and validates on (one decoded: the smaller).
    splits = input_pipeline.get_builder("mnist", shared_tfds).info.splits
    assert [splits[s].num_examples for s in ("train[:90%]", "test")] == [54_000, 10_000]
    validation = input_pipeline.load_split("mnist", "train[90%:]", shared_tfds)
    assert validation.images.shape == (6_000, 28, 28, 1) and validation.images.dtype == np.uint8
    assert set(np.unique(validation.labels)) == set(range(10))
