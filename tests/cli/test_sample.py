"""`python -m flaxcnn.sample` and the generator export, on untrained tiny runs written to a
workdir as the loop writes them (config, dataset info, checkpoint)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flaxcnn import default_config, run_files
from flaxcnn.cli import export, sample
from flaxcnn.tasks import get_task
from flaxcnn.training.checkpointing import Checkpointer

# Five untrained runs and their samplers compile for a minute: the slow suite proves them.
pytestmark = pytest.mark.slow

SHAPE = (28, 28, 1)
TINY = {
    "gan": ("DCGAN", dict(latent_dim=8, generator_widths=(8, 4), discriminator_widths=(4, 8))),
    "vae": ("ConvVAE", dict(latent_dim=2, widths=(4, 8))),
    "autoencoder": ("ConvAutoencoder", dict(latent_dim=4, widths=(4, 8))),
}


def write_run(workdir: str, task: str, conditional: bool = False, num_clusters: int = 0) -> str:
    """An untrained run of `task` in `workdir`: what `load_run` needs, and nothing else. A GAN
    with `num_clusters` gets clusters of unequal shares."""
    config = default_config.get_config()
    config.task = task
    config.model, kwargs = TINY[task]
    config.model_kwargs.update(kwargs)
    config.conditional = conditional
    config.num_clusters = num_clusters
    config.num_train_steps = 1
    os.makedirs(workdir, exist_ok=True)
    with open(run_files.path(workdir, run_files.CONFIG), "w") as f:
        f.write(config.to_json_best_effort())
    names = [str(i) for i in range(10)]
    run_files.write_dataset_info(workdir, run_files.DatasetInfo(SHAPE, 10, names))
    state = get_task(task).create_state(config, jax.random.key(0), SHAPE, 10, 1)
    if num_clusters:
        shares = jnp.arange(1, num_clusters + 1, dtype=jnp.float32)
        state = state.replace(
            clusters={
                "centers": jax.random.uniform(jax.random.key(1), (num_clusters, np.prod(SHAPE))),
                "cum_share": jnp.cumsum(shares) / jnp.sum(shares),
            }
        )
    checkpointer = Checkpointer(workdir, 1)
    checkpointer.save(state)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "gan": write_run(str(root / "gan"), "gan"),
        "cgan": write_run(str(root / "cgan"), "gan", conditional=True),
        "sgan": write_run(str(root / "sgan"), "gan", num_clusters=3),
        "vae": write_run(str(root / "vae"), "vae"),
        "cvae": write_run(str(root / "cvae"), "vae", conditional=True),
        "ae": write_run(str(root / "ae"), "autoencoder"),
    }


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("name", ["gan", "cgan", "sgan", "vae", "cvae"])
def test_a_grid_of_samples_is_written_and_a_seed_repeats_it(runs, tmp_path, name):
    out = tmp_path / "grid.png"
    args = ["--workdir", runs[name], "--num", "10", "--seed", "3", "--out", str(out)]
    assert sample.main(args) == 0
    grid = read_png(out)
    assert grid.shape == (2 + 2 * 30, 2 + 8 * 30)  # 10 tiles, 8 a row, 2-pixel frames.
    assert sample.main(args) == 0
    np.testing.assert_array_equal(read_png(out), grid)
    assert sample.main([*args[:-4], "--seed", "4", "--out", str(out)]) == 0
    assert not np.array_equal(read_png(out), grid)


def test_files_are_written_one_per_sample(runs, tmp_path):
    out = tmp_path / "files"
    assert sample.main(["--workdir", runs["gan"], "--num", "5", "--files", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == [f"sample_{i:04d}.png" for i in range(5)]
    assert read_png(out / "sample_0000.png").shape == (28, 28)


@pytest.mark.parametrize("name", ["cgan", "cvae"])
def test_label_draws_that_class_and_changes_the_samples(runs, tmp_path, name):
    paths = {}
    for label in ("1", "7"):
        paths[label] = tmp_path / f"{label}.png"
        args = ["--workdir", runs[name], "--num", "4", "--label", label, "--out"]
        assert sample.main([*args, str(paths[label])]) == 0
    assert not np.array_equal(read_png(paths["1"]), read_png(paths["7"]))


def test_conditional_generation_has_the_labels_shape_and_is_deterministic(runs):
    from flaxcnn.inference import load_run
    from flaxcnn.tasks import gan, vae

    state = load_run(runs["cgan"], task_names=("gan",)).state
    labels = jnp.array([3, 3, 5], jnp.int32)
    a = gan.generate(state, jax.random.key(0), 3, labels)
    assert a.shape == (3, *SHAPE)
    np.testing.assert_array_equal(a, gan.generate(state, jax.random.key(0), 3, labels))
    other = gan.generate(state, jax.random.key(0), 3, jnp.array([4, 4, 5], jnp.int32))
    assert not np.array_equal(a[:2], other[:2]) and np.array_equal(a[2], other[2])
    state = load_run(runs["cvae"], task_names=("vae",)).state
    b = vae.generate(state, jax.random.key(0), 3, labels)
    assert b.shape == (3, *SHAPE)
    np.testing.assert_array_equal(b, vae.generate(state, jax.random.key(0), 3, labels))


def test_interpolation_rows_walk_between_two_latents(runs, tmp_path):
    out = tmp_path / "walk.png"
    args = ["--workdir", runs["gan"], "--num", "3", "--interpolate", "--out", str(out)]
    assert sample.main(args) == 0
    grid = read_png(out)
    assert grid.shape == (2 + 3 * 30, 2 + sample.INTERPOLATION_STEPS * 30)
    z = sample.interpolation_latents(jax.random.key(0), 3, 8)
    steps = np.asarray(z).reshape(3, sample.INTERPOLATION_STEPS, 8)
    np.testing.assert_allclose(np.diff(steps, 2, axis=1), 0, atol=1e-5)  # Straight lines.


def test_the_manifold_of_a_two_latent_vae(runs, tmp_path):
    out = tmp_path / "manifold.png"
    assert sample.main(["--workdir", runs["vae"], "--manifold", "--out", str(out)]) == 0
    assert read_png(out).shape == (2 + 20 * 30, 2 + 20 * 30)


def test_autoencoder_reconstructs_image_files(runs, tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(np.full((40, 30), 50 * i, np.uint8)).save(paths[-1])
    out = tmp_path / "rec.png"
    assert sample.main(["--workdir", runs["ae"], "--images", *paths, "--out", str(out)]) == 0
    grid = read_png(out)
    assert grid.shape == (2 + 2 * 30, 2 + 3 * 30)  # Originals above reconstructions.
    assert grid[2:30, 2 + 30 : 30 + 30].min() == 50  # The second original, resized.


@pytest.mark.parametrize(
    "name, extra, message",
    [
        ("gan", ["--label", "1"], "--label needs a class-conditional run"),
        ("sgan", ["--label", "1"], "--label needs a class-conditional run"),
        ("cgan", ["--label", "10"], "--label must be in [0, 9]"),
        ("gan", ["--manifold"], "--manifold needs a VAE with 2 latents"),
        ("gan", ["--images", "x.png"], "a gan run has no encoder"),
        ("ae", [], "give --images"),
        ("ae", ["--images", "/no/such.png"], "/no/such.png"),
        ("vae", ["--num", "0"], "--num must be positive"),
        ("vae", ["--manifold", "--interpolate"], "choose one of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, name, extra, message):
    assert sample.main(["--workdir", runs[name], "--out", str(tmp_path / "x.png"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_workdir_without_a_run_is_refused(tmp_path, capsys):
    assert sample.main(["--workdir", str(tmp_path)]) == 2
    assert "holds no training run" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["gan", "cgan", "sgan"])
def test_the_exported_generator_matches_the_sampler(runs, tmp_path, name):
    from flaxcnn.inference import load_run
    from flaxcnn.tasks import gan

    out = str(tmp_path / "export")
    assert export.main(["--workdir", runs[name], "--out", out, "--platforms", "cpu"]) == 0
    with open(os.path.join(out, export.GENERATOR_FILE), "rb") as f:
        exported = jax.export.deserialize(f.read())
    with open(os.path.join(out, export.METADATA_FILE)) as f:
        metadata = json.load(f)
    assert metadata["output"] == {"name": "images", "dtype": "uint8", "shape": ["batch", *SHAPE]}
    state = load_run(runs[name], task_names=("gan",)).state
    variables = gan.sampling_variables(state)
    for batch in (1, 6):
        z = jax.random.normal(jax.random.key(batch), (batch, 8))
        labels = jnp.arange(batch, dtype=jnp.int32) % 10 if name == "cgan" else None
        args = (z,) if labels is None else (z, labels)
        images = np.asarray(exported.call(*args))
        assert images.dtype == np.uint8 and images.shape == (batch, *SHAPE)
        expected = np.asarray(gan.generate_with(state, variables, z, labels)) * 255
        assert np.max(np.abs(images - expected)) <= 0.5 + 1e-3  # Rounded to the nearest.
