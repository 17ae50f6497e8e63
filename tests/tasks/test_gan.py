"""The DCGAN model and the GAN task's pure steps, on tiny networks."""

import functools
import importlib.util
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from flaxcnn import default_config
from flaxcnn.cpu.kernels import MIN_FEATURES_PER_PHASE
from flaxcnn.models import create_model
from flaxcnn.models.gan import DCGAN
from flaxcnn.models.layers import ConvTranspose2x
from flaxcnn.tasks import gan

TINY = dict(latent_dim=8, generator_widths=(8, 4), discriminator_widths=(4, 8))


def key(seed: int) -> jax.Array:
    """A PRNG key of the "rbg" kind, which XLA:CPU compiles faster than threefry's rounds:
    these tests are mostly compilation."""
    return jax.random.key(seed, impl="rbg")


def count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def max_abs_diff(a, b) -> float:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def gan_config(**overrides):
    config = default_config.get_config()
    config.task = "gan"
    config.model = "DCGAN"
    config.model_kwargs.update(TINY)
    config.learning_rate = 2e-3
    config.adam_b1 = 0.5
    config.update(overrides)
    return config


@functools.cache
def _cached_state(shape, overrides, model_kwargs):
    config = gan_config(**dict(overrides))
    config.model_kwargs.update(dict(model_kwargs))
    # Jitted, as the loop may: one compilation instead of many eager operations.
    return jax.jit(lambda rng: gan.create_state(config, rng, shape, 10, 100))(key(0))


def make_state(shape=(28, 28, 1), model_kwargs=None, **overrides):
    """A fresh copy of one state per setting (config `overrides` and `model_kwargs` on top of
    TINY): its static parts (the optimizers) are the same objects each time, so jitted steps
    compile once for all the tests."""
    settings = tuple(sorted(overrides.items())), tuple(sorted((model_kwargs or {}).items()))
    return jax.tree.map(jnp.copy, _cached_state(shape, *settings))


# The updates compiled (static: the batch size and the settings after the batch), as the loop
# runs them: one compilation each instead of many eager operations.
d_update = jax.jit(gan.discriminator_update, static_argnums=(3, 4, 5, 6))
g_update = jax.jit(gan.generator_update, static_argnums=(2, 3, 4))


def make_batch(size=8, shape=(28, 28, 1), seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.random((size, *shape), np.float32)),
        "label": jnp.asarray(rng.integers(0, 10, size), jnp.int32),
    }


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (30, 26, 2)])
def test_generator_and_discriminator_shapes(shape):
    model = DCGAN(shape, **TINY)
    variables = jax.eval_shape(model.init, key(0), jnp.zeros((1, 8)))
    generate = functools.partial(model.apply, method=DCGAN.generate)
    images = jax.eval_shape(generate, variables, jnp.ones((3, 8)))
    assert images.shape == (3, *shape) and images.dtype == jnp.float32
    discriminate = functools.partial(model.apply, method=DCGAN.discriminate)
    assert jax.eval_shape(discriminate, variables, images).shape == (3,)
    assert set(variables["params"]) == {"generator", "discriminator"}
    assert set(variables["batch_stats"]) == {"generator"}


@pytest.mark.parametrize(
    "shape, generator, discriminator",
    # Generator: dense 64 -> 7x7x128 (8x8x128), no bias; BN; 4x4 transposed convs 128 -> 64
    # (no bias), BN, 64 -> C. Discriminator: 4x4 stride-2 convs C -> 64 -> 128, dense -> 1.
    [((28, 28, 1), 533_889, 138_561), ((32, 32, 3), 658_819, 142_529)],
)
def test_default_dcgan_parameter_counts(shape, generator, discriminator):
    model = create_model("DCGAN", image_shape=shape)
    variables = jax.eval_shape(model.init, key(0), jnp.zeros((1, 64)))
    assert count(variables["params"]["generator"]) == generator
    assert count(variables["params"]["discriminator"]) == discriminator
    assert variables["params"]["generator"]["ConvTranspose_0"]["kernel"].shape == (4, 4, 128, 64)


@pytest.mark.parametrize("features", [4, MIN_FEATURES_PER_PHASE])  # Both computations.
def test_transposed_convolution_equals_flax_values_and_gradients(features):
    x = jax.random.normal(key(1), (2, 5, 6, 3))
    reference = nn.ConvTranspose(features, (4, 4), strides=(2, 2))
    variables = reference.init(key(0), x)
    variables = jax.tree.map(lambda v: v + 0.1, variables)  # A non-zero bias too.
    ours = ConvTranspose2x(features)
    assert jax.tree.map(jnp.shape, ours.init(key(0), x)) == jax.tree.map(jnp.shape, variables)
    np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), atol=1e-5)

    def grads(module):
        loss = lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)

    assert max_abs_diff(grads(ours), grads(reference)) < 1e-4


def test_state_is_a_pytree_of_arrays_with_a_step():
    state = make_state()
    assert int(state.step) == 0
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))
    assert set(state.params) == {"generator", "discriminator"}


def test_bad_settings_raise_value_errors():
    with pytest.raises(ValueError, match="needs a GAN model"):
        gan.create_state(default_config.get_config(), key(0), (28, 28, 1), 10, 10)
    with pytest.raises(ValueError, match="optimizer 'adam'"):
        make_state(optimizer="sgd")


@pytest.fixture(scope="module")
def eager_step():
    """One train step run eagerly (op by op, slow), shared by the tests that need it."""
    state, batch = make_state(), make_batch()
    return state, batch, gan.train_step(state, batch, key(1))


@pytest.mark.slow
def test_train_step_returns_finite_summed_metrics(eager_step):
    state, _, (new_state, metrics) = eager_step
    assert int(new_state.step) == 1
    assert set(metrics) == {"d_loss", "g_loss", "d_real", "d_fake", "count", "loss"}
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["count"]) == 8
    assert float(metrics["loss"]) == float(metrics["g_loss"])
    assert 0 <= float(metrics["d_real"]) <= 8 and 0 <= float(metrics["d_fake"]) <= 8
    # At initialisation D is near 1/2 everywhere: d_loss ~ 2 log 2, g_loss ~ log 2 a sample.
    np.testing.assert_allclose(float(metrics["d_loss"]) / 8, 2 * np.log(2), rtol=0.2)
    np.testing.assert_allclose(float(metrics["g_loss"]) / 8, np.log(2), rtol=0.2)


@pytest.mark.slow
def test_each_update_changes_only_its_own_network():
    state, batch = make_state(), make_batch()
    after_d, metrics = d_update(state, batch, key(1))
    assert max_abs_diff(after_d.params["generator"], state.params["generator"]) == 0
    assert max_abs_diff(after_d.batch_stats, state.batch_stats) == 0
    assert max_abs_diff(after_d.g_opt_state, state.g_opt_state) == 0
    assert max_abs_diff(after_d.params["discriminator"], state.params["discriminator"]) > 0
    assert set(metrics) == {"d_loss", "d_real", "d_fake", "count"}

    after_g, metrics = g_update(state, key(2), 8)
    assert max_abs_diff(after_g.params["discriminator"], state.params["discriminator"]) == 0
    assert max_abs_diff(after_g.d_opt_state, state.d_opt_state) == 0
    assert max_abs_diff(after_g.params["generator"], state.params["generator"]) > 0
    assert max_abs_diff(after_g.batch_stats, state.batch_stats) > 0  # Running averages move.
    assert set(metrics) == {"g_loss"}


@pytest.mark.slow
def test_jit_equals_eager_and_same_rng_same_result(eager_step):
    _, batch, (eager_state, eager_metrics) = eager_step
    rng = key(1)
    jitted = jax.jit(gan.train_step, donate_argnums=0)
    state_a, metrics_a = jitted(make_state(), batch, rng)
    state_b, metrics_b = jitted(make_state(), batch, rng)
    assert max_abs_diff(state_a, state_b) == 0
    assert max_abs_diff(metrics_a, metrics_b) == 0
    assert max_abs_diff(eager_state.params, state_a.params) < 1e-5
    assert max_abs_diff(eager_state.batch_stats, state_a.batch_stats) < 1e-5
    for name in eager_metrics:
        np.testing.assert_allclose(eager_metrics[name], metrics_a[name], rtol=1e-5)
    # Another key draws other latents, hence another update.
    state_c, _ = jitted(make_state(), batch, key(2))
    assert max_abs_diff(state_a.params, state_c.params) > 0


@pytest.mark.slow
def test_discriminator_loss_falls_on_one_fixed_batch():
    state, batch = make_state(), make_batch(16)
    step = jax.jit(gan.train_step)
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch, key(1))
        losses.append(float(metrics["d_loss"]) / 16)
    assert np.mean(losses[-5:]) < 0.8 * losses[0], losses


@pytest.mark.slow
def test_eval_step_honours_the_mask():
    state = make_state()
    batch = make_batch(6)
    mask = jnp.array([True, True, True, False, False, False])
    masked = gan.eval_step(state, {**batch, "mask": mask}, key(3))
    assert set(masked) == {"d_loss", "g_loss", "d_real", "d_fake", "count", "loss"}
    assert float(masked["count"]) == 3
    # The masked examples' values change nothing.
    garbage = batch["image"].at[3:].set(1.0)
    again = gan.eval_step(state, {**batch, "image": garbage, "mask": mask}, key(3))
    np.testing.assert_allclose(masked["d_loss"], again["d_loss"], rtol=1e-6)
    np.testing.assert_allclose(masked["d_real"], again["d_real"], rtol=1e-6)
    full = gan.eval_step(state, batch, key(3))
    assert float(full["count"]) == 6 and float(full["d_loss"]) > float(masked["d_loss"])


@pytest.mark.slow
def test_generate_is_pure():
    state = make_state()
    a = gan.generate(state, key(5), 4)
    assert a.shape == (4, 28, 28, 1)
    assert float(a.min()) >= 0 and float(a.max()) <= 1  # A sigmoid's output.
    assert max_abs_diff(a, gan.generate(state, key(5), 4)) == 0
    assert max_abs_diff(a, gan.generate(state, key(6), 4)) > 0
    assert gan.fixed_latents(state, 4).shape == (4, 8)


def test_the_generator_average_follows_its_decay():
    state = make_state(g_ema_decay=0.9)
    assert max_abs_diff(state.g_ema, state.params["generator"]) == 0
    after, _ = g_update(state, key(2), 8)
    expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.g_ema, after.params["generator"])
    assert max_abs_diff(after.g_ema, expected) < 1e-6
    assert max_abs_diff(after.g_ema, after.params["generator"]) > 0
    # The discriminator's update leaves the average alone.
    assert max_abs_diff(d_update(state, make_batch(), key(1))[0].g_ema, state.g_ema) == 0


def test_r1_penalty_sums_the_squared_input_gradients():
    weights = jnp.arange(12.0).reshape(2, 2, 3) / 10
    real = jnp.ones((5, 2, 2, 3))
    # D(x) = <w, x> + <x, x> / 2 per image: its gradient at x is w + x.
    d_fn = lambda x: jnp.sum(x * weights + x * x / 2, axis=(1, 2, 3))  # noqa: E731
    expected = 5 * jnp.sum((weights + 1) ** 2)
    np.testing.assert_allclose(gan.r1_penalty(d_fn, real), expected, rtol=1e-6)  # float32 sums


def test_lazy_r1_penalises_every_nth_step_with_n_times_the_weight():
    state, real = make_state(), make_batch()["image"]

    def mean_penalty(params):
        d_fn = lambda x: gan._discriminate(state, params, x)  # noqa: E731
        return 0.5 * gan.r1_penalty(d_fn, real) / len(real)

    expected = jax.grad(mean_penalty)(state.params["discriminator"])
    grads = jax.jit(gan.r1_gradients, static_argnums=(3, 4))
    at = lambda step: state.replace(step=jnp.asarray(step, jnp.int32))  # noqa: E731
    scaled = lambda tree, c: jax.tree.map(lambda g: c * g, tree)  # noqa: E731
    assert max_abs_diff(grads(at(5), real, None, 2.0, 1), scaled(expected, 2.0)) < 1e-6
    assert max_abs_diff(grads(at(6), real, None, 2.0, 3), scaled(expected, 6.0)) < 1e-6
    assert max_abs_diff(grads(at(7), real, None, 2.0, 3), scaled(expected, 0.0)) == 0
    # The discriminator's update takes them: on a penalised step it moves otherwise.
    batch = make_batch()

    def d_after(step, r1_gamma):
        return d_update(at(step), batch, key(1), None, r1_gamma, 3)[0].params["discriminator"]

    assert max_abs_diff(d_after(6, 100.0), d_after(6, 0.0)) > 0
    assert max_abs_diff(d_after(7, 100.0), d_after(7, 0.0)) == 0


def test_bad_r1_settings_are_refused():
    for overrides in (dict(r1_gamma=-1.0), dict(r1_every=0)):
        with pytest.raises(ValueError, match="r1_gamma must be >= 0 and config.r1_every >= 1"):
            gan.validate(gan_config(**overrides))


def test_sampling_variables_hold_the_averaged_weights_and_standing_statistics():
    state, _ = g_update(make_state(g_ema_decay=0.5), key(2), 8)
    variables = gan.sampling_variables(state, 64)
    assert max_abs_diff(variables["params"]["generator"], state.g_ema) == 0
    again = gan.sampling_variables(state, 64)
    assert max_abs_diff(variables, again) == 0  # Fixed latents: deterministic.
    # The statistics are those of one batch through the averaged generator, so normalising
    # that batch with them in evaluation mode equals training mode on it.
    rng = jax.random.fold_in(jax.random.key(0), gan._STANDING_STATS_FOLD)
    z = gan.latents(state, rng, 64)
    train_mode, _ = state.model.apply(
        {"params": {"generator": state.g_ema}, "batch_stats": state.batch_stats},
        z,
        train=True,
        method=DCGAN.generate,
        mutable=["batch_stats"],
    )
    np.testing.assert_allclose(gan.generate_with(state, variables, z), train_mode, atol=1e-4)


def conditional_state(**overrides):
    return make_state(conditional=True, **overrides)


def test_conditional_gan_takes_labels_in_both_networks():
    state = conditional_state()
    assert state.model.num_classes == 10
    assert "label_projection" in state.params["discriminator"]
    z = gan.fixed_latents(state, 4)
    variables = gan.sampling_variables(state, 64)
    threes = gan.generate_with(state, variables, z, jnp.full(4, 3))
    fives = gan.generate_with(state, variables, z, jnp.full(4, 5))
    assert threes.shape == (4, 28, 28, 1) and max_abs_diff(threes, fives) > 0
    # Same latents, same labels: same images; the label is the only difference.
    assert max_abs_diff(threes, gan.generate_with(state, variables, z, jnp.full(4, 3))) == 0
    with pytest.raises(ValueError, match="needs labels"):
        state.model.apply(
            {"params": state.params, "batch_stats": state.batch_stats}, z, method=DCGAN.generate
        )


@pytest.mark.slow
def test_conditional_train_step_runs_on_the_batch_labels():
    state, batch = conditional_state(), make_batch()
    new_state, metrics = jax.jit(gan.train_step)(state, batch, key(1))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    # The real images' labels reach the discriminator: other labels, another update.
    other = {**batch, "label": (batch["label"] + 1) % 10}
    other_state, _ = jax.jit(gan.train_step)(conditional_state(), other, key(1))
    assert max_abs_diff(new_state.params["discriminator"], other_state.params["discriminator"]) > 0


def test_ac_gan_class_head_learns_real_labels_and_teaches_the_generator():
    state, batch = conditional_state(model_kwargs=dict(class_head=True)), make_batch()
    assert state.params["discriminator"]["class_head"]["kernel"].shape[-1] == 10

    def after(weight):
        d_state, metrics = d_update(state, batch, key(1), None, 0.0, 1, weight)
        g_state, _ = g_update(state, key(2), 8, None, weight)
        head = d_state.params["discriminator"]["class_head"]
        return head, g_state.params["generator"], float(metrics["class_loss"])

    head_on, g_on, loss = after(1.0)
    head_off, g_off, _ = after(0.0)
    assert loss > 0 and max_abs_diff(head_off, state.params["discriminator"]["class_head"]) == 0
    assert max_abs_diff(head_on, head_off) > 0 and max_abs_diff(g_on, g_off) > 0
    # The head's loss is that of the real images' labels.
    logits = state.model.apply(
        {"params": state.params}, batch["image"], batch["label"], True, method=DCGAN.discriminate
    )[1]
    np.testing.assert_allclose(loss, gan.class_head_loss(logits, batch["label"]), rtol=1e-5)


def test_labels_reach_the_generator_as_rows_and_the_head_through_its_dim():
    state = conditional_state(model_kwargs=dict(class_head=True, class_head_dim=3))
    g, d = state.params["generator"], state.params["discriminator"]
    # One learned row per label, added to the first Dense of the 8 latents (7 x 7 x 8 outputs).
    assert g["label_rows"]["embedding"].shape == (10, 392)
    assert g["Dense_0"]["kernel"].shape == (8, 392)
    # The class head reads the discriminator's 392 features mapped to 3 numbers.
    assert d["class_features"]["kernel"].shape == (392, 3)
    assert d["class_head"]["kernel"].shape == (3, 10)
    z, variables = gan.fixed_latents(state, 4), gan.sampling_variables(state, 64)
    threes = gan.generate_with(state, variables, z, jnp.full(4, 3))
    assert max_abs_diff(threes, gan.generate_with(state, variables, z, jnp.full(4, 5))) > 0
    # A label acts through its row alone: with every row alike, labels make no difference.
    generator = variables["params"]["generator"]
    rows = generator["label_rows"]["embedding"]
    alike = {"embedding": jnp.broadcast_to(rows[0], rows.shape)}
    variables = {**variables, "params": {"generator": {**generator, "label_rows": alike}}}
    threes = gan.generate_with(state, variables, z, jnp.full(4, 3))
    assert max_abs_diff(threes, gan.generate_with(state, variables, z, jnp.full(4, 5))) == 0


def test_a_class_head_needs_a_conditional_gan():
    with pytest.raises(ValueError, match="class_head needs a conditional GAN"):
        make_state(model_kwargs=dict(class_head=True))


def clustered_state(num_clusters=3, **overrides):
    """A GAN conditioned on `num_clusters` clusters, fitted to three kinds of image: dark,
    grey and bright."""
    from flaxcnn.data import input_pipeline

    state = make_state(num_clusters=num_clusters, **overrides)
    levels = np.repeat(np.array([10, 128, 245], np.uint8), 8)
    images = np.broadcast_to(levels[:, None, None, None], (24, 28, 28, 1)).copy()
    split = input_pipeline.Split(images, np.zeros(24, np.int32), 10)
    return gan.fit_to_data(state, gan_config(num_clusters=num_clusters), split)


def test_a_gan_conditioned_on_clusters_draws_each_latents_cluster():
    placeholder, state = make_state(num_clusters=3), clustered_state()
    assert (state.model.num_classes, state.model.num_clusters) == (0, 3)
    assert "label_projection" in state.params["discriminator"]
    assert max_abs_diff(placeholder.clusters, state.clusters) > 0
    np.testing.assert_allclose(state.clusters["cum_share"], [1 / 3, 2 / 3, 1], atol=1e-6)
    # Real images are labelled with their nearest centre.
    grey = {"image": jnp.full((2, 28, 28, 1), 0.5), "label": jnp.zeros(2, jnp.int32)}
    [grey_cluster] = set(gan.real_labels(state, grey).tolist())
    np.testing.assert_allclose(state.clusters["centers"][grey_cluster], 128 / 255, atol=1e-6)
    # Generation takes latents alone: each latent's cluster joins it.
    z, variables = gan.fixed_latents(state, 12), gan.sampling_variables(state, 64)
    implied = gan.latent_clusters(state, z)
    assert len(set(implied.tolist())) > 1
    images = gan.generate_with(state, variables, z)
    assert max_abs_diff(images, gan.generate_with(state, variables, z, implied)) == 0
    assert max_abs_diff(images, gan.generate_with(state, variables, z, (implied + 1) % 3)) > 0


@pytest.mark.slow
def test_train_step_conditions_on_the_real_images_clusters():
    state, batch = clustered_state(), make_batch()
    new_state, metrics = jax.jit(gan.train_step)(state, batch, key(1))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    # Other centres, other clusters for the real images: another discriminator update.
    moved = state.replace(clusters={**state.clusters, "centers": state.clusters["centers"][::-1]})
    moved_state, _ = jax.jit(gan.train_step)(moved, batch, key(1))
    assert max_abs_diff(new_state.params["discriminator"], moved_state.params["discriminator"]) > 0


def test_clusters_are_refused_beside_classes_and_beyond_the_data():
    with pytest.raises(ValueError, match="config.num_clusters conditions an unconditional GAN"):
        make_state(num_clusters=3, conditional=True)
    with pytest.raises(ValueError, match="config.num_clusters conditions an unconditional GAN"):
        make_state(num_clusters=-1)
    with pytest.raises(ValueError, match="num_clusters=30 is more than the 24 training images"):
        clustered_state(num_clusters=30)


def test_conditional_sample_grid_cycles_through_the_classes():
    state = conditional_state()
    assert gan.fixed_labels(state, 12).tolist() == list(range(10)) + [0, 1]
    assert gan.fixed_labels(make_state(), 12) is None
    assert gan.sample_grid(state, 16).shape == (2 * 30 + 2, 8 * 30 + 2, 1)


class RecordingWriter:
    def __init__(self):
        self.images = []

    def write_image(self, step, name, image):
        self.images.append((step, name, image))


def test_write_pictures_writes_a_png_and_a_tensorboard_image(tmp_path):
    state, writer = make_state(), RecordingWriter()
    gan.write_pictures(state, None, key(0), str(tmp_path), 12, writer)
    path = tmp_path / "pictures" / "samples_step12.png"
    with Image.open(path) as png:
        assert png.mode == "L"
        picture = np.asarray(png)
    [(step, name, grid)] = writer.images
    assert (step, name) == (12, "samples") and grid.dtype == np.uint8
    # 64 samples, 8 a row: 8 x 8 tiles of 28 pixels and 2-pixel separators.
    assert grid.shape == (8 * 30 + 2, 8 * 30 + 2, 1)
    np.testing.assert_array_equal(picture, grid[..., 0])
    # The same fixed latents give the same picture again.
    gan.write_pictures(state, None, key(9), str(tmp_path), 13, writer)
    np.testing.assert_array_equal(writer.images[1][2], grid)


def test_state_round_trips_through_a_checkpoint(tmp_path):
    from flaxcnn.training.checkpointing import Checkpointer

    state, _ = jax.jit(gan.train_step)(make_state(), make_batch(), key(1))
    checkpointer = Checkpointer(str(tmp_path), 1)
    checkpointer.save(state)
    checkpointer.close()
    checkpointer = Checkpointer(str(tmp_path), 1)
    restored = checkpointer.restore_or(make_state())
    checkpointer.close()
    assert int(restored.step) == 1
    assert max_abs_diff(restored, state) == 0


def test_gan_config_loads():
    path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "gan_mnist.py"
    spec = importlib.util.spec_from_file_location("gan_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert (config.task, config.model, config.adam_b1) == ("gan", "DCGAN", 0.0)
    assert config.score_samples == 10_000
    json.loads(config.to_json_best_effort())
    state = jax.eval_shape(lambda rng: gan.create_state(config, rng, (28, 28, 1), 10, 100), key(0))
    # The 1,000 clusters' rows in the generator and projections in the discriminator.
    assert config.num_clusters == 1000 and state.clusters["centers"].shape == (1000, 784)
    assert count(state.params) == 6_542_690
    assert count(state.params["generator"]) == 3_370_177  # Discriminator: 3,172,513.


@pytest.mark.slow
def test_training_loop_runs_the_gan_task(data_dir, tmp_path, tiny_config):
    from flaxcnn.runner import loop

    config = tiny_config(task="gan", model="DCGAN", learning_rate=2e-4)
    config.model_kwargs.update(TINY)
    config.adam_b1 = 0.5
    config.steps_per_dispatch = 1
    workdir = str(tmp_path / "run")
    results = loop.train_and_evaluate(config, workdir)
    assert results["steps"] == 8
    for name in ("d_loss", "g_loss", "d_real", "d_fake", "loss"):
        assert np.isfinite(results[f"test_{name}"])
    assert os.path.exists(os.path.join(workdir, "pictures", "samples_step8.png"))
    # The finished run is restored from its checkpoint, not trained again.
    assert loop.train_and_evaluate(config, workdir) == results


@pytest.mark.slow
def test_the_loop_fits_clusters_once_and_resumes_with_them(
    data_dir, tmp_path, monkeypatch, tiny_config
):
    from flaxcnn.runner import loop
    from flaxcnn.training.checkpointing import Checkpointer

    config = tiny_config(task="gan", model="DCGAN", num_clusters=4)
    config.model_kwargs.update(TINY)
    fits, fit = [], gan.fit_to_data

    def recording_fit(*args):
        state = fit(*args)
        fits.append(jax.device_get(state.clusters))  # A copy: the loop donates the state.
        return state

    monkeypatch.setattr(gan, "fit_to_data", recording_fit)
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)
    config.num_train_steps = 12  # Resumes from step 8: the checkpoint holds the clusters.
    results = loop.train_and_evaluate(config, workdir)
    assert len(fits) == 1 and results["steps"] == 12
    checkpointer = Checkpointer(workdir, 1)
    template = jax.jit(lambda rng: gan.create_state(config, rng, (28, 28, 1), 10, 12))(key(0))
    restored = checkpointer.restore_or(template)
    checkpointer.close()
    assert int(restored.step) == 12
    assert max_abs_diff(restored.clusters, fits[0]) == 0
    assert max_abs_diff(restored.clusters, template.clusters) > 0
