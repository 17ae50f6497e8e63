"""Test-time augmentation: the views, the wrapper's shared parameters, and its wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn import config as config_lib
from flaxcnn.models.cnn import CNN
from flaxcnn.models.test_time import ViewAveraged, views
from flaxcnn.tasks import classification


def images(n: int = 3) -> jax.Array:
    return jax.random.uniform(jax.random.key(0), (n, 8, 8, 1))


def test_views_are_the_image_its_mirror_and_their_shifted_copies():
    x = images()
    out = views(x, flip=True, shift=1)
    assert len(out) == 10 and all(v.shape == x.shape for v in out)
    np.testing.assert_array_equal(out[0], x)
    np.testing.assert_array_equal(out[1], x[:, :, ::-1])
    # Shifted down by one row: the first row is zeros, the rest is the image's top.
    np.testing.assert_array_equal(out[2][:, 0], 0.0)
    np.testing.assert_array_equal(out[2][:, 1:], x[:, :-1])
    # Shifted left by one column.
    np.testing.assert_array_equal(out[5][:, :, :-1], x[:, :, 1:])
    np.testing.assert_array_equal(out[5][:, :, -1], 0.0)
    assert len(views(x, flip=False, shift=0)) == 1
    assert len(views(x, flip=False, shift=2)) == 5


def test_wrapper_keeps_the_classifiers_variables_and_training_call():
    model = CNN(widths=(4,), dropout_rate=0.0)
    wrapped = ViewAveraged(model, flip=True, shift=1)
    x = images()
    variables = model.init(jax.random.key(1), x)
    assert jax.tree.structure(wrapped.init(jax.random.key(1), x)) == jax.tree.structure(variables)
    train = {"mutable": ["batch_stats"]}
    np.testing.assert_array_equal(
        wrapped.apply(variables, x, train=True, **train)[0],
        model.apply(variables, x, train=True, **train)[0],
    )
    # Evaluation is the mean of the classifier's logits over the views.
    expected = jnp.mean(jnp.stack([model.apply(variables, v) for v in views(x, True, 1)]), 0)
    np.testing.assert_allclose(wrapped.apply(variables, x), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(wrapped.apply(variables, x), model.apply(variables, x))


def test_flip_views_make_evaluation_mirror_invariant():
    model = ViewAveraged(CNN(widths=(4,), dropout_rate=0.0), flip=True, shift=1)
    x = images()
    variables = model.init(jax.random.key(2), x)
    np.testing.assert_allclose(
        model.apply(variables, x), model.apply(variables, x[:, :, ::-1]), rtol=1e-5, atol=1e-6
    )


def test_the_classification_task_wraps_its_model_when_views_are_set(data_dir, tiny_config):
    config = tiny_config()
    state = classification.create_state(config, jax.random.key(0), (28, 28, 1), 10, 8)
    assert not isinstance(state.apply_fn.__self__, ViewAveraged)
    config.test_time_augment.shift = 1
    state = classification.create_state(config, jax.random.key(0), (28, 28, 1), 10, 8)
    assert isinstance(state.apply_fn.__self__, ViewAveraged)
    assert state.apply_fn.__self__.shift == 1 and not state.apply_fn.__self__.flip


def test_a_negative_shift_is_a_one_line_error(data_dir, tiny_config):
    config = tiny_config()
    config.test_time_augment.shift = -1
    with pytest.raises(ValueError, match=r"^config.test_time_augment.shift must be >= 0, got -1$"):
        config_lib.validate(config)


def test_other_tasks_refuse_test_time_views(data_dir, tiny_config):
    config = tiny_config()
    config.task, config.model = "autoencoder", "ConvAutoencoder"
    config.test_time_augment.flip = True
    with pytest.raises(ValueError, match="applies to classification, not the autoencoder"):
        config_lib.validate(config)
