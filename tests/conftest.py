"""Shared fixtures: the embedded dataset prepared once, and the optional real-MNIST folder."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_TFDS = REPO.parent / "shared" / "data" / "tfds"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A tfds data_dir holding the embedded dataset, prepared offline."""
    from flaxcnn.data import input_pipeline

    path = str(tmp_path_factory.mktemp("tfds"))
    input_pipeline.get_builder(input_pipeline.EMBEDDED, path)
    return path


@pytest.fixture(scope="session")
def shared_tfds() -> str:
    """The prepared real-MNIST tfds folder beside the repo; tests using it skip without it."""
    if not (SHARED_TFDS / "mnist").is_dir():
        pytest.skip(f"real MNIST not found at {SHARED_TFDS}")
    return str(SHARED_TFDS)


def tiny_config(data_dir: str, **overrides):
    """The default config shrunk to a few steps, for end-to-end tests."""
    from flaxcnn import default_config

    config = default_config.get_config()
    config.data_dir = data_dir
    config.num_train_steps = 8
    config.eval_batch_size = 500
    config.log_every_steps = 4
    config.update(overrides)
    return config


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
