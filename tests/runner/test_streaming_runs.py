"""Training runs on the streaming input (`--config.input=stream`): the same results as the
in-memory path, and a folder of variable-size JPEGs trained with random-resized crops whose
evaluation and predict agree. Two processes streaming like one are in
tests/product/test_distributed.py; a stream stopped mid-epoch, in
tests/product/test_crash_anywhere.py."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import flaxcnn
from flaxcnn.data import image_folder


def test_a_streamed_run_ends_bit_identical_to_the_in_memory_run(
    mnist_folder, tmp_path, train, outcome
):
    train(tmp_path / "memory", mnist_folder, "--config.input=memory")
    train(tmp_path / "stream", mnist_folder, "--config.input=stream")
    memory, stream = outcome(tmp_path / "memory"), outcome(tmp_path / "stream")
    assert stream["results"] == memory["results"]
    assert stream["metrics"] == memory["metrics"]
    _, memory_leaves = memory["checkpoints"]["checkpoints"]
    _, stream_leaves = stream["checkpoints"]["checkpoints"]
    for a, b in zip(stream_leaves, memory_leaves, strict=True):
        np.testing.assert_array_equal(a, b)


def write_variable_jpegs(root, per_class: int = 24) -> None:
    """Two classes told apart by colour, as JPEGs of many sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for label, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            os.makedirs(root / split / f"c{label}")
            for i in range(count):
                h, w = rng.integers(20, 90, size=2)
                noise = rng.integers(-30, 30, size=(h, w, 3))
                pixels = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{label}" / f"{i}.jpg")


def test_variable_size_jpegs_train_with_random_resized_crops_and_predict_agrees(
    tmp_path, run_command
):
    write_variable_jpegs(tmp_path / "data")
    root = tmp_path / "data"
    result = run_command(
        f"--workdir={tmp_path / 'run'}",
        f"--config.dataset=folder:{root}",
        "--config.train_split=train",
        "--config.validation_split=test",
        "--config.test_split=test",
        "--config.image_size=(24,24)",
        "--config.input=stream",
        "--config.input_crop=random_resized",
        "--config.batch_size=8",
        "--config.num_epochs=3",
        "--config.eval_batch_size=8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    paths, labels, _ = image_folder.split_paths(f"folder:{root}", "test")
    images = np.stack(
        [image_folder.to_array(image_folder.open_image(p), (24, 24, 3)) for p in paths]
    )
    run = flaxcnn.load_run(str(tmp_path / "run"))
    predicted = run.predict_proba(images).argmax(-1)
    assert results["num_test_examples"] == len(paths)
    assert np.mean(predicted == labels) == pytest.approx(results["test_accuracy"], abs=1e-6)
