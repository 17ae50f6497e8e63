import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from flaxcnn.data import input_pipeline


def test_embedded_dataset_prepares_offline_with_the_right_splits(data_dir):
    sizes = {}
    for split in ("train[:90%]", "train[90%:]", "test"):
        s = input_pipeline.load_split("embedded_mnist", split, data_dir)
        assert s.image_shape == (28, 28, 1) and s.num_classes == 10
        sizes[split] = s.num_examples
    assert sizes == {"train[:90%]": 9000, "train[90%:]": 1000, "test": 2000}
    batch = next(input_pipeline.train_batches(s, 64, seed=0, epoch=0))
    assert batch["image"].shape == (64, 28, 28, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(10))
    assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    assert batch["image"].max() == 1.0  # Real digits: scaled from 255.


def test_embedded_classes_are_stratified(data_dir):
    split = input_pipeline.load_split("embedded_mnist", "test", data_dir)
    labels = np.concatenate([b["label"] for b in input_pipeline.eval_batches(split, 500)])
    np.testing.assert_array_equal(np.bincount(labels), [200] * 10)


def test_training_order_is_a_function_of_seed_and_epoch(data_dir):
    split = input_pipeline.load_split("embedded_mnist", "test", data_dir)

    def labels(seed, epoch, skip=0):
        batches = input_pipeline.train_batches(split, 100, seed, epoch, skip)
        return np.concatenate([b["label"] for b in batches])

    first = labels(0, 0)
    assert len(first) == 2000
    np.testing.assert_array_equal(first, labels(0, 0))
    assert not np.array_equal(first, labels(0, 1))
    assert not np.array_equal(first, labels(1, 0))
    np.testing.assert_array_equal(first[700:], labels(0, 0, skip=7))


def test_training_drops_only_the_last_partial_batch(data_dir):
    split = input_pipeline.load_split("embedded_mnist", "test", data_dir)
    batches = list(input_pipeline.train_batches(split, 300, seed=0, epoch=0))
    assert len(batches) == 6 and all(len(b["label"]) == 300 for b in batches)


def test_evaluation_counts_every_example_once_with_padding(data_dir):
    split = input_pipeline.load_split("embedded_mnist", "test", data_dir)
    batches = list(input_pipeline.eval_batches(split, 768))  # 2000 = 2 * 768 + 464
    assert [len(b["label"]) for b in batches] == [768, 768, 768]
    assert [int(b["mask"].sum()) for b in batches] == [768, 768, 464]
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    assert len(np.unique(images.reshape(2000, -1), axis=0)) == len(images) == 2000
    assert not batches[-1]["image"][~batches[-1]["mask"]].any()


def test_any_tfds_dataset_by_name_under_mock_data(monkeypatch):
    # mock_data makes the "download" a no-op; pretend the network is there so we ask for it.
    monkeypatch.setattr(input_pipeline, "_network_reachable", lambda: True)
    monkeypatch.setenv("FLAXCNN_SPLIT_CACHE", "off")  # Not a real MNIST decoded before.
    with tfds.testing.mock_data(num_examples=50):
        split = input_pipeline.load_split("mnist", "train", data_dir=None)
        assert split.num_examples == 50 and split.image_shape == (28, 28, 1)
        batch = next(input_pipeline.train_batches(split, 10, seed=0, epoch=0))
        assert batch["image"].shape == (10, 28, 28, 1)


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(input_pipeline.DataError, match="unknown tfds dataset 'no_such_set'"):
        input_pipeline.load_split("no_such_set", "train", str(tmp_path))


def test_unprepared_dataset_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(input_pipeline, "_network_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(input_pipeline.DataError, match="not prepared .* unreachable"):
        input_pipeline.load_split("mnist", "train", str(tmp_path))
    assert time.perf_counter() - start < 10


def test_network_probe_gives_up_on_a_closed_port(monkeypatch):
    monkeypatch.setattr(input_pipeline, "NETWORK_PROBE", ("127.0.0.1", 1))
    assert input_pipeline._network_reachable(timeout=2) is False


def test_real_mnist_splits(shared_tfds):
    sizes = [
        input_pipeline.load_split("mnist", split, shared_tfds).num_examples
        for split in ("train[:90%]", "train[90%:]", "test")
    ]
    assert sizes == [54_000, 6_000, 10_000]
