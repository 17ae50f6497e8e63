"""Training runs on the streaming input (`--config.input=stream`): the same results as the
in-memory path, two processes like one, and a folder of variable-size JPEGs trained with
random-resized crops whose evaluation and predict agree."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import flaxcnn
from flaxcnn.data import image_folder
from tests.product.test_crash_anywhere import KILL_HOOKS, outcome
from tests.product.test_distributed import TIMEOUT_S, cli_env, free_port, train_losses

REPO = pathlib.Path(__file__).resolve().parents[2]

FOLDER_ENV = "FLAXCNN_TEST_STREAM_FOLDER"  # The MNIST folder, named in config strings.


def write_mnist_folder(root, train: int = 800, test: int = 300) -> str:
    """root/<split>/<digit>/<i>.png from the embedded MNIST subset."""
    data = np.load(REPO / "flaxcnn" / "data" / "embedded_mnist.npz")
    for split, count in (("train", train), ("test", test)):
        images, labels = data[f"x_{split}"][:count], data[f"y_{split}"][:count]
        for digit in range(10):
            os.makedirs(root / split / str(digit), exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(root / split / str(label) / f"{i}.png")
    return str(root)


@pytest.fixture(scope="session")
def mnist_folder(tmp_path_factory) -> str:
    return write_mnist_folder(tmp_path_factory.mktemp("mnist_folder"))


@pytest.fixture(scope="session")
def tiny_flags(tiny_data_flags) -> list[str]:
    """Small splits of the folder (conftest.py), 2 epochs of 20 steps, in grayscale."""
    return [*tiny_data_flags, "--config.num_epochs=2", "--config.color_mode=grayscale"]


@pytest.fixture(scope="session")
def train(run_command, tiny_flags):
    def train(workdir, folder: str, *args: str, devices: int = 1) -> None:
        result = run_command(
            f"--workdir={workdir}", f"--config.dataset=folder:{folder}", *tiny_flags, *args,
            env=cli_env(devices), timeout=TIMEOUT_S,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]

    return train


def test_a_streamed_run_ends_bit_identical_to_the_in_memory_run(mnist_folder, tmp_path, train):
    train(tmp_path / "memory", mnist_folder, "--config.input=memory")
    train(tmp_path / "stream", mnist_folder, "--config.input=stream")
    memory, stream = outcome(tmp_path / "memory"), outcome(tmp_path / "stream")
    assert stream["results"] == memory["results"]
    assert stream["metrics"] == memory["metrics"]
    _, memory_leaves = memory["checkpoints"]["checkpoints"]
    _, stream_leaves = stream["checkpoints"]["checkpoints"]
    for a, b in zip(stream_leaves, memory_leaves, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # Two processes starting side by side, and the one-process reference.
def test_two_processes_stream_like_one(mnist_folder, tmp_path, train, tiny_flags):
    """Each process reads its half of every batch (disjoint shards covering each epoch
    once, tests/data/test_streaming.py); together they train as one process does."""
    common = [f"--config.dataset=folder:{mnist_folder}", *tiny_flags, "--config.input=stream"]
    common += ["--config.microbatch_size=0", "--config.num_epochs=1"]
    train(tmp_path / "one", mnist_folder, *common[1:])
    address = f"127.0.0.1:{free_port()}"
    env = cli_env(1, JAX_COORDINATOR_BIND_ADDRESS=address)
    processes = []
    for process_id in range(2):
        args = [f"--workdir={tmp_path / 'two'}", *common, f"--coordinator_address={address}"]
        args += ["--num_processes=2", f"--process_id={process_id}"]
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "flaxcnn.main", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                cwd=REPO,
            )
        )
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "2 devices, 2 processes" in outputs[0]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(one) == sorted(two)
    assert max(abs(one[s] - two[s]) for s in one) < 1e-5, (one, two)


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


@pytest.mark.slow  # Three runs of the command.
def test_a_stream_stopped_mid_epoch_resumes_bit_identical(
    mnist_folder, tmp_path, train, tiny_flags
):
    """SIGTERM after the second training log (step 12 of a 20-step epoch) saves a checkpoint
    mid-epoch; the rerun opens the stream there and ends as the uninterrupted run does."""
    args = [f"--config.dataset=folder:{mnist_folder}", *tiny_flags, "--config.input=stream"]
    args += ["--config.augment.translation=2", "--config.input_crop=random_resized"]
    train(tmp_path / "whole", mnist_folder, *args[1:])
    argv = [f"--workdir={tmp_path / 'stopped'}", *args]
    hooks = KILL_HOOKS.replace("signal.SIGKILL", "signal.SIGTERM")
    stopped = subprocess.run(
        [sys.executable, "-c", hooks, *argv],
        capture_output=True,
        text=True,
        env={**cli_env(1), "FLAXCNN_TEST_KILL": "train_log:2"},
        cwd=REPO,
        timeout=TIMEOUT_S,
    )
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert os.listdir(tmp_path / "stopped" / "checkpoints") == ["12"]
    train(tmp_path / "stopped", mnist_folder, *args[1:])
    whole, resumed = outcome(tmp_path / "whole"), outcome(tmp_path / "stopped")
    assert resumed["metrics"] == whole["metrics"] and resumed["results"] == whole["results"]
    for a, b in zip(
        resumed["checkpoints"]["checkpoints"][1], whole["checkpoints"]["checkpoints"][1]
    ):
        np.testing.assert_array_equal(a, b)
