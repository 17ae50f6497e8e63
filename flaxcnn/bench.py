"""The benchmarks' harness, shared by scripts/benchmark.py, scripts/benchmark_families.py and
scripts/peers/compare_user_models.py: a measurement made in a fresh process and read back
from its `RESULT {json}` line, a whole command timed from its start to its exit, script
files (configs, peers) imported by path, and the medians and cells of the tables.

It imports nothing of flaxcnn: a benchmark's processes start from a clean slate.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from types import ModuleType

RESULT = "RESULT "
TORCH_MISSING = "torch is not installed: skipped (pip install torch==2.13.0)"


def add_data_options(parser: argparse.ArgumentParser, repo: str) -> None:
    """--npz (MNIST as an npz, the peers' input), --tfds (flaxcnn's tfds folder), both in
    ../shared/data beside `repo` by default, and --out (where the reports go)."""
    shared = os.path.join(repo, "..", "shared", "data")
    parser.add_argument("--npz", default=os.path.join(shared, "mnist", "mnist.npz"))
    parser.add_argument("--tfds", default=os.path.join(shared, "tfds"))
    parser.add_argument("--out", default="benchmark")


def load_module(path: str) -> ModuleType:
    """The Python file at `path` (a config, a peer script), imported as a module of its own
    name, without touching sys.path."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def environment(**extra: str) -> dict[str, str]:
    """The environment of a measured process: this one's, without a shared compilation
    cache (each process compiles, as a user's first run does), TensorFlow quiet, JAX on the
    CPU unless JAX_PLATFORMS says otherwise, and `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def print_result(result: dict) -> None:
    """A worker's answer: one `RESULT {json}` line on stdout, for `run_worker`."""
    print(RESULT + json.dumps(result), flush=True)


def run_worker(command: list[str], label: str, env: dict[str, str], cwd: str) -> dict | None:
    """Runs a worker `command` in a fresh process: the dict of its last RESULT line, or None
    (with `label` and the end of its stderr printed) when it fails."""
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        print(f"{label} failed:\n{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(lines[-1][len(RESULT) :])


def time_command(
    command: list[str], label: str, env: dict[str, str], cwd: str, timeout: float | None = None
) -> tuple[float, str] | None:
    """(wall seconds from the start of `command` to its exit, its stdout); None (with
    `label` and why printed) when it fails or runs past `timeout` seconds."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        print(f"{label}: over {timeout} s, stopped", flush=True)
        return None
    seconds = time.perf_counter() - start
    if proc.returncode:
        print(f"{label} failed:\n{proc.stderr[-3000:]}", flush=True)
        return None
    return seconds, proc.stdout


def has_torch() -> bool:
    """Whether PyTorch imports here (said when it does not)."""
    if subprocess.run([sys.executable, "-c", "import torch"]).returncode:
        print(TORCH_MISSING)
        return False
    return True


def median_of(results: list[dict | None], key: str) -> float | None:
    """The median of `key` over the runs that finished (None for a failed run), or None."""
    values = [r[key] for r in results if r is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str = ".1f") -> str:
    """A table cell: `value` formatted by `spec`, "-" for no value."""
    return "-" if value is None else format(value, spec)
