"""The pure steps, called directly: eager, jitted, and compared."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxcnn.models import create_model
from flaxcnn.tasks import classification
from flaxcnn.training.state import create_train_state


@functools.cache
def _state(name: str):
    model = create_model(name, widths=(4, 8)) if name == "CNN" else create_model(name)
    # Jitted: initialising eagerly compiles every operation on its own, many times slower.
    return jax.jit(lambda rng: create_train_state(model, optax.adam(1e-3), rng, (28, 28, 1)))(
        jax.random.key(0)
    )


def make_state(name="SeedCNN"):
    """A fresh copy of one state per model: the same static parts (the model's apply_fn), so
    jitted steps compile once per model, and a donated copy leaves the others intact."""
    return jax.tree.map(jnp.copy, _state(name))


# The step most tests run: jitted once for the module (eager execution compiles each
# operation apart, and is compared with this in test_jit_equals_eager_...).
jitted_train_step = jax.jit(classification.train_step, donate_argnums=0)
jitted_eval_step = jax.jit(classification.eval_step)


def make_batch(size=16, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.random((size, 28, 28, 1), np.float32)),
        "label": jnp.asarray(rng.integers(0, 10, size), jnp.int32),
    }


def max_abs_diff(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("name", ["SeedCNN", pytest.param("CNN", marks=pytest.mark.slow)])
def test_train_step_updates_params_and_returns_finite_metrics(name):
    state, batch = make_state(name), make_batch()
    new_state, metrics = jitted_train_step(make_state(name), batch, jax.random.key(1))
    assert int(new_state.step) == 1
    assert max_abs_diff(new_state.params, state.params) > 0
    assert jax.tree.map(jnp.shape, new_state.params) == jax.tree.map(jnp.shape, state.params)
    assert set(metrics) == {"loss", "accuracy", "count"}
    assert all(m.shape == () and m.dtype == jnp.float32 for m in metrics.values())
    assert np.isfinite(metrics["loss"]) and float(metrics["count"]) == 16
    assert 0 <= float(metrics["accuracy"]) <= 16


@pytest.mark.parametrize("name", ["SeedCNN", pytest.param("CNN", marks=pytest.mark.slow)])
def test_jit_equals_eager_and_same_rng_same_result(name):
    batch, rng = make_batch(), jax.random.key(1)
    state_a, metrics_a = jitted_train_step(make_state(name), batch, rng)
    state_b, metrics_b = jitted_train_step(make_state(name), batch, rng)
    assert max_abs_diff(state_a.params, state_b.params) == 0
    assert max_abs_diff(metrics_a, metrics_b) == 0
    # Compared under SGD, whose update is the gradient: Adam's first update is about
    # lr * sign(gradient), so round-off in a near-zero gradient would move a parameter by 2 lr.
    sgd_state = make_state(name).replace(tx=optax.sgd(0.1), opt_state=optax.sgd(0.1).init({}))
    eager_state, eager_metrics = classification.train_step(sgd_state, batch, rng)
    jit_state, jit_metrics = jax.jit(classification.train_step)(sgd_state, batch, rng)
    assert max_abs_diff(eager_state.params, jit_state.params) < 1e-5
    assert max_abs_diff(eager_state.params, sgd_state.params) > 1e-3  # It did step.
    np.testing.assert_allclose(eager_metrics["loss"], jit_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(eager_metrics["loss"], metrics_a["loss"], rtol=1e-5)


@pytest.mark.slow
def test_dropout_noise_depends_on_rng():
    batch = make_batch()
    state_a, _ = jitted_train_step(make_state("CNN"), batch, jax.random.key(1))
    state_b, _ = jitted_train_step(make_state("CNN"), batch, jax.random.key(2))
    assert max_abs_diff(state_a.params, state_b.params) > 0


@pytest.mark.slow
def test_microbatches_give_the_full_batch_update():
    batch, rng = make_batch(32), jax.random.key(1)
    full_state, full_metrics = jitted_train_step(make_state(), batch, rng)
    micro = functools.partial(classification.train_step, microbatch_size=8)
    micro_state, micro_metrics = jax.jit(micro)(make_state(), batch, rng)
    assert max_abs_diff(full_state.params, micro_state.params) < 1e-6
    assert max_abs_diff(full_state.opt_state, micro_state.opt_state) < 1e-6
    np.testing.assert_allclose(full_metrics["loss"], micro_metrics["loss"], rtol=1e-5)
    assert float(micro_metrics["count"]) == 32


def test_label_smoothing_trains_on_smoothed_targets_and_reports_plain_cross_entropy():
    state, batch, rng = make_state(), make_batch(), jax.random.key(1)
    variables = {"params": state.params}
    logits = state.apply_fn(variables, batch["image"])
    targets = 0.9 * jax.nn.one_hot(batch["label"], 10) + 0.1 / 10
    expected = -jnp.sum(targets * jax.nn.log_softmax(logits))
    loss, (metrics, _) = classification.loss_fn(
        state.apply_fn, variables, batch, rng, label_smoothing=0.1
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    plain, _ = classification.loss_fn(state.apply_fn, variables, batch, rng)
    np.testing.assert_allclose(metrics["loss"], plain, rtol=1e-6)
    assert abs(float(loss) - float(plain)) > 1e-3
    smoothed = functools.partial(classification.train_step, label_smoothing=0.1)
    smooth_state, _ = jax.jit(smoothed)(make_state(), batch, rng)
    plain_state, _ = jitted_train_step(make_state(), batch, rng)
    assert max_abs_diff(smooth_state.params, plain_state.params) > 0


@pytest.mark.parametrize(
    "batch, micro, expected",
    [(32, 0, 1), (32, 32, 1), (32, 64, 1), (128, 32, 4), (300, 32, 10), (7, 2, 7)],
)
def test_num_microbatches_splits_evenly(batch, micro, expected):
    assert classification.num_microbatches(batch, micro) == expected


def test_batch_stats_update_in_training_only():
    """Training moves the batch statistics; evaluation uses them (not the batch's own), so
    an example's metrics do not depend on the batch it is evaluated in."""
    state, batch = make_state("CNN"), make_batch()
    trained, _ = jitted_train_step(make_state("CNN"), batch, jax.random.key(1))
    assert max_abs_diff(trained.batch_stats, state.batch_stats) > 0
    whole = jitted_eval_step(trained, batch)
    halves = [
        jitted_eval_step(trained, {key: value[part] for key, value in batch.items()})
        for part in (slice(0, 8), slice(8, 16))
    ]
    for name in ("loss", "accuracy", "count"):
        np.testing.assert_allclose(whole[name], halves[0][name] + halves[1][name], rtol=1e-5)
    # The statistics trained are the ones evaluation reads.
    untrained = jitted_eval_step(trained.replace(batch_stats=state.batch_stats), batch)
    assert float(untrained["loss"]) != pytest.approx(float(whole["loss"]), rel=1e-6)


@pytest.mark.slow
def test_eval_step_counts_only_masked_examples():
    state, batch = make_state(), make_batch(16)
    full = jitted_eval_step(state, batch)
    mask = jnp.arange(16) < 10
    masked = jitted_eval_step(state, {**batch, "mask": mask})
    first10 = classification.eval_step(state, jax.tree.map(lambda x: x[:10], batch))
    assert float(full["count"]) == 16 and float(masked["count"]) == 10
    np.testing.assert_allclose(masked["loss"], first10["loss"], rtol=1e-5)
    np.testing.assert_allclose(masked["accuracy"], first10["accuracy"])
