"""Per-channel normalisation: statistics against numpy, the one input function in numpy and
JAX, the settings it accepts, and prediction and both exports of a normalised model equal
to the Flax model on normalised input."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxcnn import config as config_lib
from flaxcnn import default_config, inference, run_files
from flaxcnn.data import device_data, input_pipeline, preprocess
from flaxcnn.runtime import sharding

TOLERANCE = 1e-5
MEAN, STD = (0.2, 0.5, 0.7), (0.1, 0.25, 0.3)


def uint8_images(n=10, height=6, width=5, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, channels), np.uint8)


def reference(images, mean=None, std=None):
    """float64 numpy: scale to [0, 1], then standardise."""
    x = images.astype(np.float64) / 255 if images.dtype == np.uint8 else images.astype(np.float64)
    return x if mean is None else (x - np.asarray(mean)) / np.asarray(std)


# --- Statistics ----------------------------------------------------------------------------


def test_channel_stats_match_numpy_and_not_the_chunking(monkeypatch):
    images = uint8_images(n=23)
    x = images.astype(np.float64) / 255
    stats = preprocess.channel_stats(images)
    np.testing.assert_allclose(stats.mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(stats.std, x.std(axis=(0, 1, 2)), rtol=1e-12)
    monkeypatch.setattr(preprocess, "_CHUNK", 4)
    assert preprocess.channel_stats(images) == stats
    assert preprocess.channel_stats(images[::-1]) == stats


def test_channel_stats_of_a_constant_channel_and_bad_input():
    images = uint8_images()
    images[..., 1] = 51
    stats = preprocess.channel_stats(images)
    assert stats.mean[1] == 0.2 and stats.std[1] == 0.0
    with pytest.raises(ValueError, match="constant"):
        preprocess.resolve_normalization("dataset", images)
    with pytest.raises(ValueError, match="uint8"):
        preprocess.channel_stats(images.astype(np.float32))


def test_resolve_config_uses_the_training_images_it_is_given():
    train, test = uint8_images(seed=1), uint8_images(seed=2) // 2
    config = default_config.get_config()
    config.normalize = "dataset"
    stats = preprocess.resolve_config(config, train)
    assert stats == preprocess.channel_stats(train)
    assert stats != preprocess.channel_stats(np.concatenate([train, test]))
    # The numbers replace "dataset" in the config, so config.json and the steps see them.
    assert config.normalize == (stats.mean, stats.std)
    assert preprocess.from_config(config) == stats


def test_resolve_config_of_none_and_of_a_config_without_the_key():
    config = default_config.get_config()
    assert preprocess.resolve_config(config, uint8_images()) is None
    assert config.normalize == "none" and preprocess.from_config(config) is None
    old = ml_collections.ConfigDict({"task": "classification", "normalize": "dataset"})
    assert preprocess.resolve_config(old, uint8_images()) == preprocess.channel_stats(
        uint8_images()
    )


# --- Settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "normalize, expected",
    [
        ("none", None),
        (None, None),
        ("dataset", "dataset"),
        ((MEAN, STD), preprocess.Normalization(MEAN, STD)),
        ([list(MEAN), list(STD)], preprocess.Normalization(MEAN, STD)),
        ((0.5, 0.25), preprocess.Normalization((0.5,) * 3, (0.25,) * 3)),
        ("((0.5,), (0.25,))", preprocess.Normalization((0.5,) * 3, (0.25,) * 3)),
    ],
)
def test_parse_accepts(normalize, expected):
    assert preprocess.parse(normalize, 3) == expected


@pytest.mark.parametrize(
    "normalize, message",
    [
        ("mean", "'none', 'dataset'"),
        ((0.5,), "pair"),
        (((0.5, 0.5), (0.2, 0.2)), "2 mean values for 3-channel"),
        ((MEAN, (0.1, 0.2)), "3 means but 2 stds"),
        ((MEAN, (0.1, 0.0, 0.2)), r"std in \(0, 1\]"),
        (((125.3, 123.0, 113.9), STD), "divide 0..255 values by 255"),
        (("a", STD), "numbers"),
    ],
)
def test_parse_rejects(normalize, message):
    with pytest.raises(ValueError, match=message):
        preprocess.parse(normalize, 3)


@pytest.mark.parametrize("task", ["autoencoder", "vae", "gan"])
def test_tasks_whose_targets_are_images_reject_normalisation(task, tiny_config):
    preprocess.check_normalizable(task, "none")
    preprocess.check_normalizable("classification", "dataset")
    for normalize in ("dataset", (MEAN, STD)):
        with pytest.raises(ValueError, match=f"the {task} task"):
            preprocess.check_normalizable(task, normalize)
    config = tiny_config(data_dir=None, task=task, normalize="dataset")
    with pytest.raises(ValueError, match="normalize='none'"):
        preprocess.resolve_config(config, uint8_images())


def test_the_command_line_takes_every_form_of_normalize():
    for text, value in [
        ("dataset", "dataset"),
        ("none", "none"),
        ("((0.5,),(0.25,))", ((0.5,), (0.25,))),
    ]:
        config = config_lib.load(None, [("normalize", text)])
        assert config.normalize == value
        config_lib.validate(config)
    assert '"normalize": "none"' in default_config.get_config().to_json_best_effort()


# --- The one input function ----------------------------------------------------------------


@pytest.mark.parametrize("normalization", [(None, None), (MEAN, STD)])
def test_to_model_input_numpy_jax_jit_and_reference_agree(normalization):
    images = uint8_images()
    x = preprocess.to_model_input(images, *normalization)
    assert isinstance(x, np.ndarray) and x.dtype == np.float32
    np.testing.assert_allclose(x, reference(images, *normalization), atol=1e-6)
    on_device = preprocess.to_model_input(jnp.asarray(images), *normalization)
    assert isinstance(on_device, jax.Array) and on_device.dtype == jnp.float32
    # XLA:CPU's float32 division may differ from numpy's in the last bit.
    np.testing.assert_allclose(on_device, x, atol=1e-6)
    jitted = jax.jit(functools.partial(preprocess.to_model_input, mean=normalization[0]))
    np.testing.assert_allclose(jitted(jnp.asarray(images), std=normalization[1]), x, atol=1e-6)
    # Floats in [0, 1] are taken as already scaled.
    np.testing.assert_array_equal(
        preprocess.to_model_input(images.astype(np.float32) / np.float32(255), *normalization), x
    )


def test_from_model_input_undoes_the_standardisation():
    x = preprocess.to_model_input(uint8_images(), MEAN, STD)
    np.testing.assert_allclose(
        preprocess.from_model_input(x, MEAN, STD), reference(uint8_images()), atol=1e-6
    )
    assert preprocess.from_model_input(x) is x


def test_gather_batch_standardises_with_the_split_s_numbers():
    images = uint8_images(n=12)
    split = input_pipeline.Split(images, np.arange(12, dtype=np.int32) % 3, 3)
    mesh = sharding.create_mesh()
    plain = device_data.put_split(split, mesh)
    data = device_data.with_normalization(plain, preprocess.Normalization(MEAN, STD), mesh)
    assert device_data.with_normalization(plain, None, mesh) is plain
    indices = jnp.array([3, 0, 7], jnp.int32)
    batch = jax.jit(device_data.gather_batch)(data, indices)
    expected = preprocess.to_model_input(images[[3, 0, 7]], MEAN, STD)
    np.testing.assert_allclose(batch["image"], expected, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], [0, 0, 1])
    np.testing.assert_allclose(
        device_data.gather_batch(plain, indices)["image"],
        images[[3, 0, 7]].astype(np.float32) / np.float32(255),
        atol=1e-6,
    )


def test_dataset_info_keeps_the_normalisation(tmp_path):
    info = run_files.DatasetInfo((6, 5, 3), 3, ["a", "b", "c"], MEAN, STD)
    run_files.write_dataset_info(str(tmp_path), info)
    assert run_files.read_dataset_info(str(tmp_path)) == info
    # A dataset info without mean and std reads as not normalised.
    path = run_files.path(str(tmp_path), run_files.DATASET_INFO)
    with open(path, "w") as f:
        json.dump({"image_shape": [6, 5, 3], "num_classes": 3, "class_names": ["a", "b", "c"]}, f)
    assert run_files.read_dataset_info(str(tmp_path)).mean is None


# --- Prediction and export of a normalised model -------------------------------------------


@pytest.fixture(scope="module")
def normalised_run(tmp_path_factory, tiny_config) -> inference.Run:
    """A CNN as initialised, with random batch statistics, and the normalisation MEAN, STD."""
    from flaxcnn.tasks import classification

    config = tiny_config(data_dir=None, model="CNN")
    config.model_kwargs.widths = (4, 8)
    state = jax.jit(lambda rng: classification.create_state(config, rng, (12, 10, 3), 5, 10))(
        jax.random.key(0)
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(x.dtype), state.params)
    stats = jax.tree.map(
        lambda x: rng.uniform(0.5, 1.5, x.shape).astype(x.dtype), state.batch_stats
    )
    state = state.replace(params=params, batch_stats=stats)
    workdir = str(tmp_path_factory.mktemp("run"))
    return inference.Run(
        workdir, config, state, (12, 10, 3), 5, list("abcde"), 0, "latest", MEAN, STD
    )


def test_predict_proba_is_the_model_on_standardised_input(normalised_run):
    run, images = normalised_run, uint8_images(n=7, height=12, width=10)
    expected = jax.nn.softmax(
        run.apply_fn(run.variables, reference(images, MEAN, STD).astype(np.float32), train=False)
    )
    np.testing.assert_allclose(run.predict_proba(images), expected, atol=TOLERANCE)
    unnormalised = dataclasses.replace(run, mean=None, std=None)
    assert np.max(np.abs(unnormalised.predict_proba(images) - expected)) > 1e-3


def test_both_exports_of_a_normalised_model_match_predict(normalised_run, tmp_path):
    import tensorflow as tf

    from flaxcnn.cli import export

    run, images = normalised_run, uint8_images(n=5, height=12, width=10)
    metadata = export.export_run(run, str(tmp_path), platforms=("cpu",))
    assert metadata["normalization"] == {"mean": MEAN, "std": STD}
    assert metadata["input"] == {"dtype": "uint8", "shape": ["batch", 12, 10, 3]}
    expected = run.predict_proba(images)
    with open(os.path.join(tmp_path, export.STABLEHLO_FILE), "rb") as f:
        exported = jax.export.deserialize(f.read())
    np.testing.assert_allclose(exported.call(images), expected, atol=TOLERANCE)
    saved = tf.saved_model.load(os.path.join(tmp_path, export.SAVED_MODEL_DIR))
    served = saved.signatures[export.SIGNATURE](images=tf.constant(images))["probabilities"]
    np.testing.assert_allclose(served.numpy(), expected, atol=TOLERANCE)


# --- A normalised run, end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def normalised_training(data_dir, tmp_path_factory, tiny_config) -> tuple[str, dict]:
    """(workdir, results) of a short classification run with normalize="dataset"."""
    from flaxcnn.runner import loop

    workdir = str(tmp_path_factory.mktemp("normalised"))
    config = tiny_config(num_train_steps=8, normalize="dataset")
    config.augment.update(crop=2, flip_horizontal=True)
    return workdir, loop.train_and_evaluate(config, workdir)


def test_a_run_records_the_statistics_of_its_training_split_only(
    normalised_training, data_dir, tiny_config
):
    workdir, _ = normalised_training
    config = tiny_config()
    split = functools.partial(input_pipeline.load_split, config.dataset, data_dir=data_dir)
    expected = preprocess.channel_stats(split(config.train_split).images)
    others = np.concatenate([split(config.validation_split).images, split("test").images])
    assert preprocess.channel_stats(others) != expected
    info = run_files.read_dataset_info(workdir)
    assert (info.mean, info.std) == expected and len(info.mean) == 1
    saved = run_files.read_json(run_files.path(workdir, run_files.CONFIG))
    assert saved["normalize"] == [list(expected.mean), list(expected.std)]
    assert inference.load_run(workdir).normalization == expected


def test_evaluate_and_predict_of_a_normalised_run_agree_with_its_test_results(
    normalised_training, data_dir
):
    from flaxcnn.cli import evaluate

    workdir, results = normalised_training
    run = inference.load_run(workdir)
    split = run.config.test_split
    assert evaluate.main(["--workdir", workdir, "--split", split]) == 0
    evaluated = run_files.read_json(evaluate.output_paths(run, split)[0])
    assert evaluated["accuracy"] == results["test_accuracy"]
    np.testing.assert_allclose(evaluated["loss"], results["test_loss"], rtol=1e-5)
    test = input_pipeline.load_split(run.config.dataset, split, data_dir)
    predicted = run.predict_proba(test.images).argmax(axis=-1)
    assert np.mean(predicted == test.labels) == results["test_accuracy"]


def test_image_target_tasks_refuse_normalisation_in_one_line(tmp_path, capsys):
    from flaxcnn.cli import train

    with pytest.raises(SystemExit) as exit_info:
        train.run(
            [
                "--workdir",
                str(tmp_path),
                "--config.task=autoencoder",
                "--config.model=ConvAutoencoder",
            ]
            + ["--config.normalize=dataset"]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "normalize='none'" in err and "\n" not in err
