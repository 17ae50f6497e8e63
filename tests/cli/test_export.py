"""Exported models (StableHLO via jax.export, TensorFlow SavedModel via jax2tf) compute what
the Flax model computes, for batch sizes of every kind, on real test images."""

import json
import os

import jax
import numpy as np
import pytest

from flaxcnn import inference
from flaxcnn.cli import export
from flaxcnn.data import input_pipeline
from flaxcnn.models.test_time import ViewAveraged
from flaxcnn.runner import loop
from flaxcnn.tasks import classification

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def exported(data_dir, tmp_path_factory, tiny_config) -> tuple[inference.Run, str]:
    """A short run, exported by the command: (the run, the export dir)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    loop.train_and_evaluate(tiny_config(num_train_steps=4), workdir)
    out = str(tmp_path_factory.mktemp("export"))
    assert export.main(["--workdir", workdir, "--out", out]) == 0
    return inference.load_run(workdir), out


@pytest.fixture(scope="module")
def images(data_dir) -> np.ndarray:
    return input_pipeline.load_split("embedded_mnist", "test[:64]", data_dir).images


def load_stablehlo(out: str):
    with open(os.path.join(out, export.STABLEHLO_FILE), "rb") as f:
        return jax.export.deserialize(f.read())


def load_saved_model(out: str):
    import tensorflow as tf

    return tf.saved_model.load(os.path.join(out, export.SAVED_MODEL_DIR))


def serve(saved_model, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The SavedModel's outputs through its serving signature and its restored function."""
    import tensorflow as tf

    signature = saved_model.signatures[export.SIGNATURE]
    assert signature.structured_input_signature[1]["images"].dtype == tf.uint8
    served = signature(images=tf.constant(batch))["probabilities"].numpy()
    return served, saved_model.predict(tf.constant(batch))["probabilities"].numpy()


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_stablehlo_matches_the_flax_model(exported, images, batch_size):
    run, out = exported
    model = load_stablehlo(out)
    assert str(model.in_avals[0].shape[0]) == "b"  # One artifact for every batch size.
    assert model.in_avals[0].dtype == np.uint8 and set(model.platforms) == {"cpu", "cuda"}
    batch = images[:batch_size]
    np.testing.assert_allclose(model.call(batch), run.predict_proba(batch), atol=TOLERANCE)


@pytest.fixture(scope="module")
def saved_model(exported):
    return load_saved_model(exported[1])


@pytest.mark.slow  # Imports TensorFlow and converts the model: the slow suite proves it.
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_saved_model_matches_the_flax_model(exported, saved_model, images, batch_size):
    run, _ = exported
    batch = images[:batch_size]
    expected = run.predict_proba(batch)
    for output in serve(saved_model, batch):
        np.testing.assert_allclose(output, expected, atol=TOLERANCE)


def test_batch_norm_model_exports_its_statistics(images, tmp_path, tiny_config):
    """The CNN (batch norm in inference mode), with random weights and statistics."""
    config = tiny_config(data_dir=None, model="CNN")
    config.model_kwargs.widths = (4, 8)
    abstract = jax.eval_shape(
        lambda rng: classification.create_state(config, rng, (28, 28, 1), 10, 10),
        jax.random.key(0),
    )
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: rng.uniform(0.5, 1.5, x.shape).astype(x.dtype), abstract)
    assert state.batch_stats  # Means and variances, which inference must use.
    run = inference.Run(
        str(tmp_path), config, state, (28, 28, 1), 10, list("abcdefghij"), 0, "latest"
    )
    export.export_run(run, str(tmp_path / "out"), platforms=("cpu",))
    batch = images[:3]
    expected = run.predict_proba(batch)
    np.testing.assert_allclose(
        load_stablehlo(str(tmp_path / "out")).call(batch), expected, atol=TOLERANCE
    )
    for output in serve(load_saved_model(str(tmp_path / "out")), batch):
        np.testing.assert_allclose(output, expected, atol=TOLERANCE)


def test_a_normalised_run_with_test_time_views_exports_what_it_was_tested_with(
    data_dir, tmp_path, tiny_config
):
    config = tiny_config(num_train_steps=4, normalize="dataset")
    config.test_time_augment.flip, config.test_time_augment.shift = True, 1
    workdir = str(tmp_path / "run")
    results = loop.train_and_evaluate(config, workdir)
    out = str(tmp_path / "export")
    assert export.main(["--workdir", workdir, "--out", out, "--platforms", "cpu"]) == 0
    run = inference.load_run(workdir)
    assert isinstance(run.apply_fn.__self__, ViewAveraged) and run.mean is not None
    test = input_pipeline.load_split("embedded_mnist", config.test_split, data_dir)
    probabilities = run.predict_proba(test.images)
    # Predict classifies the test split as the run's test evaluation did ...
    accuracy = np.mean(np.argmax(probabilities, -1) == test.labels)
    assert accuracy == pytest.approx(results["test_accuracy"])
    # ... and the exported model computes predict's probabilities.
    batch = test.images[:9]
    np.testing.assert_allclose(load_stablehlo(out).call(batch), probabilities[:9], atol=TOLERANCE)


def test_metadata_and_errors(exported, tmp_path, capsys):
    run, out = exported
    with open(os.path.join(out, export.METADATA_FILE)) as f:
        metadata = json.load(f)
    assert metadata["input"] == {"dtype": "uint8", "shape": ["batch", 28, 28, 1]}
    assert metadata["class_names"] == run.class_names and metadata["step"] == 4
    assert export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not os.path.exists(tmp_path / "o")
