"""flaxcnn.cpu.rewrite: a user's plain flax.linen model computed with the CPU rewrite,
and compiled with its compiler options, gives the standard layers' outputs, gradients and
batch statistics."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from flaxcnn.cpu import rewrite as cpu_rewrite
from flaxcnn.training import state as state_lib

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs", "user_cnn.py"
)


def user_cnn(**kwargs) -> nn.Module:
    spec = importlib.util.spec_from_file_location("user_cnn_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.UserCNN(**kwargs)


def max_abs_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max((float(jnp.max(jnp.abs(x - y))) for x, y in pairs), default=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("batch_norm", [False, True])
def test_user_model_trains_identically_through_the_rewrite(batch_norm):
    model = user_cnn(widths=(4, 6), batch_norm=batch_norm)
    x = jax.random.uniform(jax.random.key(0), (6, 12, 11, 1))
    labels = jnp.arange(6) % 10
    variables = model.init(jax.random.key(1), x)

    def loss(params, apply):
        logits, updates = apply(
            {**variables, "params": params},
            x,
            train=True,
            rngs={"dropout": jax.random.key(2)},
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    def run(apply):
        return jax.jit(jax.value_and_grad(lambda p: loss(p, apply), has_aux=True))(
            variables["params"]
        )

    (want, want_updates), want_grads = run(model.apply)
    (got, got_updates), got_grads = run(cpu_rewrite.rewrite(model.apply))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert max_abs_diff(got_grads, want_grads) < 1e-5
    assert max_abs_diff(got_updates, want_updates) < 1e-6  # Batch statistics, dropout alike.
    compiled = jax.jit(jax.grad(lambda p: loss(p, cpu_rewrite.rewrite(model.apply))[0]))
    hlo = compiled.lower(variables["params"]).compile().as_text()
    assert "reduce-window" not in hlo and "select-and-scatter" not in hlo  # Rewritten.


@pytest.mark.parametrize(
    "shape, window",
    [
        pytest.param((2, 6, 6, 3), (1, 2, 2, 1), marks=pytest.mark.slow),
        ((2, 7, 9, 2), (1, 2, 2, 1)),
        ((1, 9, 6, 2), (1, 3, 3, 1)),
    ],
)
def test_block_max_pool_is_reduce_window_with_its_gradient_on_ties(shape, window):
    # Integers in a small range tie often: the gradient must go to the first maximum only.
    x = jax.random.randint(jax.random.key(0), shape, 0, 3).astype(jnp.float32)
    weights = jax.random.normal(jax.random.key(1), tuple(d // w for d, w in zip(shape, window)))

    def standard(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, window, "VALID")

    np.testing.assert_array_equal(cpu_rewrite.max_pool_blocks(x, window), standard(x))
    got = jax.grad(lambda x: jnp.sum(cpu_rewrite.max_pool_blocks(x, window) * weights))(x)
    want = jax.grad(lambda x: jnp.sum(standard(x) * weights))(x)
    np.testing.assert_array_equal(got, want)


def test_pools_and_convolutions_it_does_not_cover_stay_standard():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))

    def overlapping(x):
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")

    rewritten = cpu_rewrite.rewrite(overlapping)
    np.testing.assert_array_equal(rewritten(x), overlapping(x))
    assert "reduce_window_max" in str(jax.make_jaxpr(overlapping)(x))
    grads = jax.grad(lambda x: jnp.sum(rewritten(x) ** 2))(x)
    np.testing.assert_allclose(grads, jax.grad(lambda x: jnp.sum(overlapping(x) ** 2))(x))


@pytest.mark.slow
def test_rewrite_keeps_structured_outputs_static_arguments_and_equality():
    model = user_cnn(widths=(2,), batch_norm=True)
    x = jnp.ones((2, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    rewritten = cpu_rewrite.rewrite(model.apply)
    rngs = {"dropout": jax.random.key(1)}
    out, updates = rewritten(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
    assert out.shape == (2, 10) and set(updates) == {"batch_stats"}
    # Equal wrappers of one function: a TrainState holding one keeps hitting jit's cache.
    assert rewritten == cpu_rewrite.rewrite(model.apply) and hash(rewritten) == hash(model.apply)
    assert rewritten != cpu_rewrite.rewrite(user_cnn(widths=(3,)).apply)


def test_train_state_applies_the_rewrite_on_cpu_unless_turned_off(monkeypatch):
    model, tx = user_cnn(widths=(2,)), optax.adam(1e-3)
    state = state_lib.create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
    on_cpu = jax.default_backend() == "cpu"
    assert isinstance(state.apply_fn, cpu_rewrite.Rewritten) == on_cpu
    monkeypatch.setenv(cpu_rewrite.ENV_SWITCH, "0")
    assert not cpu_rewrite.wins_here()
    state = state_lib.create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
    assert state.apply_fn == model.apply


class PlainNet(nn.Module):
    """Convolutions of every kind a user writes: SAME and VALID, strided, over 3 channels,
    transposed, with batch norm."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.Conv(12, (3, 3), strides=(2, 2), padding="VALID")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.ConvTranspose(4, (3, 3), strides=(2, 2))(x)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def microbatch_grads(model, variables, x, num: int):
    """Gradients summed over `num` microbatches, unrolled as `gradient_step` does."""

    def loss(params, xs):
        out, _ = model.apply({**variables, "params": params}, xs, mutable=["batch_stats"])
        return jnp.sum(out**2)

    total = None
    for xs in jnp.split(x, num):
        grads = jax.grad(loss)(variables["params"], xs)
        total = grads if total is None else jax.tree.map(jnp.add, total, grads)
    return total


def test_compiled_with_eigen_convolutions_the_standard_layers_give_the_same_results():
    model, x = PlainNet(), jax.random.normal(jax.random.key(0), (4, 9, 9, 3))
    variables = model.init(jax.random.key(1), x)
    lowered = jax.jit(lambda v, x: microbatch_grads(model, v, x, 1)).lower(variables, x)
    want = lowered.compile()(variables, x)
    got = cpu_rewrite.compile_for_this_backend(lowered)(variables, x)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
    assert max_abs_diff(got, want) <= 1e-5 * scale  # float32 summation order only.


@pytest.mark.slow
def test_convolutions_leave_ynnpack_and_large_steps_are_compiled_memory_optimized(
    monkeypatch, platform_skip
):
    if not cpu_rewrite.wins_here():
        pytest.skip(platform_skip + "the compiler options apply to XLA:CPU")
    layer = nn.Conv(32, (3, 3))
    x = jnp.ones((4, 12, 12, 16))
    lowered = jax.jit(layer.apply).lower(layer.init(jax.random.key(0), x), x)
    assert "__ynn_fusion" in lowered.compile().as_text()  # XLA's default: YNNPACK.
    assert "__ynn_fusion" not in cpu_rewrite.compile_for_this_backend(lowered).as_text()

    model, x = PlainNet(), jnp.ones((32, 16, 16, 3))
    variables = model.init(jax.random.key(1), x)
    lowered = jax.jit(lambda v, x: microbatch_grads(model, v, x, 4)).lower(variables, x)
    fits = cpu_rewrite.compile_for_this_backend(lowered).memory_analysis().temp_size_in_bytes
    monkeypatch.setattr(cpu_rewrite, "LARGE_TEMPS_BYTES", fits - 1)
    reused = cpu_rewrite.compile_for_this_backend(lowered).memory_analysis().temp_size_in_bytes
    assert reused <= cpu_rewrite.LEAN_ENOUGH * fits  # It reuses the microbatches' buffers.
    # One whole batch: both schedules hold about the same, and the default one is kept.
    lowered = jax.jit(lambda v, x: microbatch_grads(model, v, x, 1)).lower(variables, x)
    default = lowered.compile(compiler_options=cpu_rewrite.CPU_COMPILER_OPTIONS)
    monkeypatch.setattr(cpu_rewrite, "LARGE_TEMPS_BYTES", 0)
    kept = cpu_rewrite.compile_for_this_backend(lowered)
    assert kept.as_text() == default.as_text()
    monkeypatch.setenv(cpu_rewrite.ENV_SWITCH, "0")
    plain = cpu_rewrite.compile_for_this_backend(lowered).as_text()
    assert plain == lowered.compile().as_text()
