"""The task-independent gradient step (flaxcnn/training/gradient_step.py): every task that uses
it honours augmentation, microbatches, L2 and skip_nonfinite, and the GAN, which has a step of
its own, skips with the same `keep_if_finite` and rejects what it cannot honour."""

import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxcnn import default_config
from flaxcnn.cpu import rewrite as cpu_rewrite
from flaxcnn.data import augment
from flaxcnn.tasks import autoencoder, classification, gan, vae
from flaxcnn.training import gradient_step
from flaxcnn.training.state import TrainState

REPO = pathlib.Path(__file__).resolve().parents[2]

SHAPE = (28, 28, 1)
TINY_IMAGE_MODEL = {"latent_dim": 8, "widths": (8, 16)}
# name: (task module, model, model kwargs); all three train through gradient_step.
TASKS = {
    "classification": (classification, "SeedCNN", {}),
    "autoencoder": (autoencoder, "ConvAutoencoder", TINY_IMAGE_MODEL),
    "vae": (vae, "ConvVAE", TINY_IMAGE_MODEL),
}
AUGMENTATION = (("noise", 0.2), ("rotation", 15.0), ("translation", 2.0))
# Every task; the autoencoder's variant in the slow suite (the others cover it quickly).
TASK_PARAMS = [
    pytest.param(name, marks=pytest.mark.slow) if name == "autoencoder" else name
    for name in sorted(TASKS)
]
TINY_GAN = dict(latent_dim=8, generator_widths=(8, 4), discriminator_widths=(4, 8))


def key(seed: int) -> jax.Array:
    """A PRNG key of the "rbg" kind: XLA:CPU compiles it faster than threefry's rounds."""
    return jax.random.key(seed, impl="rbg")


def config_for(name: str, **overrides):
    task, model, kwargs = TASKS.get(name, (gan, "DCGAN", {}))
    config = default_config.get_config()
    config.task = name
    config.model = model
    config.model_kwargs.update(kwargs)
    # SGD: the update is the gradient times the learning rate, so updates compare like
    # gradients (Adam's first step is only their signs).
    config.optimizer, config.learning_rate = "sgd", 0.1
    config.update(overrides)
    return config


@functools.cache
def _state(name: str):
    task = TASKS[name][0]
    create = functools.partial(task.create_state, config_for(name), input_shape=SHAPE)
    return jax.jit(lambda rng: create(rng, num_classes=10, total_steps=100))(key(0))


def make_state(name: str):
    """A fresh copy of one state per task: the same static parts, so steps compile once."""
    return jax.tree.map(jnp.copy, _state(name))


@functools.cache
def jitted_step(name: str, **settings):
    """The task's train_step with `settings` (augmentation as a tuple of pairs), jitted."""
    if "augmentation" in settings:
        settings["augmentation"] = dict(settings["augmentation"])
    return jax.jit(functools.partial(TASKS[name][0].train_step, **settings))


def make_batch(size: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.random((size, *SHAPE), np.float32)),
        "label": jnp.asarray(rng.integers(0, 10, size), jnp.int32),
    }


def max_abs_diff(a, b) -> float:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", TASK_PARAMS)
def test_step_changes_params_with_finite_metrics(name):
    state = make_state(name)
    new_state, metrics = jitted_step(name)(state, make_batch(), key(1))
    assert int(new_state.step) == 1
    assert max_abs_diff(new_state.params, state.params) > 0
    assert all_finite(new_state.params) and all_finite(metrics)
    assert float(metrics["count"]) == 16 and float(metrics["loss"]) > 0


@pytest.mark.slow
def test_jit_equals_eager_with_every_setting_on():
    settings = dict(microbatch_size=8, augmentation=dict(AUGMENTATION), l2=1e-3)
    state, batch = make_state("classification"), make_batch()
    eager_state, eager_metrics = classification.train_step(
        state, batch, key(1), skip_nonfinite=True, **settings
    )
    settings["augmentation"] = AUGMENTATION
    jit_state, jit_metrics = jitted_step("classification", skip_nonfinite=True, **settings)(
        state, batch, key(1)
    )
    assert max_abs_diff(eager_state.params, jit_state.params) < 1e-6
    np.testing.assert_allclose(eager_metrics["loss"], jit_metrics["loss"], rtol=1e-5)
    assert float(eager_metrics["skipped"]) == 0.0


@pytest.mark.parametrize("name", ["classification", "vae"])
def test_same_key_same_step_and_another_key_another(name):
    # The VAE samples its posterior and the classifier augments: both draw from the key.
    step = jitted_step(name, augmentation=AUGMENTATION)
    batch = make_batch()
    a, metrics_a = step(make_state(name), batch, key(1))
    b, metrics_b = step(make_state(name), batch, key(1))
    c, metrics_c = step(make_state(name), batch, key(2))
    assert max_abs_diff(a.params, b.params) == 0
    assert float(metrics_a["loss"]) == float(metrics_b["loss"])
    assert float(metrics_a["loss"]) != float(metrics_c["loss"])


@pytest.mark.parametrize(
    "name", ["classification", pytest.param("autoencoder", marks=pytest.mark.slow)]
)
def test_microbatches_give_the_whole_batch_update(name):
    # Deterministic models without batch norm: only the summation order differs.
    state, batch = make_state(name), make_batch()
    whole, whole_metrics = jitted_step(name, microbatch_size=0)(state, batch, key(1))
    micro, micro_metrics = jitted_step(name, microbatch_size=4)(make_state(name), batch, key(1))
    update = max_abs_diff(whole.params, state.params)
    assert max_abs_diff(micro.params, whole.params) < 1e-4 * update
    for name_ in whole_metrics:
        np.testing.assert_allclose(micro_metrics[name_], whole_metrics[name_], rtol=1e-5)


@pytest.mark.parametrize("name", TASK_PARAMS)
def test_skip_nonfinite_skips_a_nan_batch(name):
    state = make_state(name)
    batch = make_batch()
    nan_batch = {**batch, "image": batch["image"].at[3, 5, 5, 0].set(jnp.nan)}
    unguarded, _ = jitted_step(name)(state, nan_batch, key(1))
    assert not all_finite(unguarded.params)  # The NaN does reach the parameters.

    skipped, metrics = jitted_step(name, skip_nonfinite=True)(make_state(name), nan_batch, key(1))
    assert int(skipped.step) == 1
    assert max_abs_diff(skipped.params, state.params) == 0
    assert max_abs_diff(skipped.opt_state, state.opt_state) == 0
    assert float(metrics["skipped"]) == 1.0 and float(metrics["loss"]) == 0.0

    kept, metrics = jitted_step(name, skip_nonfinite=True)(make_state(name), batch, key(1))
    assert float(metrics["skipped"]) == 0.0 and float(metrics["loss"]) > 0
    assert max_abs_diff(kept.params, state.params) > 0


@pytest.mark.slow
def test_gan_skip_nonfinite_skips_a_nan_batch():
    config = config_for("gan", optimizer="adam", model_kwargs=TINY_GAN)
    state = jax.jit(lambda rng: gan.create_state(config, rng, SHAPE, 10, 100))(key(0))
    batch = make_batch(8)
    nan_batch = {**batch, "image": batch["image"] * jnp.nan}
    step = jax.jit(functools.partial(gan.train_step, skip_nonfinite=True))
    skipped, metrics = step(state, nan_batch, key(1))
    assert int(skipped.step) == 1 and float(metrics["skipped"]) == 1.0
    assert max_abs_diff(skipped.params, state.params) == 0
    kept, metrics = step(state, batch, key(1))
    assert float(metrics["skipped"]) == 0.0 and max_abs_diff(kept.params, state.params) > 0


def test_keep_if_finite_keeps_the_new_state_or_the_old_with_the_new_step():
    old = TrainState.create(apply_fn=None, params={"w": jnp.zeros(2)}, tx=optax.sgd(0.1))
    new = old.replace(step=old.step + 1, params={"w": jnp.ones(2)})
    metrics = {"loss": jnp.float32(2.0), "count": jnp.float32(4.0)}
    kept, kept_metrics = gradient_step.keep_if_finite(new, old, metrics, jnp.bool_(True))
    assert float(kept.params["w"][0]) == 1.0 and float(kept_metrics["skipped"]) == 0.0
    assert float(kept_metrics["loss"]) == 2.0
    dropped, dropped_metrics = gradient_step.keep_if_finite(new, old, metrics, jnp.bool_(False))
    assert float(dropped.params["w"][0]) == 0.0 and int(dropped.step) == 1
    assert dropped_metrics == {"loss": 0.0, "count": 0.0, "skipped": 1.0}


@pytest.mark.slow
def test_the_loss_sees_the_augmented_images_keyed_by_the_step():
    """A loss that reports the images it is given: those of `augment.augment` with the
    second half of the split of the run key folded with the step; the first half keys the
    microbatches' dropout."""
    state = make_state("autoencoder").replace(step=jnp.int32(7))
    batch, rng, strengths = make_batch(8), key(3), dict(AUGMENTATION)

    def recording_loss(apply_fn, variables, batch, rng):
        seen = batch["image"]
        loss = 0.0 * jnp.sum(jax.tree.leaves(variables["params"])[0])
        return loss, ({"loss": loss, "seen": seen, "count": jnp.float32(len(seen))}, {})

    _, metrics = gradient_step.gradient_step(
        state, batch, rng, recording_loss, augmentation=strengths
    )
    augment_rng = jax.random.split(jax.random.fold_in(rng, 7))[1]
    expected = augment.augment(batch["image"], augment_rng, **strengths)
    assert max_abs_diff(expected, batch["image"]) > 0.05
    np.testing.assert_array_equal(metrics["seen"], expected)
    _, plain = gradient_step.gradient_step(state, batch, rng, recording_loss)
    np.testing.assert_array_equal(plain["seen"], batch["image"])


@pytest.mark.parametrize("name", [pytest.param("autoencoder", marks=pytest.mark.slow), "vae"])
def test_generative_tasks_train_on_augmented_images(name):
    # The same key with and without augmentation: only the images differ.
    batch = make_batch()
    plain, plain_metrics = jitted_step(name)(make_state(name), batch, key(1))
    augmented, metrics = jitted_step(name, augmentation=AUGMENTATION)(
        make_state(name), batch, key(1)
    )
    assert float(metrics["loss"]) != float(plain_metrics["loss"])
    assert max_abs_diff(augmented.params, plain.params) > 0


def test_step_kwargs_follow_the_config():
    config = config_for("classification", l2=1e-4, skip_nonfinite=True)
    config.augment.noise = 0.1
    kwargs = classification.step_kwargs(config)
    assert kwargs["l2"] == 1e-4 and kwargs["skip_nonfinite"] is True
    assert kwargs["augmentation"]["noise"] == 0.1
    # Microbatches of 32 only on CPUs without oneDNN's convolutions, on any device count.
    eigen = jax.default_backend() == "cpu" and not cpu_rewrite.onednn_here()
    assert kwargs["microbatch_size"] == (32 if eigen else 0)
    # The generative tasks' -1 is the whole batch; a size given is used.
    assert autoencoder.step_kwargs(config_for("autoencoder"))["microbatch_size"] == 0
    assert vae.step_kwargs(config_for("vae", microbatch_size=8))["microbatch_size"] == 8


@pytest.mark.parametrize("value", [-2, True])
def test_a_bad_microbatch_size_is_rejected(value):
    for name in TASKS:
        with pytest.raises(ValueError, match="config.microbatch_size must be"):
            TASKS[name][0].validate(config_for(name, microbatch_size=value))


def test_gradient_step_tasks_accept_every_setting():
    config = config_for("classification", microbatch_size=8, l2=1e-3, ema_decay=0.9)
    config.grad_clip_norm, config.skip_nonfinite, config.augment.rotation = 1.0, True, 10.0
    for name in TASKS:
        TASKS[name][0].validate(config)
        settings = TASKS[name][0].step_kwargs(config)
        assert (settings["microbatch_size"], settings["l2"], settings["skip_nonfinite"]) == (
            8,
            1e-3,
            True,
        ), name
        assert settings["augmentation"]["rotation"] == 10.0, name


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"microbatch_size": 16}, "task 'gan' trains on whole batches"),
        ({"l2": 1e-4}, "task 'gan' has no L2 penalty"),
        ({"ema_decay": 0.999}, "set config.g_ema_decay"),
    ],
)
def test_gan_rejects_what_it_cannot_honour(overrides, message):
    config = config_for("gan", optimizer="adam", model_kwargs=TINY_GAN)
    gan.validate(config)  # The defaults (microbatch_size -1) pass.
    config.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError, match=message):
        gan.validate(config)
    with pytest.raises(ValueError, match=message):
        gan.create_state(config, key(0), SHAPE, 10, 100)


def gan_state(**overrides):
    config = config_for("gan", optimizer="adam", model_kwargs=TINY_GAN, **overrides)
    return jax.jit(lambda rng: gan.create_state(config, rng, SHAPE, 10, 100))(key(0))


@pytest.mark.slow
def test_gan_augments_real_and_generated_images_for_both_updates():
    """DiffAugment: off, the step is the plain one; on, the discriminator judges augmented
    images in its update and the generator's gradient passes through the augmentation."""
    state, batch, strengths = gan_state(), make_batch(8), dict(AUGMENTATION)
    plain, plain_metrics = jax.jit(gan.train_step)(state, batch, key(1))
    off, off_metrics = jax.jit(functools.partial(gan.train_step, augmentation=None))(
        state, batch, key(1)
    )
    assert max_abs_diff(off.params, plain.params) == 0
    step = jax.jit(functools.partial(gan.train_step, augmentation=strengths))
    augmented, metrics = step(state, batch, key(1))
    assert all_finite(augmented.params) and all_finite(metrics)
    assert float(metrics["d_real"]) != float(plain_metrics["d_real"])
    assert float(metrics["d_fake"]) != float(plain_metrics["d_fake"])
    # The generator alone, against the same discriminator: the augmentation is in its loss.
    g_plain, _ = jax.jit(gan.generator_update, static_argnums=2)(state, key(2), 8)
    g_update = functools.partial(gan.generator_update, augmentation=strengths)
    g_augmented, _ = jax.jit(g_update, static_argnums=2)(state, key(2), 8)
    assert max_abs_diff(g_augmented.params["generator"], g_plain.params["generator"]) > 0
    assert gan.step_kwargs(gan_config_with_noise())["augmentation"]["noise"] == 0.1


def gan_config_with_noise():
    config = config_for("gan", optimizer="adam", model_kwargs=TINY_GAN)
    config.augment.noise = 0.1
    gan.validate(config)
    return config


@pytest.mark.parametrize(
    "strengths",
    [{"rotation": 20.0}, {"translation": 3.0}, {"scale": 0.2}, {"noise": 0.1}, {"crop": 2}]
    + [{"flip_horizontal": True}],
)
def test_every_augmentation_passes_gradients_to_the_images(strengths):
    # What DiffAugment needs: the generator learns through the augmentation.
    images = make_batch(4)["image"]
    weights = jax.random.normal(key(5), images.shape)
    grads = jax.grad(lambda x: jnp.sum(augment.augment(x, key(4), **strengths) * weights))(images)
    assert all_finite(grads) and float(jnp.max(jnp.abs(grads))) > 0


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_gan_clips_each_network_when_asked(clip):
    config = config_for("gan", optimizer="adam", grad_clip_norm=clip, model_kwargs=TINY_GAN)
    state = gan.create_state(config, key(0), SHAPE, 10, 100)
    for tx, params in [
        (state.g_tx, state.params["generator"]),
        (state.d_tx, state.params["discriminator"]),
    ]:
        grads = jax.tree.map(lambda p: jnp.full_like(p, 10.0), params)
        _, opt_state = tx.update(grads, tx.init(params), params)
        # Adam's second moment after one step is (1 - b2) g^2 of the gradient it was given.
        nu = optax.tree_utils.tree_get(opt_state, "nu")
        seen = float(jnp.sqrt(sum(jnp.sum(v) for v in jax.tree.leaves(nu)) / (1 - 0.999)))
        expected = clip or float(optax.global_norm(grads))
        assert seen == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
def test_gan_with_microbatches_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flaxcnn.main", "--workdir", str(tmp_path)]
        + ["--config.task=gan", "--config.model=DCGAN", "--config.microbatch_size=16"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: task 'gan' trains on whole batches (the generator's batch norm needs them): "
        "set config.microbatch_size to 0 or -1, not 16"
    ]
    assert "Traceback" not in result.stderr


def scaled_sgd(learning_rate, scale: float = 1.0):
    """An optimizer given by import path, as a user's would be (`learning_rate`: a schedule)."""
    return optax.chain(optax.sgd(learning_rate), optax.scale(scale))


@pytest.mark.parametrize(
    "optimizer, kwargs",
    [
        ("adam", {}),
        ("adamw", {"weight_decay": 1e-4}),
        ("sgd", {"optimizer_kwargs": {"momentum": 0.9}}),
        ("lion", {"learning_rate": 1e-4}),  # Any optax optimizer by name.
        ("rmsprop", {"learning_rate": 1e-3}),
        (f"{__file__}:scaled_sgd", {"optimizer_kwargs": {"scale": 2.0}}),
    ],
)
def test_every_kind_of_optimizer_by_name_trains(optimizer, kwargs):
    """A few steps on one batch bring its loss down, with each way of naming an optimizer."""
    config = config_for("classification", optimizer=optimizer, learning_rate=1e-2)
    config.update(kwargs)
    state = classification.create_state(config, key(0), SHAPE, 10, 100)
    step = jax.jit(classification.train_step)
    batch = make_batch(32)
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch, key(1))
        losses.append(float(metrics["loss"]) / 32)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
