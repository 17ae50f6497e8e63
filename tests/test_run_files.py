"""A damaged workdir: damaged results, metrics, early-stopping records and configs are
rebuilt or named clearly."""

import json
import logging
import shutil

import pytest

from flaxcnn import run_files
from flaxcnn import workdir as workdir_lib
from flaxcnn.reporting.writers import read_metrics
from flaxcnn.runner import loop

# A restore that fails inside orbax leaves tensorstore coroutines behind, reported when they
# are collected after their event loop closed; harmless, and not this project's to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# --- A damaged workdir ----------------------------------------------------------------------

DAMAGED_CONTENT = {"truncated": '{"step": 8, "split": "tr', "not JSON": "\0\0garbage"}


@pytest.mark.parametrize("damage", DAMAGED_CONTENT)
def test_damaged_results_of_a_finished_run_are_rebuilt_by_testing_again(
    prior_run, data_dir, tmp_path, damage, tiny_config
):
    workdir = tmp_path / "run"
    shutil.copytree(prior_run, workdir)
    original = json.loads((workdir / run_files.RESULTS).read_text())
    (workdir / run_files.RESULTS).write_text(DAMAGED_CONTENT[damage])
    results = loop.train_and_evaluate(tiny_config(), str(workdir))
    assert results["steps_this_run"] == 0  # Nothing trained again: only the test.
    for key in ("test_accuracy", "test_loss", "num_test_examples", "steps", "tested_step"):
        assert results[key] == original[key], key
    assert json.loads((workdir / run_files.RESULTS).read_text()) == results


def test_torn_last_metrics_line_is_dropped_and_damage_elsewhere_is_named(tmp_path):
    from flaxcnn.reporting.writers import MetricWriter

    path = tmp_path / run_files.METRICS
    lines = [json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) for s in (4, 8, 12)]
    path.write_text("\n".join(lines) + "\n" + DAMAGED_CONTENT["truncated"])  # Killed mid-line.
    writer = MetricWriter(str(tmp_path))
    writer.truncate_after(8)
    writer.write(16, "train", {"loss": 0.5})
    writer.close()
    assert [r["step"] for r in read_metrics(str(path))] == [4, 8, 16]

    path.write_text(f"{lines[0]}\nnot json\n{lines[1]}\n")
    with pytest.raises(ValueError, match=rf"^{path} is damaged \(line 2: .*\); move it away$"):
        MetricWriter(str(tmp_path)).truncate_after(8)
    assert path.read_text() == f"{lines[0]}\nnot json\n{lines[1]}\n"  # Left as it was.


@pytest.mark.parametrize("damage", DAMAGED_CONTENT)
def test_damaged_early_stopping_record_is_a_clear_error(tmp_path, damage, tiny_config):
    path = tmp_path / run_files.EARLY_STOPPING
    path.write_text(DAMAGED_CONTENT[damage])
    config = tiny_config(data_dir="unused")
    config.early_stopping.patience = 2
    with pytest.raises(ValueError, match=rf"^{path} is damaged \(not JSON: .*\); move it away$"):
        loop.load_early_stopping(config, str(tmp_path), epoch=3)


def test_damaged_config_is_not_compared_for_training_and_a_clear_error_for_loading(
    prior_run, tmp_path, caplog, tiny_config
):
    from flaxcnn import inference

    workdir = tmp_path / "run"
    shutil.copytree(prior_run, workdir)
    (workdir / run_files.CONFIG).write_text(DAMAGED_CONTENT["truncated"])
    with caplog.at_level(logging.WARNING):
        assert workdir_lib.check_run_identity(str(workdir), tiny_config(data_dir="unused")) is None
    assert any("not comparing it" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=f"cannot read {workdir / run_files.CONFIG}"):
        inference.load_config(str(workdir))
