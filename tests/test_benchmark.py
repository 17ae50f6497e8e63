"""The benchmark script's command line and the tables it reports (its runs are not tests)."""

import importlib.util
import os
import subprocess
import sys

from conftest import REPO

SCRIPT = os.path.join(REPO, "scripts", "benchmark.py")
spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


def test_help_lists_the_options():
    result = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--time-to-accuracy" in result.stdout and "98.5%" in result.stdout


def row(trainer, epochs):
    present = sorted(e for e in epochs if e)
    return {
        "trainer": trainer,
        "batch_size": 128,
        "epoch": epochs,
        "epoch_median": present[len(present) // 2],
        "step": 1.0,
        "compile_s": 0.5,
        "peak_memory_mb": 1000.0,
    }


def test_throughput_table_pairs_the_repeats_and_skips_failed_runs():
    ours = row("flaxcnn", [100.0, 30.0, 90.0])
    peer = row("keras-tf", [50.0, 20.0, None])  # The third repeat failed.
    table = benchmark.throughput_table([ours, peer])
    cells = [c.strip() for c in table[3].split("|")[1:-1]]
    # Ratio of the medians 90 / 50; within repeats 100 / 50 and 30 / 20.
    assert cells[:5] == ["keras-tf", "128", "50", "1.80x", "1.75x"]


def test_time_to_target_is_the_first_time_at_the_target():
    assert benchmark.time_to_target([(5.0, 0.97), (9.0, 0.985), (12.0, 0.99)]) == 9.0
    assert benchmark.time_to_target([(5.0, 0.97), (9.0, 0.98)]) is None
