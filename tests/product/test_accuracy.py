"""Accuracy on the full 10,000-image MNIST test split (slow: run with `pytest -m slow`)."""

import importlib.util
import json
import pathlib

import pytest

from flaxcnn.runner import loop

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.slow
@pytest.mark.full_training
@pytest.mark.parametrize("name, target", [("seed_keras", 0.983), ("cnn_mnist_best", 0.996)])
def test_config_reaches_its_accuracy(name, target, shared_tfds, tmp_path):
    """The targets that only a full run shows; the other configs' figures are benchmarks
    (README's configs table). Measured on full MNIST: seed_keras 98.34% (seed 0), a margin
    of 4 test images. cnn_mnist_best, seeds 0, 1, 2 on a 2-core Intel VM (AVX-512): 99.62,
    99.64 and 99.73% with oneDNN's convolutions, 99.63, 99.66 and 99.67% with XLA's: mean
    99.66%, range 99.62-99.73%; on a 2-core AMD EPYC VM (AVX2 only): 99.64, 99.70 and 99.70%
    (oneDNN), 99.60, 99.68 and 99.67% (XLA): mean 99.67%. This test's run (seed 0,
    oneDNN where it loads) clears the target by 2 to 4 test images, by none with XLA's
    convolutions on AVX2; the seed-to-seed spread is about 3."""
    config = load_config(name)
    config.data_dir = shared_tfds
    results = loop.train_and_evaluate(config, str(tmp_path))
    print(name, json.dumps(results))
    assert results["num_test_examples"] == 10_000
    assert results["test_accuracy"] >= target
