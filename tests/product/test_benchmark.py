"""The benchmark script's command line and the tables it reports (its runs are not tests)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from flaxcnn import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[2]

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


FAMILIES_SCRIPT = os.path.join(REPO, "scripts", "benchmark_families.py")
TWIN = os.path.join(REPO, "scripts", "peers", "keras_families.py")
spec = importlib.util.spec_from_file_location("benchmark_families", FAMILIES_SCRIPT)
families = importlib.util.module_from_spec(spec)
spec.loader.exec_module(families)

# Each Keras twin's trainable parameter count and settings, printed as JSON by a fresh
# interpreter on Keras's numpy backend: building is all it does, and this process stays
# free of Keras.
TWIN_FACTS = f"""
import importlib.util, json
spec = importlib.util.spec_from_file_location("twin", {TWIN!r})
twin = importlib.util.module_from_spec(spec)
spec.loader.exec_module(twin)
print(json.dumps({{
    family: [twin.trainable_parameters(build()), twin.SETTINGS[family]]
    for family, build in twin.BUILDERS.items()
}}))
"""


def flaxcnn_parameters(config) -> int:
    """The parameter count of the config's model on MNIST, from shapes alone."""
    import jax
    import jax.numpy as jnp

    from flaxcnn import models

    kwargs = dict(config.model_kwargs)
    if config.task == "classification":
        kwargs["num_classes"] = 10
    else:
        kwargs["image_shape"] = (28, 28, 1)
    model = models.create_model(config.model, **kwargs)
    # The GAN's module takes latents, the others images.
    x = jnp.zeros((1, model.latent_dim) if config.task == "gan" else (1, 28, 28, 1))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))


def printed_facts(program: str) -> dict:
    """The JSON that `program` prints last, run by a fresh interpreter on Keras's numpy
    backend."""
    env = {**os.environ, "KERAS_BACKEND": "numpy", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
def test_every_family_has_a_keras_twin_of_the_same_architecture_and_settings():
    facts = printed_facts(TWIN_FACTS)
    assert set(facts) == set(families.FAMILIES)
    for family, (parameters, settings) in facts.items():
        config = families.load_config(family, "unused")
        assert settings["config"] == families.FAMILIES[family]
        assert parameters == flaxcnn_parameters(config), family
        assert settings["batch_size"] == config.batch_size, family
        assert settings["learning_rate"] == config.learning_rate, family
        assert settings.get("cosine", False) == (config.lr_schedule == "cosine"), family
        assert settings.get("clip", 0.0) == config.grad_clip_norm, family
        # The GAN's Adam takes b1 from its own setting; the others' from optimizer_kwargs.
        b1 = config.adam_b1 if config.task == "gan" else config.optimizer_kwargs.get("b1", 0.9)
        assert settings.get("beta_1", 0.9) == b1, family


USER_TWINS = os.path.join(REPO, "scripts", "peers", "keras_user_models.py")
# Each user model's config, and its Keras twin's parameter count and optimizer settings.
USER_TWIN_FACTS = f"""
import importlib.util, json
import keras
spec = importlib.util.spec_from_file_location("twins", {USER_TWINS!r})
twins = importlib.util.module_from_spec(spec)
spec.loader.exec_module(twins)
facts = {{}}
for name, (config, build, optimizer) in twins.MODELS.items():
    optimizer = optimizer(keras)
    momentum = getattr(optimizer, "momentum", None)
    facts[name] = [config, build(keras).count_params(), type(optimizer).__name__.lower(),
                   float(optimizer.learning_rate), momentum]
print(json.dumps(facts))
"""


@pytest.mark.slow
def test_every_user_model_has_a_keras_twin_of_the_same_architecture_and_optimizer():
    facts = printed_facts(USER_TWIN_FACTS)
    assert set(facts) == {"user_cnn", "flax_example", "keras_example"}
    for name, (config_file, parameters, optimizer, learning_rate, momentum) in facts.items():
        config = config_lib.load_file(os.path.join(REPO, "configs", config_file))
        assert parameters == flaxcnn_parameters(config), name
        assert optimizer == config.optimizer, name
        assert learning_rate == pytest.approx(config.learning_rate), name
        assert momentum == config.optimizer_kwargs.get("momentum"), name


def test_family_table_reports_the_fraction_of_the_peak_and_pairs_repeats():
    def ours(rate):
        return {
            "examples_per_s": rate,
            "steps_per_s": rate / 100,
            "flops_per_step": 1e9,
            "batch_size": 100,
        }

    runs = {
        "peak:": [
            {"flops_per_s": 40e9, "xla": 40e9, "tf": 30e9},
            {"flops_per_s": 60e9, "xla": 50e9, "tf": 60e9},
            None,
        ],
        "flaxcnn:cnn": [ours(2000.0), ours(1000.0), ours(3000.0)],
        "keras:cnn": [{"examples_per_s": 1000.0}, None, {"examples_per_s": 2000.0}],
    }
    table = families.throughput_table(runs, ["cnn"])
    assert table[0].startswith("Peak: 50.0 GFLOP/s") and "XLA 45.0, TensorFlow 45.0" in table[0]
    cells = [c.strip() for c in table[-1].split("|")[1:-1]]
    # 20 steps/s of 1 GFLOP = 20 GFLOP/s, 40% of 50; ratio of medians 2000 / 1500; per
    # repeat 2000 / 1000 and 3000 / 2000.
    assert cells == ["cnn", "100", "1.000", "2,000", "20.0", "40.0%", "1,500", "1.33x", "1.75x"]
    # flaxcnn alone (`--contenders flaxcnn`, on a GPU): the twin's cells are empty.
    del runs["keras:cnn"]
    cells = [c.strip() for c in families.throughput_table(runs, ["cnn"])[-1].split("|")[1:-1]]
    assert cells == ["cnn", "100", "1.000", "2,000", "20.0", "40.0%", "-", "-", "-"]


def test_family_commands_are_the_shell_commands_a_user_types():
    class Args:
        npz = "mnist.npz"

    ours = families.family_command("flaxcnn", "vae", "W", Args)
    assert ours[1:5] == ["-m", "flaxcnn.main", "--workdir", "W"]
    assert ours[6].endswith("configs/vae_mnist.py") and os.path.isfile(ours[6])
    assert "--config.num_epochs=1" in ours and "--config.score_samples=0" in ours
    twin = families.family_command("keras", "gan", "W", Args)
    assert twin[1] == TWIN and twin[2:] == [
        "--family",
        "gan",
        "--epochs",
        "1",
        "--npz",
        "mnist.npz",
    ]
    runs = {
        "flaxcnn:gan": [
            {"seconds": 30.0, "metric": "loss", "value": 1.0, "compile_s": 5.0, "train_s": 20.0},
            None,
        ],
        "keras:gan": [{"seconds": 45.0, "metric": "loss", "value": 2.0}, None],
    }
    cells = [c.strip() for c in families.command_table(runs, ["gan"])[-1].split("|")[1:-1]]
    assert cells == ["gan", "30.0", "-", "5.0 / 20.0", "45.0", "1.50x", "loss 1.0000 / 2.0000"]


def test_user_model_table_takes_medians_and_divides_keras_seconds_by_flaxcnns():
    compare = families.compare_user_models()
    runs = {
        "user_cnn 32 flaxcnn": [
            {"seconds": 30.0, "examples_per_s": 4000.0, "accuracy": 0.99},
            {"seconds": 20.0, "examples_per_s": 5000.0, "accuracy": 0.98},
            None,  # A failed run counts for nothing.
        ],
        "user_cnn 32 keras": [{"seconds": 50.0, "examples_per_s": 2000.0, "accuracy": 0.97}],
        "user_cnn 128 flaxcnn": [None],
        "user_cnn 128 keras": [{"seconds": 40.0, "examples_per_s": 3000.0, "accuracy": 0.96}],
    }
    table = compare.table(runs, ["flaxcnn", "keras"])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table[2:]]
    assert rows == [
        ["user_cnn", "32", "25.0 (4,500)", "50.0 (2,000)", "2.00x", "0.9850 / 0.9700"],
        ["user_cnn", "128", "failed", "40.0 (3,000)", "-", "- / 0.9600"],
    ]
