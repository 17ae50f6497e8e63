"""Crash anywhere: the real command killed (SIGKILL, or SIGTERM) at points drawn from a seed,
rerun until it finishes, ends bit-identical to a run never interrupted.

Each config trains a tiny model on the embedded MNIST for a few epochs. A kill point is
either an event of the run (the n-th train log: mid-epoch; the n-th evaluation: during a
validation, or the final test when it is the last one; the n-th checkpoint commit: the step is
written but not yet renamed into place, so a torn `<step>.orbax-checkpoint-tmp` is left; the
n-th atomic JSON replace: during `early_stopping.json` or `results.json`), where the process
kills itself with SIGKILL from inside, or a delay after the start, where the test sends the
signal from outside. The kills of one config hit the same workdir one after another, each
restart resuming from what the previous kill left; a last rerun without a kill must finish.
The final checkpoint(s), `results.json` (less its timings) and `metrics.jsonl` then equal the
uninterrupted run's, bit for bit.

A streamed run (`--config.input=stream`) stopped by SIGTERM mid-epoch saves a checkpoint
there, and its rerun opens the stream at that step and ends as the uninterrupted run does.

Slow: about 5 starts of the command per config (run with `pytest -m slow`).
"""

import glob
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from flaxcnn import run_files

REPO = pathlib.Path(__file__).resolve().parents[2]

SEED = 19
# Each kill point: ("event", name, n) or ("delay", seconds, signal name).
EVENTS = (
    "train_log",  # Mid-epoch, after a log of training metrics.
    "validation",  # Inside the validation at an epoch's end.
    "checkpoint_commit",  # A checkpoint written, not yet renamed into place.
    "test",  # Inside the final test evaluation.
    "results_write",  # results.json written, not yet renamed into place.
    "early_stopping_write",  # early_stopping.json likewise (early-stopping configs).
)

# Installed in the child before the command runs: the process SIGKILLs itself at the n-th
# occurrence of the event named in FLAXCNN_TEST_KILL ("name:n"), from inside the code doing
# it. Only hooks on library and class boundaries, so the loop's code is what runs.
KILL_HOOKS = r"""
import json, os, runpy, signal, sys
name, n = os.environ["FLAXCNN_TEST_KILL"].split(":")
counts = {}

def hit(event):
    counts[event] = counts.get(event, 0) + 1
    if name == "count":  # The reference run: how often each event happens in a whole run
        with open(os.environ["FLAXCNN_TEST_COUNTS"], "w") as f:  # (it ends with os._exit).
            json.dump(counts, f)
    if event == name and counts[event] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)

def wrap(owner, attr, event_of):
    real = getattr(owner, attr)
    def hooked(*args, **kwargs):
        event = event_of(*args, **kwargs)
        if event:
            hit(event)
        return real(*args, **kwargs)
    setattr(owner, attr, hooked)

import orbax.checkpoint as ocp
cls = ocp.path.atomicity.AtomicRenameTemporaryPath
real_finalize = cls.finalize
async def finalize(self, *args, **kwargs):
    if "checkpoints" in self.get_final().parent.name:  # A step, not one of its items.
        hit("checkpoint_commit")
    return await real_finalize(self, *args, **kwargs)
cls.finalize = finalize
files = {"early_stopping.json": "early_stopping_write", "results.json": "results_write"}
wrap(os, "replace", lambda src, dst, *a, **k: files.get(os.path.basename(str(dst))))
from flaxcnn.reporting import writers
def train_log(self, step, split, *args, **kwargs):
    return "train_log" if split == "train" else None
wrap(writers.MetricWriter, "write", train_log)
from flaxcnn.runner import steps
def evaluation(*args, **kwargs):  # The test rows follow the validation rows on the device.
    rows = kwargs.get("rows", args[3] if len(args) > 3 else None)
    return "test" if isinstance(rows, range) and rows.start > 0 else "validation"
wrap(steps, "evaluate", evaluation)  # The loop evaluates through steps.evaluate.
sys.argv = ["flaxcnn.main", *sys.argv[1:]]
runpy.run_module("flaxcnn.main", run_name="__main__")
"""

STREAM_FOLDER_ENV = "FLAXCNN_TEST_STREAM_FOLDER"
CONFIGS = {
    # SeedCNN with augmentation and a moving average of the parameters.
    "augment_ema": [
        "--config.num_epochs=3",
        "--config.augment.rotation=10",
        "--config.augment.translation=2",
        "--config.ema_decay=0.9",
    ],
    # Batch norm and dropout; early stopping on a validation loss that keeps improving (every
    # epoch saves the best checkpoint) with a patience the run may reach.
    "batchnorm_dropout_early_stop": [
        "--config.model=CNN",
        "--config.model_kwargs.widths=(4,8)",
        "--config.num_epochs=4",
        "--config.early_stopping.metric=loss",
        "--config.early_stopping.patience=1",
        "--config.early_stopping.min_delta=0.05",
    ],
    # A user's own module in its own file (plain flax.linen: convolutions, batch norm,
    # max-pooling, dropout), named by its path.
    "user_module": [
        "--config=configs/user_cnn.py",
        "--config.dataset=embedded_mnist",
        "--config.model_kwargs.widths=(4,8)",
        "--config.model_kwargs.batch_norm=true",
        "--config.num_epochs=2",
    ],
    "gan": [
        "--config=configs/gan_mnist.py",
        "--config.dataset=embedded_mnist",
        "--config.model_kwargs.latent_dim=8",
        "--config.model_kwargs.generator_widths=(8,4)",
        "--config.model_kwargs.discriminator_widths=(4,8)",
        "--config.num_clusters=16",  # Of the 640 training images.
        "--config.num_epochs=2",
        "--config.score_samples=0",
    ],
    # The streaming input (config.input=stream, flaxcnn/data/streaming.py): the training
    # batches read from PNG files while the model trains; the folder is `mnist_folder`.
    "stream": [
        f"--config.dataset=folder:${STREAM_FOLDER_ENV}",
        "--config.color_mode=grayscale",
        "--config.input=stream",
        "--config.num_epochs=2",
        "--config.augment.translation=2",
    ],
}


def env(extra: dict | None = None) -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu", **(extra or {})}


@pytest.fixture(autouse=True)
def stream_folder(request, monkeypatch) -> None:
    """The "stream" config's image folder (`mnist_folder`, conftest.py, written only for it),
    named by $FLAXCNN_TEST_STREAM_FOLDER."""
    callspec = getattr(request.node, "callspec", None)
    if callspec and callspec.params.get("config") == "stream":
        monkeypatch.setenv(STREAM_FOLDER_ENV, request.getfixturevalue("mnist_folder"))


def command(workdir, data_dir, args) -> list[str]:
    return [f"--workdir={workdir}", f"--config.data_dir={data_dir}", *args]


def run(argv, kill_event=None, counts_file=None, timeout=300) -> subprocess.CompletedProcess:
    """The command; with the hooks when `kill_event` ("name:n", or "count:0" to count the
    events into `counts_file`) is given."""
    prefix = ["-c", KILL_HOOKS] if kill_event else ["-m", "flaxcnn.main"]
    extra = {"FLAXCNN_TEST_KILL": kill_event} if kill_event else {}
    if counts_file:
        extra["FLAXCNN_TEST_COUNTS"] = str(counts_file)
    return subprocess.run(
        [sys.executable, *prefix, *argv],
        capture_output=True,
        text=True,
        env=env(extra),
        cwd=REPO,
        timeout=timeout,
    )


def run_and_signal(argv, delay: float, signum: int) -> int:
    """The command, sent `signum` after `delay` seconds (unless it ended before); its exit
    status."""
    process = subprocess.Popen(
        [sys.executable, "-m", "flaxcnn.main", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env(),
        cwd=REPO,
    )
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signum)
    try:
        return process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def draw_point(rng: random.Random, i: int, counts: dict, done: float, reference_s: float):
    """The i-th kill point: the events in turn (those the run has), an occurrence among those
    left after the fraction `done` of the run, and every third a delay (SIGKILL or SIGTERM)."""
    events = [e for e in EVENTS if counts.get(e)]
    if i % 3 == 2:
        signame = rng.choice(["SIGKILL", "SIGTERM"])
        # Over what is left of the run (a resumed run is shorter; its start is not).
        left = reference_s * max(1 - done, 0.4)
        return ("delay", round(rng.uniform(0.3, 1.0) * left, 1), signame)
    event = events[(i - i // 3) % len(events)]
    left = max(1, round(counts[event] * (1 - done)))
    return ("event", event, rng.randint(1, left))


def assert_identical(actual: dict, expected: dict) -> None:
    """Checks `actual` equals `expected`, checkpoint arrays bit for bit."""
    assert actual["results"] == expected["results"]
    assert actual["metrics"] == expected["metrics"]
    assert actual["checkpoints"].keys() == expected["checkpoints"].keys()
    for slot, (step, leaves) in expected["checkpoints"].items():
        got_step, got = actual["checkpoints"][slot]
        assert got_step == step, slot
        for a, b in zip(got, leaves, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, slot
            np.testing.assert_array_equal(a, b, err_msg=slot)


def progress(workdir, total_steps: int) -> float:
    """The fraction of the run committed to the newest checkpoint."""
    directory = os.path.join(workdir, run_files.CHECKPOINTS)
    steps = (
        [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
    )
    return max(steps, default=0) / total_steps


def where(workdir) -> str:
    """What a kill left in the workdir: checkpoint steps (torn ones included), results."""
    parts = []
    for slot in (run_files.CHECKPOINTS, run_files.BEST_CHECKPOINTS):
        directory = os.path.join(workdir, slot)
        if os.path.isdir(directory) and os.listdir(directory):
            parts.append(f"{slot}={','.join(sorted(os.listdir(directory)))}")
    if os.path.exists(os.path.join(workdir, run_files.RESULTS)):
        parts.append("results")
    return " ".join(parts) or "empty"


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("config", CONFIGS)
def test_killed_anywhere_then_rerun_ends_bit_identical(
    config, data_dir, tmp_path, tiny_data_flags, outcome
):
    """Kill points drawn from SEED hit one workdir in turn; when a run finishes before its
    kill point, it is compared and the next points hit a fresh workdir."""
    # Small splits of the data (conftest.py), 2 checkpoints kept.
    args = [*CONFIGS[config], *tiny_data_flags, "--config.keep_checkpoints=2"]
    start = time.perf_counter()
    counts_file = tmp_path / "counts.json"
    reference = run(command(tmp_path / "reference", data_dir, args), "count:0", counts_file)
    reference_s = time.perf_counter() - start
    assert reference.returncode == 0, reference.stderr[-3000:]
    counts = json.loads(counts_file.read_text())
    # The hooks are installed: every run checkpoints and writes its results.
    assert counts.get("checkpoint_commit") and counts.get("results_write"), counts
    expected = outcome(tmp_path / "reference")
    total_steps = expected["results"]["steps"]

    rng = random.Random(f"{SEED}:{config}")
    chain, log, compared, interrupted = 0, [], 0, 0
    workdir = tmp_path / f"killed-{chain}"
    for i in range(int(os.environ.get("FLAXCNN_KILL_POINTS", 6))):
        point = draw_point(rng, i, counts, progress(workdir, total_steps), reference_s)
        argv = command(workdir, data_dir, args)
        if point[0] == "event":
            status = run(argv, kill_event=f"{point[1]}:{point[2]}").returncode
        else:
            status = run_and_signal(argv, point[1], getattr(signal, point[2]))
        # Killed (-9); stopped by SIGTERM after its checkpoint (143), or by SIGTERM's default
        # action outside the training loop (-15: starting, testing); or it finished first (0).
        assert status in (0, -signal.SIGKILL, -signal.SIGTERM, 128 + signal.SIGTERM), (
            point,
            status,
        )
        log.append(f"{chain}: {point} -> {status}; {where(workdir)}")
        interrupted += status != 0
        if status == 0:
            assert_identical(outcome(workdir), expected)
            chain, compared = chain + 1, compared + 1
            workdir = tmp_path / f"killed-{chain}"
    if os.path.isdir(workdir):
        final = run(command(workdir, data_dir, args))
        assert final.returncode == 0, final.stderr[-3000:]
        assert_identical(outcome(workdir), expected)
        compared += 1
        torn = glob.glob(str(workdir / "checkpoints*" / "*tmp*"))
        log.append(f"{chain}: final rerun -> 0; torn saves left: {torn}")
    print(f"\n{config}: reference {reference_s:.0f} s, events {counts}", *log, sep="\n  ")
    print(f"  {compared} workdirs compared, all bit-identical; {interrupted} runs interrupted")
    # The suite checks itself: kills landed, and every rerun was compared.
    assert interrupted > 0 and compared > 0


@pytest.mark.slow  # Three runs of the command.
def test_a_stream_stopped_mid_epoch_resumes_bit_identical(
    mnist_folder, tmp_path, train, tiny_flags, outcome
):
    """SIGTERM after the second training log (step 12 of a 20-step epoch) saves a checkpoint
    mid-epoch; the rerun opens the stream there and ends as the uninterrupted run does."""
    args = [f"--config.dataset=folder:{mnist_folder}", *tiny_flags, "--config.input=stream"]
    args += ["--config.augment.translation=2", "--config.input_crop=random_resized"]
    train(tmp_path / "whole", mnist_folder, *args[1:])
    argv = [f"--workdir={tmp_path / 'stopped'}", *args]
    hooks = KILL_HOOKS.replace("signal.SIGKILL", "signal.SIGTERM")
    one_device = "--xla_force_host_platform_device_count=1"  # As `train`'s runs.
    stopped = subprocess.run(
        [sys.executable, "-c", hooks, *argv],
        capture_output=True,
        text=True,
        env=env({"FLAXCNN_TEST_KILL": "train_log:2", "XLA_FLAGS": one_device}),
        cwd=REPO,
        timeout=300,
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
