"""Optimisation settings: schedules, clipping, validation, and the parameters' moving average."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from flaxcnn import default_config
from flaxcnn.training.checkpointing import Checkpointer
from flaxcnn.training.state import (
    SCHEDULES,
    create_optimizer,
    create_train_state,
    validate_optimization,
)


class Tiny(nn.Module):
    """A linear layer and a batch-statistics variable: everything TrainState carries."""

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        count = self.variable("batch_stats", "count", jnp.zeros, ())
        if train:
            count.value += 1
        return nn.Dense(2)(x)


def config_with(**settings):
    config = default_config.get_config()
    config.update(settings)
    return config


def tiny_state(tx=None, ema_decay=0.0):
    return create_train_state(Tiny(), tx or optax.sgd(0.1), jax.random.key(0), (2, 2, 1), ema_decay)


def learning_rates(config, total_steps, steps):
    """The learning rate of `create_optimizer` at `steps`, read off SGD updates of gradient 1."""
    tx = create_optimizer(config_with(optimizer="sgd", **config), total_steps)
    params = jnp.zeros(())
    opt_state = tx.init(params)
    rates = {}
    for step in range(max(steps) + 1):
        updates, opt_state = tx.update(jnp.ones(()), opt_state, params)
        if step in steps:
            rates[step] = -float(updates)
    return [rates[step] for step in steps]


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"lr_schedule": "constant"}, [1.0, 1.0, 1.0]),
        ({"lr_schedule": "cosine"}, [1.0, 0.5, 0.0]),
        # Warm-up over 10 steps, then a cosine over the remaining 90: halfway at step 55.
        ({"lr_schedule": "warmup_cosine", "warmup_steps": 10}, [0.0, 0.5, 0.0]),
        ({"lr_schedule": "onecycle", "warmup_steps": 30}, [1 / 25, 0.5 * (1 + 1 / 25), 4e-6]),
    ],
)
def test_schedules_at_start_middle_and_end(settings, expected):
    middle = {"warmup_cosine": 55, "onecycle": 15}.get(settings["lr_schedule"], 50)
    rates = learning_rates({"learning_rate": 1.0, **settings}, 100, [0, middle, 100])
    np.testing.assert_allclose(rates, expected, atol=1e-5)


def test_warmup_reaches_the_peak_at_the_end_of_the_warmup():
    for name in ("warmup_cosine", "onecycle"):
        rates = learning_rates({"lr_schedule": name, "warmup_steps": 20}, 100, [5, 20, 21])
        assert rates[0] < rates[1] and rates[1] == pytest.approx(1e-3)
        assert rates[2] < rates[1]


@pytest.mark.parametrize("name, fraction", [("warmup_cosine", 0.05), ("onecycle", 0.3)])
def test_warmup_steps_zero_takes_the_schedules_default(name, fraction):
    schedule = SCHEDULES[name](1.0, 200, 0)
    peak = round(fraction * 200)
    assert float(schedule(peak)) == pytest.approx(1.0)
    assert float(schedule(peak // 2)) < 1.0 and float(schedule(peak + 10)) < 1.0


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="constant, cosine, onecycle, warmup_cosine"):
        create_optimizer(config_with(lr_schedule="linear"), 100)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"ema_decay": -0.1}, "config.ema_decay must be >= 0"),
        ({"ema_decay": 1.0}, "config.ema_decay must be < 1"),
        ({"weight_decay": -1e-4, "optimizer": "adamw"}, "config.weight_decay must be >= 0"),
        ({"l2": -1.0}, "config.l2 must be >= 0"),
        ({"l2": float("nan")}, "config.l2 must be >= 0"),
        ({"grad_clip_norm": -1.0}, "config.grad_clip_norm must be >= 0"),
        ({"warmup_steps": -5}, "config.warmup_steps must be >= 0"),
        ({"weight_decay": 1e-4}, "needs optimizer 'adamw'"),
        ({"warmup_steps": 10}, "warmup_steps is used only by"),
        ({"optimizer": "adagradd"}, "unknown optimizer 'adagradd'; valid: adam, adamw, sgd"),
        ({"compute_dtype": "float64"}, "unknown compute_dtype"),
    ],
)
def test_bad_settings_raise_value_error(settings, message):
    with pytest.raises(ValueError, match=message):
        validate_optimization(config_with(**settings))
    with pytest.raises(ValueError, match=message):
        create_optimizer(config_with(**settings), 100)


def test_default_settings_are_valid_and_warmup_must_fit_the_run():
    validate_optimization(default_config.get_config())
    with pytest.raises(ValueError, match="less than the 50 training steps"):
        create_optimizer(config_with(lr_schedule="warmup_cosine", warmup_steps=50), 50)


def test_clipping_limits_the_global_norm_of_the_update():
    tx = create_optimizer(config_with(optimizer="sgd", learning_rate=1.0, grad_clip_norm=2.0), 10)
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    big = {"a": jnp.full(3, 10.0), "b": jnp.full((2, 2), -10.0)}
    small = jax.tree.map(lambda g: g / 100, big)  # Global norm 0.26: left alone.
    updates, _ = tx.update(big, tx.init(params), params)
    assert float(optax.global_norm(updates)) == pytest.approx(2.0, rel=1e-5)
    np.testing.assert_allclose(updates["a"] / updates["a"][0], 1.0)  # Direction kept.
    updates, _ = tx.update(small, tx.init(params), params)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(small)):
        np.testing.assert_allclose(u, -g, rtol=1e-6)


def test_clipping_off_keeps_the_plain_optimizer_state():
    params = jnp.zeros(3)
    plain = create_optimizer(config_with(), 10).init(params)
    # Plain Adam's state, so that a checkpoint of an optimizer without clipping restores.
    before = optax.adam(optax.constant_schedule(1e-3)).init(params)
    assert jax.tree.structure(plain) == jax.tree.structure(before)


def test_ema_follows_the_formula_with_its_warmup():
    state = tiny_state(ema_decay=0.9)
    init = state.params
    grads = [jax.tree.map(lambda p, s=s: jnp.full_like(p, s), init) for s in (1.0, -2.0)]
    state1 = state.apply_gradients(grads=grads[0])
    state2 = state1.apply_gradients(grads=grads[1])
    d0, d1 = min(0.9, 1 / 10), min(0.9, 2 / 11)
    for path in (("Dense_0", "kernel"), ("Dense_0", "bias")):
        p0 = init[path[0]][path[1]]
        p1, p2 = p0 - 0.1 * 1.0, p0 - 0.1 * 1.0 + 0.1 * 2.0
        ema1 = d0 * p0 + (1 - d0) * p1
        ema2 = d1 * ema1 + (1 - d1) * p2
        np.testing.assert_allclose(state1.ema_params[path[0]][path[1]], ema1, rtol=1e-6)
        np.testing.assert_allclose(state2.ema_params[path[0]][path[1]], ema2, rtol=1e-6)
        np.testing.assert_allclose(state2.params[path[0]][path[1]], p2, rtol=1e-6)


def test_ema_decay_reaches_its_setting_after_the_warmup():
    state = tiny_state(ema_decay=0.5).replace(step=jnp.asarray(1000))
    zero = jax.tree.map(jnp.zeros_like, state.params)
    moved = state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))
    new = moved.apply_gradients(grads=zero)
    expected = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, state.ema_params, moved.params)
    for a, b in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_eval_variables_use_the_ema_and_keep_batch_stats():
    state = tiny_state(ema_decay=0.9)
    grads = jax.tree.map(jnp.ones_like, state.params)
    state = state.apply_gradients(grads=grads)
    eval_vars, train_vars = state.eval_variables(), state.variables()
    assert eval_vars["params"] is state.ema_params and train_vars["params"] is state.params
    assert eval_vars["batch_stats"] is state.batch_stats
    x = jnp.ones((1, 2, 2, 1))
    assert float(jnp.max(jnp.abs(state.apply_fn(eval_vars, x) - state.apply_fn(train_vars, x))))


def test_ema_off_is_the_existing_state():
    state = create_train_state(Tiny(), optax.sgd(0.1), jax.random.key(0), (2, 2, 1))
    assert state.ema_decay == 0.0 and state.ema_params == {}
    state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, state.params))
    assert state.ema_params == {}
    assert state.eval_variables()["params"] is state.params
    assert set(state.variables()) == {"params", "batch_stats"}


@pytest.mark.parametrize("decay", [-0.5, 1.0])
def test_bad_ema_decay_raises_value_error(decay):
    with pytest.raises(ValueError, match="ema_decay must be in"):
        tiny_state(ema_decay=decay)


@pytest.mark.parametrize("ema_decay", [0.0, 0.99])
def test_state_is_a_pytree_that_jits_and_donates(ema_decay):
    state = tiny_state(create_optimizer(config_with(grad_clip_norm=1.0), 10), ema_decay)
    num_params, num_opt = len(jax.tree.leaves(state.params)), len(jax.tree.leaves(state.opt_state))
    # step, params, opt_state, one batch statistic, and the moving average when it is on.
    expected = 1 + num_params + num_opt + 1 + (num_params if ema_decay else 0)
    assert len(jax.tree.leaves(state)) == expected

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, grads):
        return state.apply_gradients(grads=grads)

    grads = jax.tree.map(jnp.ones_like, state.params)
    eager = state.apply_gradients(grads=grads)
    jitted = step(
        tiny_state(create_optimizer(config_with(grad_clip_norm=1.0), 10), ema_decay), grads
    )
    assert jitted.ema_decay == ema_decay and int(jitted.step) == 1
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_checkpoint_round_trip_keeps_the_moving_average(tmp_path):
    state = tiny_state(ema_decay=0.9)
    state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, state.params))
    checkpointer = Checkpointer(str(tmp_path), max_to_keep=1)
    checkpointer.save(state)
    checkpointer.close()
    restored = Checkpointer(str(tmp_path), max_to_keep=1).restore_or(tiny_state(ema_decay=0.9))
    assert int(restored.step) == 1 and restored.ema_decay == 0.9
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(a, b)


def test_lr_multipliers_scale_their_groups_and_zero_freezes():
    config = config_with(
        optimizer="sgd", lr_multipliers=(("*/bias", 64.0), ("frozen/*", 0.0), ("*", 2.0))
    )
    params = {"layer": {"bias": jnp.ones(2), "kernel": jnp.ones(2)}, "frozen": {"w": jnp.ones(2)}}
    tx = create_optimizer(config, 10)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    lr = config.learning_rate
    np.testing.assert_allclose(updates["layer"]["bias"], -64 * lr)
    np.testing.assert_allclose(updates["layer"]["kernel"], -2 * lr)  # The first match wins.
    np.testing.assert_array_equal(updates["frozen"]["w"], 0.0)


@pytest.mark.parametrize(
    "multipliers, message",
    [
        ((("*/beta", 2.0),), "pattern '\\*/beta' matches no parameter"),
        ((("*", -1.0),), "factors must be >= 0"),
        (("*",), "holds \\(pattern, factor\\) pairs"),
    ],
)
def test_bad_lr_multipliers_are_one_line_errors(multipliers, message):
    params = {"layer": {"bias": jnp.ones(2)}}
    with pytest.raises(ValueError, match=message):
        create_optimizer(config_with(lr_multipliers=multipliers), 10).init(params)
