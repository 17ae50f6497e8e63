"""A trained run outside the loop: load_run, evaluate and predict (in-process and CLI)."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from flaxcnn import inference
from flaxcnn.cli import evaluate, predict
from flaxcnn.data import input_pipeline
from flaxcnn.reporting import reports
from flaxcnn.runner import loop


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory, tiny_config) -> tuple[str, dict]:
    """A run of 8 steps tested on the whole test split: (workdir, results)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(num_train_steps=8, test_split="test")
    return workdir, loop.train_and_evaluate(config, workdir)


@pytest.fixture(scope="module")
def run(trained) -> inference.Run:
    return inference.load_run(trained[0])


@pytest.fixture(scope="module")
def test_split(data_dir) -> input_pipeline.Split:
    return input_pipeline.load_split("embedded_mnist", "test", data_dir)


def test_load_run_restores_the_trained_model(trained, run, test_split):
    _, results = trained
    assert (run.step, run.which, run.image_shape, run.num_classes) == (8, "latest", (28, 28, 1), 10)
    assert run.class_names == [str(i) for i in range(10)]
    probabilities = run.predict_proba(test_split.images)
    assert probabilities.shape == (2000, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    # The restored weights are the trained ones: the loop's test accuracy (to a near-tie
    # example or two, as batches of another size may round differently).
    accuracy = np.mean(probabilities.argmax(axis=1) == test_split.labels)
    assert accuracy == pytest.approx(results["test_accuracy"], abs=2 / 2000)


def test_predict_proba_takes_uint8_or_float_in_any_batch_size(run, test_split):
    images = test_split.images[:37]
    reference = run.predict_proba(images)
    np.testing.assert_allclose(run.predict_proba(images.astype(np.float32) / 255), reference)
    np.testing.assert_allclose(run.predict_proba(images, batch_size=8), reference, atol=1e-6)
    np.testing.assert_allclose(run.predict_proba(images[:, :, :, 0])[:3], reference[:3])
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\]"):
        run.predict_proba(images.astype(np.float32))
    with pytest.raises(ValueError, match=r"the model takes \(28, 28, 1\)"):
        run.predict_proba(np.zeros((2, 28, 28, 3), np.uint8))


def test_load_run_errors(tmp_path, trained):
    with pytest.raises(ValueError, match="holds no training run: config.json is missing"):
        inference.load_run(str(tmp_path))
    shutil.copy(os.path.join(trained[0], "config.json"), tmp_path)
    with pytest.raises(ValueError, match="has no checkpoint"):
        inference.load_run(str(tmp_path))
    with pytest.raises(ValueError, match="which must be one of latest, best"):
        inference.load_run(trained[0], which="newest")


def test_config_round_trips_with_tuples_and_new_defaults(tmp_path, trained):
    with open(os.path.join(trained[0], "config.json")) as f:
        saved = json.load(f)
    saved["model_kwargs"] = {"widths": [4, 8]}
    del saved["keep_checkpoints"]  # As if the key were added after the run.
    with open(tmp_path / "config.json", "w") as f:
        json.dump(saved, f)
    config = inference.load_config(str(tmp_path))
    assert config.model_kwargs.widths == (4, 8)  # Hashable again, as Flax modules need.
    assert config.keep_checkpoints == 3 and config.dataset == "embedded_mnist"


def test_best_checkpoint_when_present_else_latest(tmp_path, trained, run):
    workdir = str(tmp_path / "copy")
    shutil.copytree(trained[0], workdir)
    assert inference.load_run(workdir, which="best").which == "latest"
    # A best checkpoint from step 3 with other weights, saved as the loop saves states.
    zeros = jax.tree.map(np.zeros_like, run.state.params)
    best = run.state.replace(step=3, params=zeros)
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints_best"))
    manager.save(3, args=ocp.args.StandardSave(best))
    manager.wait_until_finished()
    manager.close()
    restored = inference.load_run(workdir, which="best")
    assert (restored.which, restored.step) == ("best", 3)
    np.testing.assert_allclose(restored.predict_proba(np.zeros((1, 28, 28, 1), np.uint8)), 0.1)
    assert inference.load_run(workdir).step == 8


@pytest.mark.slow
def test_evaluate_writes_report_and_png(trained, capsys):
    workdir, results = trained
    assert evaluate.main(["--workdir", workdir, "--split", "test"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("embedded_mnist test: accuracy ") and "step 8" in line
    with open(os.path.join(workdir, "eval_test.json")) as f:
        report = json.load(f)
    assert report["count"] == 2000 and (report["step"], report["which"]) == (8, "latest")
    assert report["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-9)
    assert report["loss"] == pytest.approx(results["test_loss"], rel=1e-5)
    matrix = np.array(report["confusion_matrix"])
    assert matrix.sum() == 2000 and np.trace(matrix) / 2000 == pytest.approx(report["accuracy"])
    np.testing.assert_array_equal(matrix.sum(axis=1), [200] * 10)  # Stratified test split.
    np.testing.assert_allclose(
        list(report["per_class_accuracy"].values()), reports.per_class_accuracy(matrix)
    )
    with Image.open(os.path.join(workdir, "confusion_test.png")) as png:
        assert png.size[0] > 300

    assert evaluate.main(["--workdir", workdir, "--split", "train[90%:]", "--which", "best"]) == 0
    with open(os.path.join(workdir, "eval_train_90pct.json")) as f:
        assert json.load(f)["count"] == 1000


def test_evaluate_bad_input_is_one_line_exit_2(tmp_path, trained, capsys):
    assert evaluate.main(["--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path} holds no training run: config.json is missing\n"
    )
    assert evaluate.main(["--workdir", trained[0], "--split", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read split 'nope'")
    folder = tmp_path / "digits" / "zero"
    folder.mkdir(parents=True)
    Image.new("L", (28, 28)).save(folder / "a.png")
    args = [
        "--workdir",
        trained[0],
        "--dataset",
        f"folder:{tmp_path / 'digits'}",
        "--split",
        "train",
    ]
    assert evaluate.main(args) == 2
    assert capsys.readouterr().err.endswith(
        "has images of shape (28, 28, 3); the model takes (28, 28, 1)\n"
    )


@pytest.fixture(scope="module")
def image_files(tmp_path_factory, test_split) -> dict[str, np.ndarray]:
    """Test digits saved in several modes and sizes: {path: the original 28x28 digit}."""
    folder = tmp_path_factory.mktemp("images")
    files = {}
    kinds = [("L", 28, "png"), ("RGB", 28, "png"), ("RGBA", 28, "png"), ("P", 28, "png")]
    kinds += [("LA", 28, "png"), ("RGB", 56, "jpg"), ("L", 100, "png")]
    for i, (mode, size, ext) in enumerate(kinds):
        digit = test_split.images[i, :, :, 0]
        image = Image.fromarray(digit).convert(mode)
        if size != 28:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        path = str(folder / f"digit{i}_{mode}_{size}.{ext}")
        image.save(path)
        files[path] = digit
    return files


def test_predict_preprocesses_files_like_the_training_data(run, image_files):
    paths = list(image_files)
    predictions, errors = predict.predict_files(run, paths, k=3)
    assert not errors and [p["path"] for p in predictions] == paths
    digits = np.stack(list(image_files.values()))[..., None]
    expected = run.predict_proba(digits)
    for prediction, probabilities, path in zip(predictions, expected, paths):
        top = prediction["top_k"]
        assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"]
        if "_28." in path:  # Lossless at the training size: exactly the training pixels.
            assert top[0]["index"] == probabilities.argmax()
            assert top[0]["probability"] == pytest.approx(probabilities.max(), abs=1e-6)
        assert top[0]["class"] == run.class_names[top[0]["index"]]


def test_run_predicts_paths_pil_images_and_arrays_alike(run, image_files, test_split):
    paths = [p for p in image_files if "_28.png" in p]  # Lossless at the training size.
    digits = np.stack([image_files[p] for p in paths])[..., None]
    expected = run.predict_proba(digits)
    for given in (paths, [Image.open(p) for p in paths], digits):
        predictions = run.predict(given)
        np.testing.assert_allclose(predictions.probabilities, expected, atol=1e-6)
        np.testing.assert_array_equal(predictions.labels, expected.argmax(-1))
        assert predictions.names == [run.class_names[i] for i in expected.argmax(-1)]
    one = run.predict(paths[0])
    assert one.probabilities.shape == (1, 10) and one.labels[0] == expected[0].argmax()
    assert run.predict(digits[0]).labels[0] == expected[0].argmax()  # One (H, W, C) image.


def test_run_evaluates_a_split_as_the_loop_and_describes_itself(run, trained):
    workdir, results = trained
    evaluation = run.evaluate("test")
    assert evaluation["count"] == 2000 and evaluation["step"] == 8
    assert evaluation["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-9)
    assert repr(run) == (
        f"Run({workdir!r}: SeedCNN on embedded_mnist, latest checkpoint at step 8, "
        "input (28, 28, 1), 10 classes)"
    )
    summary = run.summary()
    assert (
        summary.startswith(repr(run)) and f"test_accuracy {results['test_accuracy']:.4f}" in summary
    )
    assert "Model SeedCNN, input (28, 28, 1)" in summary  # The model summary's table.


def test_predict_cli_reports_bad_files_and_predicts_the_rest(
    run, trained, image_files, tmp_path, capsys
):
    not_png = tmp_path / "notes.png"
    not_png.write_text("this is text\n")
    missing = tmp_path / "missing.png"
    good = list(image_files)[:2]
    files = [good[0], str(not_png), str(missing), good[1]]
    code = predict.main(["--workdir", trained[0], "--top_k", "2", *files])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.splitlines() == [
        f"error: {not_png}: not an image (PIL cannot identify it)",
        f"error: {missing}: no such file",
    ]
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == good
    assert all(len(line.split(": ")[1].split(", ")) == 2 for line in lines)

    assert predict.main(["--workdir", trained[0], "--json", "--top_k", "20", good[0]]) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["step"] == 8 and output["errors"] == []
    [prediction] = output["predictions"]
    assert len(prediction["top_k"]) == 10  # top_k is capped at the number of classes.
    assert sum(c["probability"] for c in prediction["top_k"]) == pytest.approx(1, abs=1e-5)

    assert predict.main(["--workdir", str(tmp_path), good[0]]) == 2
    assert "config.json is missing" in capsys.readouterr().err


@pytest.mark.slow  # A fresh interpreter importing TensorFlow and JAX: about 15 s.
def test_predict_command_line_exit_code(trained, image_files, tmp_path, run_command):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    good = list(image_files)[0]
    result = run_command("--workdir", trained[0], good, str(bad), module="flaxcnn.predict")
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stdout.startswith(f"{good}: ")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: ")
    assert "Traceback" not in result.stderr


def test_reports_confusion_matrix_and_per_class_accuracy(tmp_path):
    labels = [0, 0, 1, 1, 1, 2]
    predictions = [0, 1, 1, 1, 0, 1]
    matrix = reports.confusion_matrix(labels, predictions, 4)
    np.testing.assert_array_equal(matrix, [[1, 1, 0, 0], [1, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    accuracy = reports.per_class_accuracy(matrix)
    assert accuracy[:3] == [0.5, 2 / 3, 0.0] and np.isnan(accuracy[3])
    report = reports.classification_report(labels, predictions, 4, ["a", "b", "c", "d"])
    assert report["per_class_accuracy"] == {"a": 0.5, "b": 2 / 3, "c": 0.0, "d": None}
    assert (report["accuracy"], report["count"]) == (0.5, 6)
    json.dumps(report, allow_nan=False)  # JSON-ready: no NaN, no numpy types.
    with pytest.raises(ValueError, match=r"a prediction is outside \[0, 2\)"):
        reports.confusion_matrix([0, 1], [0, 2], 2)
    path = tmp_path / "sub" / "confusion.png"
    reports.plot_confusion_matrix(matrix, ["a", "b", "c", "d"], str(path), title="t")
    with Image.open(path) as png:
        assert png.format == "PNG"
