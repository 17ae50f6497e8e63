"""The evaluation view of `config.input_crop="random_resized"`: a folder of variable-size
JPEGs trains on random-resized crops from the stream, and its streamed evaluation,
`Run.evaluate`, `Run.predict` on files, `prepare_image` and the exported model all read the
same centre crop of each image."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from flaxcnn import default_config, inference
from flaxcnn.cli import export
from flaxcnn.config import validate
from flaxcnn.data import cache, image_folder, input_pipeline, sources
from flaxcnn.runner import evaluation, loop, stream_input

SHAPE = (32, 32, 3)
FRACTION = 0.875  # The centre box's share of the largest box of the model's aspect ratio.


def write_jpegs(root, per_class: int = 12) -> str:
    """root/c<label>/<i>.jpg, from 40x60 to 90x50 pixels: a striped centre (horizontal
    stripes for class 0, vertical for class 1) inside a frame of noise, so that the centre
    crop and the whole image resized give different inputs."""
    rng = np.random.default_rng(0)
    for label in range(2):
        os.makedirs(root / f"c{label}")
        for i in range(per_class):
            h = 40 + 50 * i // (per_class - 1)
            w = 60 - 10 * i // (per_class - 1)
            pixels = rng.integers(0, 256, size=(h, w, 3))
            rows, cols = np.mgrid[:h, :w]
            stripes = (rows if label == 0 else cols) // 3 % 2 * 200 + 30
            inner = (slice(h // 5, h - h // 5), slice(w // 5, w - w // 5))
            pixels[inner] = stripes[inner][..., None]
            Image.fromarray(pixels.astype(np.uint8)).save(
                root / f"c{label}" / f"{i}.jpg", quality=90
            )
    return f"folder:{root}"


def centre_view(path: str) -> np.ndarray:
    """The centre crop written out: the centred box of FRACTION of the largest 1:1 box (the
    model's aspect ratio), resized to 32x32 with PIL's BILINEAR."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    side = round(SHAPE[0] * min(image.height / SHAPE[0], image.width / SHAPE[1]) * FRACTION)
    top, left = (image.height - side) // 2, (image.width - side) // 2
    box = image.crop((left, top, left + side, top + side))
    return np.asarray(box.resize(SHAPE[1::-1], Image.Resampling.BILINEAR), np.uint8)


def config_for(dataset: str, **overrides):
    config = default_config.get_config()
    settings = dict(
        dataset=dataset,
        train_split="train[:50%]",  # 12 images, 6 of each class.
        validation_split="train[50%:]",
        test_split="train[50%:]",  # 12 images: batches of 5, 5 and 2 (3 padded).
        image_size=SHAPE[:2],
        input="stream",
        input_crop="random_resized",
        batch_size=4,
        num_train_steps=6,
        eval_batch_size=5,
        log_every_steps=3,
    )
    config.update({**settings, **overrides})
    validate(config)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, results, test paths and labels) of a streamed random-resized run."""
    root = tmp_path_factory.mktemp("jpegs")
    dataset = write_jpegs(root)
    workdir = str(root.parent / "run")
    results = loop.train_and_evaluate(config_for(dataset), workdir)
    paths, labels, _ = image_folder.split_paths(dataset, "train[50%:]")
    return workdir, results, paths, labels


def test_the_streamed_evaluation_counts_every_test_image_once(trained):
    _, results, paths, labels = trained
    assert results["num_test_examples"] == len(paths) == 12
    assert np.sum(results["confusion_matrix"]) == 12
    assert np.sum(results["confusion_matrix"], axis=1).tolist() == np.bincount(labels).tolist()


@pytest.mark.parametrize("source", ["stream", "auto"])  # "auto" under budget: in memory.
def test_run_evaluate_equals_the_runs_own_test_metrics(trained, source):
    workdir, results, _, _ = trained
    run = inference.load_run(workdir)
    run.config.input = source
    read = evaluation.read_split(run.config, run.config.dataset, "train[50%:]", None)
    assert isinstance(read, sources.StreamSplit if source == "stream" else input_pipeline.Split)
    evaluated = run.evaluate("train[50%:]")
    assert evaluated["count"] == results["num_test_examples"]
    assert evaluated["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-6)
    assert evaluated["loss"] == pytest.approx(results["test_loss"], rel=1e-5)
    assert evaluated["confusion_matrix"] == results["confusion_matrix"]


def test_predict_reads_files_as_the_centre_crop_and_agrees_with_evaluation(trained):
    workdir, results, paths, labels = trained
    run = inference.load_run(workdir)
    views = np.stack([centre_view(p) for p in paths])
    expected = run.predict_proba(views)
    predicted = run.predict(paths)
    np.testing.assert_allclose(predicted.probabilities, expected, atol=1e-6)
    np.testing.assert_array_equal(predicted.labels, expected.argmax(-1))
    assert np.mean(predicted.labels == labels) == pytest.approx(results["test_accuracy"])
    for path, view in zip(paths, views):
        np.testing.assert_array_equal(inference.prepare_image(path, SHAPE, run.input_crop), view)
        with Image.open(path) as image:  # A PIL image reads as its file does.
            np.testing.assert_array_equal(
                run.predict(image).probabilities[0], run.predict(path).probabilities[0]
            )


def test_the_exported_model_on_centre_crops_gives_predicts_probabilities(trained):
    workdir, _, paths, _ = trained
    run = inference.load_run(workdir)
    exported = export.export_stablehlo(run, platforms=("cpu",))
    views = np.stack([inference.prepare_image(p, SHAPE, "random_resized") for p in paths])
    served = np.asarray(exported.call(jax.numpy.asarray(views)))
    np.testing.assert_allclose(served, run.predict(paths).probabilities, atol=1e-5)
    text = export.preprocessing_text(run)
    assert f"centred box of {FRACTION:g}" in text and "prepare_image" in text


def test_the_split_cache_keeps_the_resized_and_centre_cropped_splits_apart(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    dataset = write_jpegs(tmp_path / "jpegs", per_class=3)
    paths, _, _ = image_folder.split_paths(dataset, "train")
    for _ in range(2):  # Decoded, then read from the cache.
        resized = input_pipeline.load_split(dataset, "train", None, SHAPE[:2], None, "resize")
        cropped = input_pipeline.load_split(
            dataset, "train", None, SHAPE[:2], None, "random_resized"
        )
        np.testing.assert_array_equal(cropped.images, np.stack([centre_view(p) for p in paths]))
        whole = [image_folder.to_array(image_folder.open_image(p), SHAPE) for p in paths]
        np.testing.assert_array_equal(resized.images, np.stack(whole))
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_random_resized_crops_refuse_a_split_in_memory(tmp_path):
    with pytest.raises(ValueError, match="input_crop='random_resized' crops the files"):
        config_for(write_jpegs(tmp_path, per_class=2), input="memory")


def test_auto_streams_random_resized_crops_whatever_the_budget(tmp_path):
    config = config_for(write_jpegs(tmp_path, per_class=2), input="auto")
    assert config.input_memory_budget_mb * 2**20 > 4 * np.prod(SHAPE)  # It would fit.
    assert stream_input.open_stream_split(config) is not None
