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


def test_whole_command_table_pairs_repeats_and_keeps_the_first_run_apart():
    def runs(*seconds):
        return [None if s is None else {"seconds": s, "accuracy": 0.98} for s in seconds]

    rows = [
        {"contender": "flaxcnn", "batch_size": 32, "runs": runs(20.0, 10.0, 8.0, 9.0)},
        {"contender": "keras", "batch_size": 32, "runs": runs(30.0, 28.0, None, 27.0)},
        {"contender": "torch", "batch_size": 32, "runs": runs(25.0, 22.0, 20.0, 21.0)},
        {"contender": "flaxcnn-default", "batch_size": 32, "runs": runs(12.0, 5.0, 6.0)},
    ]
    table = benchmark.whole_command_table(rows)
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table[2:]]
    # First runs: best peer 25 / 20. Later: medians 9, 27.5, 21 -> 21 / 9; per repeat the
    # best peer that finished: 22 / 10, 20 / 8 (Keras failed), 21 / 9.
    assert cells[0][:7] == ["32", "first (empty caches)", "20.0", "30.0", "25.0", "1.25x", "1.25x"]
    assert cells[1][:7] == ["32", "later (median)", "9.0", "27.5", "21.0", "2.33x", "2.33x"]
    assert cells[3][:3] == ["README main job", "later (median)", "5.5"]


def test_whole_commands_are_the_shell_commands_a_user_types():
    class Args:
        whole_command_epochs, npz = 3, "mnist.npz"

    ours = benchmark.contender_command("flaxcnn", 128, "W", Args)
    assert ours[1:5] == ["-m", "flaxcnn.main", "--workdir", "W"]
    assert ours[-2:] == ["--config.num_epochs=3", "--config.batch_size=128"]
    torch = benchmark.contender_command("torch", 32, "W", Args)
    assert torch[1].endswith("scripts/peers/torch_mnist.py") and os.path.isfile(torch[1])
    assert benchmark.contender_command("flaxcnn-default", 32, "W", Args)[2:] == [
        "flaxcnn.main",
        "--workdir",
        "W",
    ]
