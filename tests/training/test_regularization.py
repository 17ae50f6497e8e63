"""L2 penalty, decoupled weight decay, dropout and batch norm in training versus evaluation,
and bfloat16 compute."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxcnn import default_config
from flaxcnn.models import create_model
from flaxcnn.tasks import classification
from flaxcnn.training.regularization import add_l2_gradient, decay_mask, l2_penalty
from flaxcnn.training.state import TrainState, create_optimizer, model_kwargs

PARAMS = {
    "Conv_0": {"kernel": jnp.arange(8.0).reshape(2, 2, 1, 2), "bias": jnp.array([5.0, -7.0])},
    "BatchNorm_0": {"scale": jnp.array([2.0, 3.0]), "bias": jnp.array([1.0, 1.0])},
    "Dense_0": {"kernel": jnp.array([[1.0, -2.0], [0.5, 0.0]]), "bias": jnp.array([9.0, 9.0])},
}


def random_variables(model, input_shape=(28, 28, 1), seed=0):
    """Variables shaped as `model.init` makes them, filled from numpy: `model.init` itself
    compiles for many seconds on a busy CPU (the threefry draws of every initializer)."""
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), dummy)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if leaf.ndim == 1:  # Biases, offsets, means.
            return jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype)
        fan_in = np.prod(leaf.shape[:-1])
        return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape), leaf.dtype)

    return shapes, jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def cnn_and_variables():
    model = create_model("CNN", widths=(4, 8))
    return model, random_variables(model)[1]


def images(batch=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((batch, 28, 28, 1), np.float32))


def test_l2_penalty_is_half_the_sum_of_squared_kernels():
    # Kernels only: 0^2 + ... + 7^2 = 140, and 1 + 4 + 0.25 + 0 = 5.25; biases and BN excluded.
    assert float(l2_penalty(PARAMS)) == pytest.approx(0.5 * (140 + 5.25))


def test_l2_penalty_of_a_model_counts_every_kernel_once():
    _, variables = cnn_and_variables()
    kernels = [p for p in jax.tree.leaves(variables["params"]) if p.ndim > 1]
    assert len(kernels) == 5  # Four convolutions and the dense layer.
    expected = 0.5 * sum(float(np.sum(np.square(k))) for k in kernels)
    assert float(l2_penalty(variables["params"])) == pytest.approx(expected, rel=1e-5)


def test_decay_mask_selects_kernels():
    mask = decay_mask(PARAMS)
    assert mask["Conv_0"] == {"kernel": True, "bias": False}
    assert mask["BatchNorm_0"] == {"scale": False, "bias": False}
    assert mask["Dense_0"] == {"kernel": True, "bias": False}


def test_l2_gradient_equals_the_gradient_of_the_penalty():
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    combined = add_l2_gradient(grads, PARAMS, 0.01)
    expected = jax.tree.map(jnp.add, grads, jax.grad(lambda p: 0.01 * l2_penalty(p))(PARAMS))
    for a, b in zip(jax.tree.leaves(combined), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_array_equal(combined["Conv_0"]["bias"], 1.0)
    assert add_l2_gradient(grads, PARAMS, 0.0) is grads


def test_adamw_shrinks_kernels_by_lr_times_weight_decay_and_spares_the_rest():
    config = default_config.get_config()
    config.optimizer, config.learning_rate, config.weight_decay = "adamw", 0.1, 0.5
    tx = create_optimizer(config, total_steps=10)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    new = optax.apply_updates(PARAMS, updates)
    for layer in ("Conv_0", "Dense_0"):
        np.testing.assert_allclose(
            new[layer]["kernel"], PARAMS[layer]["kernel"] * (1 - 0.1 * 0.5), rtol=1e-6
        )
    for layer, name in [("Conv_0", "bias"), ("BatchNorm_0", "scale"), ("BatchNorm_0", "bias")]:
        np.testing.assert_array_equal(new[layer][name], PARAMS[layer][name])


def test_adamw_without_weight_decay_is_adam():
    config = default_config.get_config()
    config.optimizer = "adamw"
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), PARAMS)
    adamw = create_optimizer(config, 10)
    config.optimizer = "adam"
    adam = create_optimizer(config, 10)
    a, _ = adamw.update(grads, adamw.init(PARAMS), PARAMS)
    b, _ = adam.update(grads, adam.init(PARAMS), PARAMS)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6)


def test_dropout_is_off_in_evaluation_and_on_in_training():
    model, variables = cnn_and_variables()

    @functools.partial(jax.jit, static_argnums=0)
    def apply(train, rng):
        out = model.apply(
            variables,
            images(),
            train=train,
            rngs={"dropout": rng},
            mutable=["batch_stats"] if train else False,
        )
        return out[0] if train else out

    np.testing.assert_array_equal(apply(False, jax.random.key(1)), apply(False, jax.random.key(2)))
    train_a, train_b = apply(True, jax.random.key(1)), apply(True, jax.random.key(2))
    assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-3


def test_batch_statistics_update_in_training_only():
    model, variables = cnn_and_variables()
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    _, trained = apply(
        variables, images(), train=True, rngs={"dropout": jax.random.key(0)}, mutable="batch_stats"
    )
    _, evaluated = apply(variables, images(), train=False, mutable="batch_stats")
    before = jax.tree.leaves(variables["batch_stats"])
    changes = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(trained), before)]
    assert len(changes) == 8 and min(changes) > 1e-4  # Mean and variance of 4 norms.
    for a, b in zip(jax.tree.leaves(evaluated), before):
        np.testing.assert_array_equal(a, b)


# Mixed precision.


def config_for(model="CNN", compute_dtype="bfloat16"):
    config = default_config.get_config()
    config.model, config.compute_dtype = model, compute_dtype
    config.model_kwargs.widths = (4, 8)
    return config


def test_compute_dtype_maps_to_the_model_dtype():
    assert model_kwargs(config_for()) == {"widths": (4, 8), "dtype": jnp.bfloat16}
    assert model_kwargs(config_for(compute_dtype="float32")) == {"widths": (4, 8)}


@pytest.mark.parametrize(
    "config, message",
    [
        (config_for(compute_dtype="float16"), "unknown compute_dtype 'float16'; valid:"),
        (config_for(model="RNN"), "RNN has none"),
    ],
)
def test_bad_compute_dtype_settings_raise_value_error(config, message):
    with pytest.raises(ValueError, match=message):
        model_kwargs(config)


def test_bfloat16_keeps_float32_params_and_logits_close_to_float32():
    _, variables = cnn_and_variables()
    bf16 = create_model("CNN", **model_kwargs(config_for()))
    f32 = create_model("CNN", **model_kwargs(config_for(compute_dtype="float32")))
    shapes, _ = random_variables(bf16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
    logits = jax.jit(functools.partial(bf16.apply, train=False))(variables, images())
    reference = jax.jit(functools.partial(f32.apply, train=False))(variables, images())
    assert logits.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(logits - reference))) > 0  # Really computed in bfloat16.
    np.testing.assert_allclose(logits, reference, atol=0.05 * float(jnp.max(jnp.abs(reference))))


@pytest.mark.slow
def test_bfloat16_train_step_gives_a_finite_loss_and_float32_state():
    model = create_model("CNN", **model_kwargs(config_for()))
    _, variables = cnn_and_variables()
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.adam(1e-3),
        batch_stats=variables["batch_stats"],
    )
    batch = {"image": images(16), "label": jnp.arange(16, dtype=jnp.int32) % 10}
    new_state, metrics = jax.jit(classification.train_step)(state, batch, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"])) and metrics["loss"].dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new_state.params))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new_state.batch_stats))
    assert (
        float(
            jnp.max(
                jnp.abs(new_state.params["Dense_0"]["kernel"] - state.params["Dense_0"]["kernel"])
            )
        )
        > 0
    )
