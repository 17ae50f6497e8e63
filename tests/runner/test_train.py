"""End to end: the training loop in-process and the command line in a subprocess."""

import json
import logging
import os

import jax
import numpy as np
import pytest

from flaxcnn import api, inference
from flaxcnn.data import device_data, input_pipeline
from flaxcnn.reporting.writers import read_metrics
from flaxcnn.runner import loop, steps


def test_run_writes_everything_and_resumes(data_dir, tmp_path, tiny_config):
    workdir = str(tmp_path / "run")
    config = tiny_config(num_train_steps=8)
    results = loop.train_and_evaluate(config, workdir)
    for name in ("config.json", "metrics.jsonl", "curves.png", "results.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["8"]
    assert results["num_test_examples"] == 500 and results["steps"] == 8
    # The loop's padded, masked test evaluation against the checkpoint's own predictions.
    test = input_pipeline.load_split("embedded_mnist", config.test_split, data_dir)
    predicted = inference.load_run(workdir).predict_proba(test.images).argmax(-1)
    assert results["test_accuracy"] == pytest.approx(np.mean(predicted == test.labels), abs=1e-6)
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f) == results
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records if r["split"] == "train"] == [4, 8]
    assert [r["split"] for r in records if r["step"] == 8] == ["train", "validation"]

    # More steps on the same workdir: resumes at step 8 instead of restarting.
    resumed = loop.train_and_evaluate(tiny_config(num_train_steps=12), workdir)
    assert resumed["steps"] == 12 and resumed["steps_this_run"] == 4
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["8", "12"]
    steps = [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == sorted(steps) and steps[-1] == 12

    # A finished run only re-reports.
    again = loop.train_and_evaluate(tiny_config(num_train_steps=12), workdir)
    assert again == resumed


def test_resume_drops_metrics_logged_after_the_last_checkpoint(data_dir, tmp_path, tiny_config):
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(tiny_config(num_train_steps=8), workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:  # As if it crashed at 10.
        f.write(json.dumps({"step": 10, "split": "train", "loss": 9.9, "accuracy": 0.0}) + "\n")
    os.remove(os.path.join(workdir, "results.json"))
    loop.train_and_evaluate(tiny_config(num_train_steps=12), workdir)
    losses = {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))}
    assert 9.9 not in losses.values() and max(losses) == 12


@pytest.fixture(scope="session")
def partial_batches_config(tiny_config):
    def partial_batches_config():
        """2 epochs over 100 examples in tiny_config's batches of 32: 3 steps an epoch and a
        dropped partial batch of 4; a 1234-image test split ends in a padded batch. (Batches of
        32 compile several times faster than larger ones.)"""
        return tiny_config(
            num_train_steps=-1,
            num_epochs=2,
            batch_size=32,
            train_split="train[:100]",
            test_split="test[:1234]",
        )

    return partial_batches_config


@pytest.mark.slow
def test_epochs_checkpoint_validate_and_count_every_test_example(
    data_dir, tmp_path, partial_batches_config
):
    results = loop.train_and_evaluate(partial_batches_config(), str(tmp_path))
    assert results["steps"] == 6 and results["num_test_examples"] == 1234
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records if r["split"] == "validation"] == [3, 6]
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["3", "6"]


def test_a_run_without_a_validation_split_trains_on_all_of_train(data_dir, tmp_path, tiny_config):
    config = tiny_config(train_split="train", validation_split="")
    results = loop.train_and_evaluate(config, str(tmp_path))
    assert results["num_test_examples"] == 500 and np.isfinite(results["test_loss"])
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert {r["split"] for r in records} == {"train"}
    assert os.listdir(tmp_path / "checkpoints") == ["8"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": "Nope"}, "unknown model .Nope.; valid: CNN, "),
        ({"optimizer": "adagradd"}, "unknown optimizer 'adagradd'; valid: adam, adamw, sgd"),
        ({"learning_rate": 0.0}, "config.learning_rate must be positive"),
        ({"test_split": ""}, "^config.test_split must name a split, got ''$"),
        (
            {"validation_split": "", "early_stopping": {"patience": 2}},
            "^config.early_stopping needs a validation split",
        ),
        ({"label_smoothing": 1.0}, r"^config.label_smoothing must be in \[0, 1\), got 1.0$"),
        (
            {"label_smoothing": 0.1, "task": "autoencoder", "model": "ConvAutoencoder"},
            "^config.label_smoothing applies to classification, not the autoencoder task$",
        ),
        ({"batch_size": 20000}, "larger than the 9000 training examples"),
    ],
)
def test_bad_settings_are_value_errors(data_dir, tmp_path, overrides, message, tiny_config):
    with pytest.raises(ValueError, match=message):
        api.fit(config=tiny_config(**overrides), workdir=str(tmp_path))


@pytest.mark.slow
def test_cli_overrides_reach_the_run(data_dir, tmp_path, run_command):
    workdir = tmp_path / "cli"
    result = run_command(
        f"--workdir={workdir}",
        "--config=configs/seed_keras.py",
        f"--config.data_dir={data_dir}",
        "--config.dataset=embedded_mnist",
        "--config.num_train_steps=5",
        "--config.batch_size=16",
        "--config.learning_rate=0.002",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test accuracy" in result.stdout
    config = json.loads((workdir / "config.json").read_text())
    assert (config["batch_size"], config["learning_rate"], config["num_train_steps"]) == (
        16,
        0.002,
        5,
    )
    assert json.loads((workdir / "results.json").read_text())["steps"] == 5


def test_python_m_flaxcnn_runs_a_command_like_the_console_script(data_dir, tmp_path, run_command):
    result = run_command(
        "train",
        f"--workdir={tmp_path}",
        f"--config.data_dir={data_dir}",
        "--config.num_train_steps=4",
        module="flaxcnn",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 4
    usage = run_command("--help", module="flaxcnn")
    assert usage.returncode == 0 and "train" in usage.stdout and "scorer" in usage.stdout


def test_each_step_function_compiles_once(data_dir, tmp_path, caplog, partial_batches_config):
    config = partial_batches_config()  # Partial train and test batches: still one each.
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        loop.train_and_evaluate(config, str(tmp_path))
    compiled = [
        r.getMessage().split(" ")[1]
        for r in caplog.records
        if r.getMessage().startswith("Compiling jit(")
    ]
    # 3 steps an epoch and at most 3 evaluation batches: only the sizes of 1 are compiled
    # (not 16 and 4 steps, nor 16 batches, which this run never dispatches).
    assert compiled.count("jit(multi_step)") == 1
    assert compiled.count("jit(multi_eval)") == 1


def test_only_the_dispatch_sizes_a_run_can_use_are_compiled():
    assert steps.sizes_up_to((16, 4, 1), None) == [1, 4, 16]
    assert steps.sizes_up_to((16, 4, 1), 16) == [1, 4, 16]
    assert steps.sizes_up_to((16, 4, 1), 15) == [1, 4]
    assert steps.sizes_up_to((16, 4, 1), 3) == [1]
    assert steps.sizes_up_to((1, 1, 1), 0) == [1]


@pytest.mark.slow
def test_early_stopping_stops_at_patience_and_tests_the_best_state(
    data_dir, tmp_path, monkeypatch, tiny_config
):
    # 31 steps an epoch; validation accuracy scripted to peak at epoch 2 of up to 10.
    config = tiny_config(num_train_steps=-1, num_epochs=10, train_split="train[:1000]")
    config.early_stopping.update(metric="accuracy", patience=2)
    scripted = [0.5, 0.7, 0.6, 0.65]
    real_evaluate = steps.evaluate

    def evaluate(*args):
        metrics, count = real_evaluate(*args)
        return ({**metrics, "accuracy": scripted.pop(0)} if scripted else metrics), count

    monkeypatch.setattr(steps, "evaluate", evaluate)
    results = loop.train_and_evaluate(config, str(tmp_path))
    assert not scripted  # Four validations, then the test.
    assert results["steps"] == 4 * 31 and results["tested_step"] == 2 * 31
    assert os.listdir(tmp_path / "checkpoints_best") == [str(2 * 31)]
    record = json.loads((tmp_path / "early_stopping.json").read_text())
    assert record["history"] == [[1, 0.5], [2, 0.7], [3, 0.6], [4, 0.65]]
    # A stopped run is finished: rerunning only re-reports.
    assert loop.train_and_evaluate(config, str(tmp_path)) == results


@pytest.mark.slow
def test_nonfinite_loss_names_the_step_or_is_skipped(data_dir, tmp_path, monkeypatch, tiny_config):
    gather_batch = device_data.gather_batch

    def gather_nan_images(data, indices):
        batch = gather_batch(data, indices)
        return {**batch, "image": batch["image"] * float("nan")}

    monkeypatch.setattr(device_data, "gather_batch", gather_nan_images)
    config = tiny_config(num_train_steps=8)
    with pytest.raises(FloatingPointError, match="non-finite training loss at step 1 "):
        loop.train_and_evaluate(config, str(tmp_path / "stop"))
    assert not os.path.exists(tmp_path / "stop" / "results.json")

    config.skip_nonfinite = True
    results = loop.train_and_evaluate(config, str(tmp_path / "skip"))
    assert results["skipped_steps"] == 8 and results["steps"] == 8


def test_classifier_results_hold_per_class_accuracy_and_confusion(data_dir, tmp_path, tiny_config):
    results = loop.train_and_evaluate(tiny_config(), str(tmp_path))
    matrix = results["confusion_matrix"]
    assert len(matrix) == 10 and sum(map(sum, matrix)) == results["num_test_examples"]
    per_class = results["per_class_accuracy"]
    assert sorted(per_class) == [str(i) for i in range(10)]
    accuracy = sum(matrix[i][i] for i in range(10)) / results["num_test_examples"]
    assert accuracy == pytest.approx(results["test_accuracy"])
    assert os.path.getsize(tmp_path / "confusion_test.png") > 0
