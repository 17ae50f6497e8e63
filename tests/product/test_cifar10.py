"""CIFAR-10: the recipes' configs, tfds `cifar10` through the pipeline offline (tfds's own
mock data), and a short run on the JPEG copy that must learn (slow suite)."""

import importlib.util
import os
import pathlib
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from flaxcnn.data import input_pipeline
from flaxcnn.runner import loop

REPO = pathlib.Path(__file__).resolve().parents[2]
JPEG_COPY = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def shrunk(config, **overrides):
    """`config` cut to a few quick steps of a narrow net, its recipe otherwise kept."""
    config.model_kwargs.stem = 8
    config.model_kwargs.widths = (8, 16, 16)
    config.batch_size = 16
    config.num_train_steps = 3
    config.log_every_steps = 1
    config.steps_per_dispatch = 1
    config.update(overrides)
    return config


def test_fast_recipe_uses_the_speed_records_settings():
    config = recipe("cifar10_fast")
    assert config.model == "FastResNet" and config.optimizer == "sgd"
    assert dict(config.optimizer_kwargs) == {"momentum": 0.9, "nesterov": True}
    assert config.label_smoothing == 0.2 and config.test_time_augment.flip
    assert config.augment.crop == 4 and config.augment.flip_horizontal
    assert config.normalize == "dataset" and config.lr_schedule == "onecycle"
    assert config.model_kwargs.whiten and config.model_kwargs.dirac  # airbench's init.
    assert config.test_time_augment.shift == 1 and config.compute_dtype == "bfloat16"


def test_best_recipe_is_the_fast_one_wider_longer_and_averaged():
    fast, best = recipe("cifar10_fast"), recipe("cifar10_best")
    assert best.num_epochs > fast.num_epochs and best.ema_decay == 0.999
    assert best.model_kwargs.widths > fast.model_kwargs.widths
    assert best.label_smoothing == fast.label_smoothing and best.optimizer == fast.optimizer


def test_tfds_cifar10_trains_offline_under_tfds_mock_data(tmp_path, monkeypatch):
    """`--config.dataset=cifar10` as a user without the prepared data sees it: tfds's mock
    examples of the real builder's features (32x32x3, 10 classes) through the whole run of
    `cifar10_fast` (`cifar10_best` reads its data alike: the test above)."""
    monkeypatch.setattr(input_pipeline, "_network_reachable", lambda: True)
    monkeypatch.setenv("FLAXCNN_SPLIT_CACHE", "off")  # Mock pixels must not be cached.
    config = shrunk(recipe("cifar10_fast"))
    assert config.dataset == "cifar10"
    with tfds.testing.mock_data(num_examples=64):
        results = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["steps"] == 3 and results["num_test_examples"] == 64
    assert np.isfinite(results["test_loss"])
    with open(tmp_path / "run" / "config.json") as f:
        assert '"cifar10"' in f.read()


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> str:
    """The JPEG copy unpacked; skipped without it, except under CI."""
    if not JPEG_COPY.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CIFAR-10 JPEG copy not found at {JPEG_COPY} (required when CI is set)")
        pytest.skip(f"CIFAR-10 JPEG copy not found at {JPEG_COPY}")
    root = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(JPEG_COPY) as archive:
        archive.extractall(root, filter="data")
    return f"folder:{root}"


@pytest.mark.slow
def test_short_run_on_the_jpeg_copy_learns(cifar_folder, tmp_path):
    """300 steps of 64 images of a narrow FastResNet on CIFAR-10 (JPEG q75 copy), the fast
    recipe's settings otherwise: well above chance (10%) on 2,000 test images."""
    config = shrunk(
        recipe("cifar10_fast"),
        dataset=cifar_folder,
        batch_size=64,
        num_train_steps=300,
        log_every_steps=100,
        train_split="train[:40%]",
        validation_split="train[98%:]",
        test_split="test[:2000]",
    )
    config.model_kwargs.widths = (16, 32, 64)
    results = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["test_accuracy"] > 0.45, results["test_accuracy"]


def test_the_recipes_sgd_is_nesterov_momentum_on_the_one_cycle_schedule():
    import jax.numpy as jnp
    import optax

    from flaxcnn.training.state import create_optimizer

    config = recipe("cifar10_fast")
    params = {"w": jnp.zeros(3)}

    def updates(tx):
        state, out = tx.init(params), []
        for step in range(3):
            update, state = tx.update({"w": jnp.full(3, step + 1.0)}, state, params)
            out.append(update["w"])
        return np.stack(out)

    schedule = optax.cosine_onecycle_schedule(10, 0.4, pct_start=0.3)
    want = updates(optax.sgd(schedule, momentum=0.9, nesterov=True))
    np.testing.assert_allclose(updates(create_optimizer(config, 10)), want, rtol=1e-6)
    heavy_ball = updates(optax.sgd(schedule, momentum=0.9))
    assert not np.allclose(want, heavy_ball)  # Nesterov's look-ahead is what is compared.
