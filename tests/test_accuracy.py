"""Accuracy on the full 10,000-image MNIST test split (slow: run with `pytest -m slow`)."""

import importlib.util
import json

import pytest
from conftest import REPO

from flaxcnn.training import loop


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.slow
@pytest.mark.parametrize("name, target", [("seed_keras", 0.983), ("cnn_mnist_best", 0.996)])
def test_config_reaches_its_accuracy(name, target, shared_tfds, tmp_path):
    """The targets that only a full run shows; the other configs' figures are benchmarks
    (README's configs table). Measured on full MNIST (seed, convolutions: test accuracy):
    seed_keras 98.34% (seed 0); cnn_mnist_best 99.61% (seed 0, oneDNN), the runs of
    README's configs table: its target has a margin of one or two test images."""
    config = load_config(name)
    config.data_dir = shared_tfds
    results = loop.train_and_evaluate(config, str(tmp_path))
    print(name, json.dumps(results))
    assert results["num_test_examples"] == 10_000
    assert results["test_accuracy"] >= target
