"""The whitened first layer: its kernel whitens the data's patches, is fitted once from the
training images as the model sees them, and no optimizer step moves it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn import default_config
from flaxcnn.data import input_pipeline, preprocess
from flaxcnn.models import whitening
from flaxcnn.models.whitening import PatchWhitening, fit_whitening, whitening_kernel
from flaxcnn.tasks import classification


def correlated_images(n=200, size=12, channels=3, seed=0) -> np.ndarray:
    """Smooth colour images: neighbouring pixels and channels strongly correlated."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(n, size + 2, size + 2, 1))
    smooth = sum(noise[:, i : i + size, j : j + size] for i in range(3) for j in range(3))
    mixing = rng.normal(size=(1, channels)) + 1.0
    return (smooth * mixing + 0.3 * rng.normal(size=(n, size, size, channels))).astype(np.float32)


def patches_of(images, size):
    windows = np.lib.stride_tricks.sliding_window_view(images, (size, size), axis=(1, 2))
    return windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, size * size * images.shape[-1])


def test_the_kernel_whitens_the_patches():
    images = correlated_images()
    kernel = whitening_kernel(images, 2, 24, eps=1e-8)
    components = patches_of(images, 2) @ kernel.reshape(12, 24)
    covariance = np.cov(components[:, :12], rowvar=False)
    np.testing.assert_allclose(covariance, np.eye(12), atol=1e-3)
    # The second half is the first's negatives, exactly in the kernel (a product with the
    # patches may round differently by half, with the CPU's matrix kernels).
    flat = kernel.reshape(12, 24)
    np.testing.assert_array_equal(flat[:, 12:], -flat[:, :12])
    correlation = np.corrcoef(patches_of(images, 2), rowvar=False)
    assert np.abs(correlation - np.eye(12)).max() > 0.5  # Far from white before.


def test_the_layer_convolves_its_patches_by_the_kernel():
    images = jnp.asarray(correlated_images(4))
    layer = PatchWhitening(8)
    variables = layer.init(jax.random.key(0), images)
    kernel = variables["batch_stats"][whitening.KERNEL]
    expected = patches_of(np.asarray(images), 2) @ np.asarray(kernel).reshape(12, 8)
    output = layer.apply(variables, images)
    np.testing.assert_allclose(np.asarray(output).reshape(-1, 8), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="even and at most 24"):
        PatchWhitening(26).init(jax.random.key(0), images)


def test_fitting_sets_only_whitening_kernels_of_first_layers():
    images = correlated_images(50)
    stats = {"a": {whitening.KERNEL: jnp.zeros((2, 2, 3, 8))}, "b": {"mean": jnp.ones(3)}}
    fitted = fit_whitening(stats, images)
    np.testing.assert_allclose(fitted["a"][whitening.KERNEL], whitening_kernel(images, 2, 8))
    np.testing.assert_array_equal(fitted["b"]["mean"], stats["b"]["mean"])
    with pytest.raises(ValueError, match="must be a first layer"):
        fit_whitening({"a": {whitening.KERNEL: jnp.zeros((2, 2, 5, 8))}}, images)


def whitened_config():
    config = default_config.get_config()
    config.model = "FastResNet"
    config.model_kwargs.update(stem=8, widths=(8, 8, 8), residual=(0, 0, 0), whiten=True)
    config.optimizer = "sgd"
    config.learning_rate = 0.5
    config.l2 = 0.1
    config.normalize = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    return config


def test_the_task_fits_the_kernel_to_normalised_images_and_steps_never_move_it():
    config = whitened_config()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), np.uint8)
    split = input_pipeline.Split(images, rng.integers(0, 10, 64).astype(np.int32), 10)
    state = classification.create_state(config, jax.random.key(0), (32, 32, 3), 10, 10)
    fitted = classification.fit_to_data(state, config, split)
    kernel = fitted.batch_stats["PatchWhitening_0"][whitening.KERNEL]
    normalised = preprocess.to_model_input(images, *config.normalize)
    np.testing.assert_allclose(kernel, whitening_kernel(normalised, 2, 8), rtol=1e-6)
    batch = {"image": images[:16], "label": split.labels[:16]}
    step = jax.jit(classification.train_step)
    stepped, _ = step(fitted, batch, jax.random.key(1))
    stepped, _ = step(stepped, batch, jax.random.key(2))
    np.testing.assert_array_equal(stepped.batch_stats["PatchWhitening_0"][whitening.KERNEL], kernel)
    bias = "PatchWhitening_0"
    assert not np.array_equal(stepped.params[bias]["bias"], fitted.params[bias]["bias"])


def test_models_without_whitening_are_left_alone():
    config = default_config.get_config()
    state = classification.create_state(config, jax.random.key(0), (28, 28, 1), 10, 10)
    assert classification.fit_to_data(state, config, object()) is state


def test_a_streamed_split_gives_the_kernel_of_the_same_split_in_memory(tmp_path, monkeypatch):
    from PIL import Image

    from flaxcnn.data import sources

    monkeypatch.setenv("FLAXCNN_SPLIT_CACHE", "off")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (32, 32, 3), np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / label / f"{i}.png")
    name = f"folder:{tmp_path}"
    config = whitened_config()
    state = classification.create_state(config, jax.random.key(0), (32, 32, 3), 2, 10)
    kernels = [
        classification.fit_to_data(state, config, split).batch_stats["PatchWhitening_0"]
        for split in (input_pipeline.load_split(name, "train"), sources.open_split(name, "train"))
    ]
    np.testing.assert_allclose(kernels[0][whitening.KERNEL], kernels[1][whitening.KERNEL])
    assert not np.allclose(
        kernels[0][whitening.KERNEL], state.batch_stats["PatchWhitening_0"][whitening.KERNEL]
    )
