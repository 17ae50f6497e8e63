"""Accuracy on the full 10,000-image MNIST test split (slow: run with `pytest -m slow`)."""

import json

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("name, target", [("seed_keras", 0.983), ("cnn_mnist_best", 0.996)])
def test_config_reaches_its_accuracy(
    name, target, shared_tfds, tmp_path, run_command, users_xla_flags
):
    """The targets that only a full run shows; the other configs' figures are benchmarks
    (README's configs table). The command as a user types it, compiled with XLA's flags as
    the user has them (not the suite's quicker ones). Measured on full MNIST: seed_keras
    98.34% (seed 0), a margin of 4 test images. cnn_mnist_best with oneDNN's convolutions on
    a 2-core Intel VM: 99.61% (seed 0, this test's run) and 99.57% (seed 1), with XLA's
    99.63% (seed 0); 99.59% with seed 0 on an AMD VM: the target is about the recipe's mean,
    with no margin across seeds and machines."""
    workdir = tmp_path / "run"
    result = run_command(
        f"--workdir={workdir}", f"--config=configs/{name}.py", f"--config.data_dir={shared_tfds}",
        env={"XLA_FLAGS": users_xla_flags}, timeout=3000,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    print(name, json.dumps(results))
    assert results["num_test_examples"] == 10_000
    assert results["test_accuracy"] >= target
