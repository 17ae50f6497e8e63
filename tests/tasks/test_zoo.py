"""The model zoo beyond the CNN: the row-by-row RNN classifier, the convolutional autoencoder
and the convolutional VAE, with their tasks, configs and pictures."""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from PIL import Image

from flaxcnn.cpu import rewrite as cpu_rewrite
from flaxcnn.models import create_model
from flaxcnn.models.autoencoder import ConvTranspose2x, StridedConv
from flaxcnn.reporting import pictures
from flaxcnn.tasks import autoencoder, classification, get_task, vae
from flaxcnn.training.state import create_train_state

REPO = pathlib.Path(__file__).resolve().parents[2]

# name: (task, model, tiny model kwargs): every zoo model in a size that compiles and steps fast.
TINY = {
    "rnn_lstm": ("classification", "RNN", {"cell": "lstm", "hidden_size": 16}),
    "rnn_gru": ("classification", "RNN", {"cell": "gru", "hidden_size": 16}),
    "autoencoder": ("autoencoder", "ConvAutoencoder", {"latent_dim": 8, "widths": (8, 16)}),
    "vae": ("vae", "ConvVAE", {"latent_dim": 8, "widths": (8, 16)}),
}


def key(seed: int) -> jax.Array:
    """A PRNG key of the "rbg" kind: these tests are mostly compilation, and XLA:CPU compiles
    threefry's unrolled rounds (the default kind) several times slower."""
    return jax.random.key(seed, impl="rbg")


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def max_abs_diff(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@functools.cache
def mnist_batch(size: int = 16) -> dict:
    """Real MNIST digits (from the embedded dataset) and their labels."""
    data = np.load(REPO / "flaxcnn" / "data" / "embedded_mnist.npz")
    return {
        "image": jnp.asarray(data["x_test"][:size, :, :, None], jnp.float32) / 255,
        "label": jnp.asarray(data["y_test"][:size], jnp.int32),
    }


@functools.cache
def make_state(name: str):
    """The task and a fresh Adam state of the tiny model `name` for MNIST; cached, so that
    the tests share the compiled steps."""
    task, model, kwargs = TINY[name]
    shape = (28, 28, 1)
    if task != "classification":
        kwargs = {**kwargs, "image_shape": shape}
    else:
        kwargs = {**kwargs, "num_classes": 10}
    # Adam over the parameters flattened into one vector: far fewer operations to compile
    # for the eager steps than one update per leaf.
    tx = optax.flatten(optax.adam(1e-2))
    init = functools.partial(
        create_train_state, create_model(model, **kwargs), tx, input_shape=shape
    )
    return get_task(task), jax.jit(init)(key(0))


@functools.cache
def jitted(function):
    return jax.jit(function)


# --- Models -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config_name, expected",
    [("rnn_mnist", 81_674), ("ae_mnist", 241_441), ("vae_mnist", 1_662_249)],
)
def test_config_models_have_the_pinned_parameter_counts(config_name, expected):
    rng = key(0)
    config = load_config(config_name)
    assert config.dataset == "mnist"
    task = get_task(config.task)
    create = functools.partial(task.create_state, config, input_shape=(28, 28, 1))
    state = jax.eval_shape(functools.partial(create, num_classes=10, total_steps=100), rng)
    assert count(state.params) == expected


def shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def test_rnn_counts_and_logits_for_both_cells():
    x = jax.ShapeDtypeStruct((3, 28, 28, 1), jnp.float32)
    for cell, expected in [("lstm", 81_674), ("gru", 61_706)]:
        model = create_model("RNN", num_classes=10, cell=cell, hidden_size=128)
        variables = jax.eval_shape(model.init, key(0), x)
        assert count(variables["params"]) == expected
        assert jax.eval_shape(model.apply, variables, x).shape == (3, 10)
    # Rows of W * C features: 32x32x3 images are 32 steps of 96 features.
    model = create_model("RNN", num_classes=7, hidden_size=8)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, key(0), x)
    assert variables["params"]["OptimizedLSTMCell_0"]["ii"]["kernel"].shape == (96, 8)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 7)


def test_rnn_rejects_an_unknown_cell():
    model = create_model("RNN", cell="tcn")
    with pytest.raises(ValueError, match="unknown cell 'tcn'; valid: gru, lstm"):
        jax.eval_shape(model.init, key(0), jnp.zeros((1, 28, 28, 1)))


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (30, 27, 2)])
def test_autoencoders_reproduce_the_input_shape(shape):
    x, rng = jax.ShapeDtypeStruct((2, *shape), jnp.float32), key(0)
    ae = create_model("ConvAutoencoder", latent_dim=4, widths=(4, 8), image_shape=shape)
    variables = jax.eval_shape(ae.init, rng, x)
    assert jax.eval_shape(ae.apply, variables, x).shape == (2, *shape)
    assert jax.eval_shape(functools.partial(ae.apply, method="encode"), variables, x).shape == (
        2,
        4,
    )

    model = create_model("ConvVAE", latent_dim=4, widths=(4, 8), image_shape=shape)
    variables = jax.eval_shape(model.init, rng, x)
    apply = functools.partial(model.apply, rngs={"sample": rng})
    logits, mean, log_variance = jax.eval_shape(apply, variables, x)
    assert logits.shape == (2, *shape) and mean.shape == log_variance.shape == (2, 4)
    z = jax.ShapeDtypeStruct((5, 4), jnp.float32)
    generate = functools.partial(model.apply, method="generate")
    assert jax.eval_shape(generate, variables, z).shape == (5, *shape)


def test_autoencoder_reconstructions_lie_in_the_unit_interval():
    _, state = make_state("autoencoder")
    reconstructions = autoencoder.reconstruct(state, mnist_batch()["image"])
    assert reconstructions.shape == (16, 28, 28, 1)
    assert bool(jnp.all((reconstructions >= 0) & (reconstructions <= 1)))


def test_autoencoder_rejects_images_of_another_shape():
    model = create_model("ConvAutoencoder", image_shape=(28, 28, 1))
    with pytest.raises(ValueError, match=r"expected images of shape \(28, 28, 1\)"):
        jax.eval_shape(model.init, key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize(
    "ours, reference, shape, out_shape",
    [
        (StridedConv(4), nn.Conv(4, (3, 3), strides=(2, 2)), (2, 6, 7, 3), (2, 3, 4, 4)),
        (
            ConvTranspose2x(4, 3),
            nn.ConvTranspose(4, (3, 3), strides=(2, 2)),
            (2, 5, 6, 3),
            (2, 10, 12, 4),
        ),
    ],
    ids=["strided_conv", "conv_transpose_2x"],
)
@pytest.mark.parametrize("as_matmuls", [True, False], ids=["matmuls", "as_on_this_machine"])
def test_resampling_layers_are_their_flax_counterparts(
    ours, reference, shape, out_shape, as_matmuls, monkeypatch
):
    if as_matmuls:  # Also where oneDNN convolves: the routes of every other machine.
        monkeypatch.setattr(cpu_rewrite, "convolutions_by_onednn", lambda: False)
    x = jax.random.normal(key(1), shape)
    variables = reference.init(key(0), x)
    variables = jax.tree.map(lambda p: p + 0.1, variables)  # Nonzero biases too.
    assert shapes(jax.eval_shape(ours.init, key(0), x)) == shapes(variables)

    def outputs_and_grads(apply):
        def loss(v, x):
            return jnp.sum(jnp.sin(apply(v, x)))

        return apply(variables, x), jax.grad(loss, argnums=(0, 1))(variables, x)

    # Ours as training runs it (with the rewrite on CPUs), the reference as Flax has it.
    ours_out, ours_grads = jax.jit(outputs_and_grads, static_argnums=0)(
        cpu_rewrite.for_this_backend(ours.apply)
    )
    reference_out, reference_grads = jax.jit(outputs_and_grads, static_argnums=0)(reference.apply)
    assert ours_out.shape == out_shape
    np.testing.assert_allclose(ours_out, reference_out, atol=1e-5)
    assert max_abs_diff(ours_grads, reference_grads) < 1e-4


def test_vae_without_a_sample_rng_decodes_the_posterior_mean():
    _, state = make_state("vae")
    x = mnist_batch()["image"]

    @jax.jit
    def logits_decoded_and_sampled(state):
        logits, mean, _ = state.apply_fn(state.variables(), x)
        decoded = state.apply_fn(state.variables(), mean, method="decode_logits")
        sampled, _, _ = state.apply_fn(state.variables(), x, rngs={"sample": key(3)})
        return logits, decoded, sampled

    logits, decoded, sampled = logits_decoded_and_sampled(state)
    np.testing.assert_allclose(logits, decoded, atol=1e-5)
    assert max_abs_diff(sampled, logits) > 1e-4


# --- Steps --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rnn_lstm", "autoencoder", "vae"])
def test_train_step_changes_params_and_jit_equals_eager(name):
    task, state = make_state(name)
    batch, rng = mnist_batch(), key(1)
    eager_state, eager_metrics = task.train_step(state, batch, rng)
    jit_state, jit_metrics = jitted(task.train_step)(state, batch, rng)
    assert int(eager_state.step) == 1
    assert max_abs_diff(eager_state.params, state.params) > 0
    assert all(np.isfinite(float(v)) for v in eager_metrics.values())
    assert float(eager_metrics["count"]) == 16
    assert max_abs_diff(eager_state.params, jit_state.params) < 1e-5
    np.testing.assert_allclose(eager_metrics["loss"], jit_metrics["loss"], rtol=1e-5)


@pytest.mark.parametrize(
    "name",
    [
        n if n in ("rnn_lstm", "autoencoder") else pytest.param(n, marks=pytest.mark.slow)
        for n in sorted(TINY)
    ],
)
def test_steps_on_one_batch_drive_the_loss_down(name):
    task, state = make_state(name)
    batch, rng = mnist_batch(), key(1)
    train_step = jitted(task.train_step)
    losses = []
    for _ in range(40):
        state, metrics = train_step(state, batch, rng)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses


def test_vae_train_step_draws_fresh_samples_each_step():
    # The same run key, folded with the step: two steps on the same parameters differ.
    _, state = make_state("vae")
    batch, rng = mnist_batch(), key(1)
    _, metrics_0 = jitted(vae.train_step)(state, batch, rng)
    _, metrics_1 = jitted(vae.train_step)(state.replace(step=state.step + 1), batch, rng)
    assert float(metrics_0["loss"]) != float(metrics_1["loss"])


def test_autoencoder_eval_honours_the_mask():
    _, state = make_state("autoencoder")
    batch = mnist_batch()
    mask = jnp.arange(16) < 10
    eval_step = jitted(autoencoder.eval_step)
    masked = eval_step(state, {**batch, "mask": mask}, key(0))
    first10 = eval_step(state, jax.tree.map(lambda x: x[:10], batch), key(0))
    full = eval_step(state, batch, key(0))
    assert set(masked) == {"loss", "mse", "count"}
    assert float(masked["count"]) == 10 and float(full["count"]) == 16
    np.testing.assert_allclose(masked["loss"], first10["loss"], rtol=1e-5)
    np.testing.assert_allclose(masked["mse"], first10["mse"], rtol=1e-5)
    assert float(full["loss"]) > float(masked["loss"])


def test_autoencoder_mse_is_the_per_pixel_mean_squared_error():
    _, state = make_state("autoencoder")
    batch = mnist_batch()
    metrics = jitted(autoencoder.eval_step)(state, batch, key(0))
    reconstructions = np.asarray(autoencoder.reconstruct(state, batch["image"]), np.float64)
    expected = np.mean((reconstructions - np.asarray(batch["image"], np.float64)) ** 2)
    np.testing.assert_allclose(metrics["mse"] / 16, expected, rtol=1e-5)


def test_vae_eval_is_deterministic_per_rng_and_masked():
    _, state = make_state("vae")
    batch = {**mnist_batch(), "mask": jnp.arange(16) < 12}
    eval_step = jitted(vae.eval_step)
    a = eval_step(state, batch, key(5))
    b = eval_step(state, batch, key(5))
    c = eval_step(state, batch, key(6))
    assert set(a) == {"loss", "reconstruction", "kl", "count"}
    assert max_abs_diff(a, b) == 0 and float(a["count"]) == 12
    assert float(a["reconstruction"]) != float(c["reconstruction"])
    np.testing.assert_allclose(a["loss"], a["reconstruction"] + a["kl"], rtol=1e-6)
    assert float(a["kl"]) >= 0
    # The masked-out images play no part.
    other = {**batch, "image": batch["image"].at[12:].set(1.0)}
    assert max_abs_diff(eval_step(state, other, key(5)), a) == 0


def test_kl_divergence_is_zero_at_the_prior_and_matches_the_closed_form():
    zeros = jnp.zeros((3, 5))
    np.testing.assert_array_equal(vae.kl_divergence(zeros, zeros), np.zeros(3))
    # KL(N(1, 1) || N(0, 1)) = 1/2 per latent; KL(N(0, e) || N(0, 1)) = (e - 2) / 2.
    np.testing.assert_allclose(vae.kl_divergence(jnp.ones((1, 4)), jnp.zeros((1, 4))), [2.0])
    np.testing.assert_allclose(
        vae.kl_divergence(jnp.zeros((1, 1)), jnp.ones((1, 1))), [(np.e - 2) / 2], rtol=1e-6
    )


def test_negative_elbo_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 2, 3, 1)).astype(np.float32)
    images = rng.random((2, 2, 3, 1)).astype(np.float32)
    mean = rng.normal(size=(2, 3)).astype(np.float32)
    log_variance = rng.normal(size=(2, 3)).astype(np.float32)
    weights = np.array([1.0, 0.0], np.float32)  # Only the first image counts.

    p = 1 / (1 + np.exp(-logits[0].astype(np.float64)))
    x = images[0]
    reconstruction = -np.sum(x * np.log(p) + (1 - x) * np.log(1 - p))
    variance = np.exp(log_variance[0].astype(np.float64))
    kl = 0.5 * np.sum(variance + mean[0] ** 2 - 1 - log_variance[0])

    metrics = vae.vae_metrics(logits, images, mean, log_variance, weights)
    np.testing.assert_allclose(metrics["reconstruction"], reconstruction, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], reconstruction + kl, rtol=1e-5)
    assert float(metrics["count"]) == 1


def test_generate_and_sample_from_the_prior():
    _, state = make_state("vae")
    images = vae.generate(state, key(0), 6)
    assert images.shape == (6, 28, 28, 1)
    assert bool(jnp.all((images >= 0) & (images <= 1)))
    np.testing.assert_array_equal(images, vae.generate(state, key(0), 6))
    assert max_abs_diff(images, vae.generate(state, key(1), 6)) > 0
    samples = vae.sample(state, key(0), 6)
    assert samples.shape == (6, 28, 28, 1)
    assert set(np.unique(np.asarray(samples))) <= {0.0, 1.0}


# --- Pictures -----------------------------------------------------------------------------


class RecordingWriter:
    def __init__(self):
        self.images = {}

    def write_image(self, step, name, image):
        self.images[(step, name)] = image


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_autoencoder_pictures_show_originals_above_reconstructions(tmp_path):
    _, state = make_state("autoencoder")
    images = np.asarray(mnist_batch(20)["image"])  # 20: the first two whole rows of 8 show.
    writer = RecordingWriter()
    autoencoder.write_pictures(state, images, key(0), str(tmp_path), 7, writer)
    png = read_png(tmp_path / "pictures" / "reconstruction_step7.png")
    expected = pictures.image_grid(np.zeros((32, 28, 28, 1)), 8)
    assert png.shape == expected.shape[:2]
    np.testing.assert_array_equal(writer.images[(7, "reconstruction")][..., 0], png)
    # The top left tile is the first original; the first tile of row 3, its reconstruction.
    separator = (png.shape[1] - 8 * 28) // 9
    pitch = 28 + separator
    reconstruction = np.asarray(autoencoder.reconstruct(state, images[:16]))
    for row, image in [(0, images[0]), (2, reconstruction[0])]:
        tile = pictures.image_grid(image[None], 1, separator=0)[..., 0]
        top = separator + row * pitch
        np.testing.assert_array_equal(png[top : top + 28, separator : separator + 28], tile)


def test_vae_pictures_use_fixed_prior_latents(tmp_path):
    _, state = make_state("vae")
    images = np.asarray(mnist_batch()["image"])[:8]
    writer = RecordingWriter()
    for step, seed in [(1, 0), (2, 1)]:
        vae.write_pictures(state, images, key(seed), str(tmp_path), step, writer)
    folder = tmp_path / "pictures"
    reconstruction = read_png(folder / "reconstruction_step1.png")
    assert reconstruction.shape == pictures.image_grid(np.zeros((16, 28, 28, 1)), 8).shape[:2]
    samples = read_png(folder / "samples_step1.png")
    assert samples.shape == pictures.image_grid(np.zeros((64, 28, 28, 1)), 8).shape[:2]
    # Same parameters, other rng: the same pictures.
    np.testing.assert_array_equal(samples, read_png(folder / "samples_step2.png"))
    np.testing.assert_array_equal(reconstruction, read_png(folder / "reconstruction_step2.png"))
    assert set(writer.images) == {(s, n) for s in (1, 2) for n in ("reconstruction", "samples")}


def test_zoo_configs_name_registered_tasks_and_models():
    for name, task, model in [
        ("rnn_mnist", classification, "RNN"),
        ("ae_mnist", autoencoder, "ConvAutoencoder"),
        ("vae_mnist", vae, "ConvVAE"),
    ]:
        config = load_config(name)
        assert get_task(config.task) is task and config.model == model
        assert "python -m flaxcnn.main" in (REPO / "configs" / f"{name}.py").read_text()
