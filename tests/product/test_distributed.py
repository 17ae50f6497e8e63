"""Data parallelism: 8 devices, and 2 processes over localhost (reading the in-memory or the
streaming input), train exactly as 1 device does.

Every run is a `python -m flaxcnn.main` subprocess (the device count of a process is fixed when
JAX starts) on the same global batch of 32, with whole-batch gradients (microbatch_size=0),
so that the runs differ only in how the batch is split over devices.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from flaxcnn.reporting.writers import read_metrics
from flaxcnn.runtime import distributed

REPO = pathlib.Path(__file__).resolve().parents[2]

TIMEOUT_S = 300  # Per subprocess: a hung collective fails the test instead of hanging it.
STEPS = 20
COMMON = (
    f"--config.num_train_steps={STEPS}",
    "--config.batch_size=32",
    "--config.microbatch_size=0",
    "--config.log_every_steps=1",
    "--config.eval_batch_size=400",  # Divisible by 8 devices and by 2 processes.
)


CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE")
SLURM = {v: "1" for v in distributed._SLURM_VARS}


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*CLUSTER_VARS, *SLURM):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_multi_process_jobs_are_recognised_from_the_environment(clean_env):
    assert distributed.multi_process_env() is None
    for name, value in SLURM.items():
        clean_env.setenv(name, value)
    assert distributed.multi_process_env() is None  # One SLURM task: nothing to coordinate.
    clean_env.setenv("SLURM_NTASKS", "4")
    assert distributed.multi_process_env() == "SLURM"
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert distributed.multi_process_env() == "JAX_COORDINATOR_ADDRESS"


def test_one_process_starts_nothing(clean_env):
    assert not distributed.initialize()
    assert not distributed.initialize(num_processes=1)
    assert not distributed.initialize(mode="off")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_processes": 0}, "--num_processes must be positive"),
        ({"num_processes": 2, "process_id": 2}, r"--process_id must be in \[0, 2\)"),
        ({"coordinator_address": "localhost"}, "must be HOST:PORT"),
        ({"num_processes": 2, "mode": "off"}, "contradicts"),
        ({"mode": "sometimes"}, "unknown distributed mode"),
    ],
)
def test_inconsistent_settings_are_value_errors(clean_env, kwargs, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**kwargs)


def cli_env(devices: int = 1, **extra: str) -> dict[str, str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu", **extra}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


@pytest.fixture(scope="session")
def run_cli(run_command):
    def run_cli(*args: str, devices: int = 1) -> subprocess.CompletedProcess:
        return run_command(*args, env=cli_env(devices), timeout=TIMEOUT_S)

    return run_cli


def train_losses(workdir) -> dict[int, float]:
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    losses = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    assert len(losses) == len([r for r in records if r["split"] == "train"]), "duplicate steps"
    return losses


def assert_same_losses(losses: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert sorted(expected) == sorted(losses)
    worst = max(abs(losses[s] - expected[s]) for s in losses)
    assert worst < 1e-5, (worst, losses, expected)


@pytest.fixture(scope="module")
def one_device_losses(data_dir, tmp_path_factory, run_cli) -> dict[int, float]:
    workdir = tmp_path_factory.mktemp("one_device")
    result = run_cli(f"--workdir={workdir}", f"--config.data_dir={data_dir}", *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    return train_losses(workdir)


@pytest.mark.slow  # Two runs of the command; test_reliability's device counts are slow too.
def test_eight_devices_train_like_one(one_device_losses, data_dir, tmp_path, run_cli):
    result = run_cli(f"--workdir={tmp_path}", f"--config.data_dir={data_dir}", *COMMON, devices=8)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 devices" in result.stderr
    assert_same_losses(train_losses(tmp_path), one_device_losses)


def test_batch_not_divisible_by_the_devices_is_a_clear_error(data_dir, tmp_path, run_cli):
    result = run_cli(
        f"--workdir={tmp_path}",
        f"--config.data_dir={data_dir}",
        *COMMON,
        "--config.batch_size=36",
        devices=8,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config.batch_size=36 is not divisible by the 8 devices: use a multiple of 8, "
        "e.g. 32 or 40"
    )
    assert os.listdir(tmp_path) == []  # Refused before the workdir is touched.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # Two processes starting side by side: about a minute on a loaded 2-core CPU.
def test_two_processes_train_like_one(one_device_losses, data_dir, tmp_path):
    """Two processes of one CPU device each on localhost, gloo collectives between them, one
    shared workdir: the same losses as one process, logs written once, by process 0."""
    workdir = tmp_path / "run"
    port = free_port()
    address = f"127.0.0.1:{port}"
    # The coordinator listens on localhost only (JAX's default is every interface).
    env = cli_env(1, JAX_COORDINATOR_BIND_ADDRESS=address)
    processes, logs = [], []
    for process_id in range(2):
        log = open(tmp_path / f"process_{process_id}.log", "w+")  # noqa: SIM115
        logs.append(log)
        args = [f"--workdir={workdir}", f"--config.data_dir={data_dir}", *COMMON]
        args += [f"--coordinator_address={address}", "--num_processes=2"]
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "flaxcnn.main", *args, f"--process_id={process_id}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        )
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    assert "2 devices, 2 processes" in outputs[0]
    assert "test accuracy" in outputs[0] and "test accuracy" not in outputs[1]
    assert_same_losses(train_losses(workdir), one_device_losses)
    assert len([f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]) == 1
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == STEPS
    assert os.listdir(workdir / "checkpoints") == [str(STEPS)]


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
