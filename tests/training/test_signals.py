"""Signals: SIGTERM, Ctrl-C and kill -9 stop a run safely, and the rerun resumes it."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flaxcnn import run_files
from flaxcnn.reporting.writers import read_metrics
from flaxcnn.runner import loop
from flaxcnn.training import signals
from flaxcnn.training.checkpointing import Checkpointer

REPO = pathlib.Path(__file__).resolve().parents[2]

# A restore that fails inside orbax leaves tensorstore coroutines behind, reported when they
# are collected after their event loop closed; harmless, and not this project's to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# --- Signals --------------------------------------------------------------------------------


def test_sigterm_sets_the_flag_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with signals.StopOnSignal() as stop:
        assert not stop.requested and not stop.should_stop()
        signal.raise_signal(signal.SIGTERM)  # Its handler has run when this returns.
        assert stop.requested and stop.should_stop()
        assert stop.signal_name == "SIGTERM"
        error = stop.interrupted(step=42)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert str(error) == (
        "interrupted by SIGTERM at step 42: checkpoint saved; rerun the same command to resume"
    )
    assert error.exit_code == 128 + signal.SIGTERM == 143


def test_second_ctrl_c_quits_at_once():
    with signals.StopOnSignal() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert stop.interrupted(7).exit_code == 130


def test_a_stop_between_two_logs_leaves_the_metrics_of_an_uninterrupted_run(
    data_dir, tmp_path, monkeypatch, tiny_config
):
    config = tiny_config()  # A log every 4 steps, one step per dispatch.
    loop.train_and_evaluate(config, str(tmp_path / "reference"))
    calls = []

    def signalled_at_the_second_step(stop):
        calls.append(stop)
        stop.signum = signal.SIGTERM
        return len(calls) == 2

    with monkeypatch.context() as patched:
        patched.setattr(signals.StopOnSignal, "should_stop", signalled_at_the_second_step)
        with pytest.raises(signals.Interrupted) as stopped:
            loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert stopped.value.step == 2  # Between the logs of steps 0 and 4.
    loop.train_and_evaluate(config, str(tmp_path / "run"))

    def records(workdir):
        path = str(workdir / run_files.METRICS)
        return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(path)]

    assert records(tmp_path / "run") == records(tmp_path / "reference")


@pytest.mark.slow  # Two starts of the command line and a run that waits for the signal.
def test_sigterm_mid_run_saves_the_step_and_the_rerun_resumes(data_dir, tmp_path, run_cli):
    """A run told to stop saves a checkpoint of the step it reached, says so on stderr, exits
    with 128 + SIGTERM, and the same command carries on from that step."""
    workdir = tmp_path / "run"
    args = [f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--config.eval_batch_size=500"]
    args += ["--config.log_every_steps=1", "--config.checkpoint_every_epochs=1000"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "flaxcnn.main", *args]
    process = subprocess.Popen(
        [*command, "--config.num_train_steps=100000"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        wait_for(workdir / "metrics.jsonl", process, 0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(
        r"interrupted by SIGTERM at step (\d+): checkpoint saved; rerun the same command to resume",
        last,
    )
    assert match, last
    step = int(match.group(1))
    assert os.listdir(workdir / "checkpoints") == [str(step)]
    assert not (workdir / "results.json").exists()
    logged = [r["step"] for r in read_metrics(str(workdir / "metrics.jsonl"))]
    assert logged and max(logged) <= step

    result = run_cli(*args, f"--config.num_train_steps={step + 3}")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert (results["steps"], results["steps_this_run"]) == (step + 3, 3)


def wait_for(path, process: subprocess.Popen, poll_s: float, timeout_s: float = 240) -> None:
    """Returns once `path` exists; fails, saying which, if `process` ends first or
    `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None:
            stderr = process.stderr.read()[-3000:] if process.stderr else ""
            pytest.fail(f"the run ended (code {process.returncode}) before {path}: {stderr}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {path} after {timeout_s} s")
        time.sleep(poll_s)


def final_params(workdir, config_args, step: int) -> list:
    """The parameters of the newest checkpoint in `workdir`, as numpy arrays; that checkpoint
    must be of `step` (not an older one that restoring fell back to)."""
    from flaxcnn import default_config
    from flaxcnn.tasks import classification

    config = default_config.get_config()
    for arg in config_args:
        key, value = arg.removeprefix("--config.").split("=")
        config[key] = type(config[key])(value) if config[key] is not None else value
    state = classification.create_state(config, jax.random.key(0), (28, 28, 1), 10, 10**6)
    checkpointer = Checkpointer(str(workdir), 3)
    restored = checkpointer.restore_or(state)
    checkpointer.close()
    assert restored is not state and int(restored.step) == step, f"restored step {restored.step}"
    return [np.asarray(x) for x in jax.tree.leaves(restored.params)]


@pytest.mark.slow  # Three starts of the command line.
def test_kill_9_then_rerun_ends_bit_identical_to_an_uninterrupted_run(data_dir, tmp_path, run_cli):
    """SIGKILL after the first checkpoint (62 steps an epoch, 3 epochs, 4 steps a dispatch):
    rerunning the command finishes with exactly the parameters of a run never killed."""
    config_args = [f"--config.data_dir={data_dir}", "--config.train_split=train[:2000]"]
    config_args += ["--config.num_epochs=3", "--config.eval_batch_size=500"]
    config_args += ["--config.log_every_steps=8", "--config.steps_per_dispatch=4"]
    reference = run_cli(f"--workdir={tmp_path / 'reference'}", *config_args)
    assert reference.returncode == 0, reference.stderr[-3000:]

    workdir = tmp_path / "killed"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "flaxcnn.main", f"--workdir={workdir}", *config_args]
    process = subprocess.Popen(command, env=env, cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        wait_for(workdir / "checkpoints" / "62", process, 0.05)
    finally:
        process.kill()  # SIGKILL: no handler, no cleanup.
        process.wait()
    assert not (workdir / "results.json").exists()
    rerun = run_cli(f"--workdir={workdir}", *config_args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 186 and results["steps_this_run"] < 186

    expected = final_params(tmp_path / "reference", config_args, step=186)
    actual = final_params(workdir, config_args, step=186)
    assert all(np.array_equal(a, b) for a, b in zip(actual, expected, strict=True))
