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


# CIFAR-10: configs/cifar10_fast.py against its PyTorch and Keras 3 twins
# (scripts/benchmark_cifar.py, scripts/peers/{torch,keras}_cifar.py).

CIFAR_SCRIPT = os.path.join(REPO, "scripts", "benchmark_cifar.py")
spec = importlib.util.spec_from_file_location("benchmark_cifar", CIFAR_SCRIPT)
benchmark_cifar = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark_cifar)
CIFAR_TWINS = {
    "torch": os.path.join(REPO, "scripts", "peers", "torch_cifar.py"),
    "keras": os.path.join(REPO, "scripts", "peers", "keras_cifar.py"),
}
CIFAR_CONFIG = os.path.join(REPO, "configs", "cifar10_fast.py")
# Steps where the one-cycle schedules are compared: around the warm-up's end and the run's,
# for the recipe's 1,425 steps (15 epochs of 95) and a short run whose warm-up rounds.
CIFAR_SCHEDULE_STEPS = (0, 1, 2, 3, 100, 426, 427, 428, 429, 1000, 1424, 1425, 1500)
CIFAR_RUN_LENGTHS = (1425, 7)

# Each CIFAR twin's facts, printed as JSON by a fresh interpreter of its own (Keras on its
# numpy backend; the two run side by side): parameter count, recipe constants and script
# defaults, its schedule, optimizer and batch norm settings, dirac initialisation, and its
# data helpers' answers on `root` (split) and on fixed random images (statistics, whitening,
# test-time views), for comparison with flaxcnn's in this process, which stays free of both.
CIFAR_FACTS_PRELUDE = """
import importlib.util, json, os, sys
import numpy as np

def load(name, path):
    sys.path.insert(0, os.path.dirname(path))  # The twins import cifar_data beside them.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

RECIPE = ("STEM", "WIDTHS", "RESIDUAL", "LOGIT_SCALE", "LEARNING_RATE", "MOMENTUM", "L2",
          "LABEL_SMOOTHING", "CROP", "TTA_SHIFT")
images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)

def data_facts(twin, root, normalize):
    data = twin.cifar_data
    classes = sorted(os.listdir(os.path.join(root, "train")))
    paths, labels = data.split_files(root, "train", classes)
    train, validation = data.holdout(labels)
    mean, std = data.channel_stats(images)
    x = normalize(images, mean, std)
    return {
        "split": [[paths[i] for i in train], [paths[i] for i in validation]],
        "labels": labels[train].tolist(),
        "stats": [list(mean), list(std)],
        "kernel": data.whitening_kernel(x, twin.STEM).tolist(),
        "sample": data.whitening_sample(7000, 3).tolist(),
        "validation_percent": data.VALIDATION_PERCENT,
    }

def common(twin, parameters, schedule, root, normalize):
    defaults = twin.parser().parse_args(["--data", "x"])
    return {
        "parameters": parameters,
        "recipe": {name: getattr(twin, name) for name in RECIPE},
        "defaults": [defaults.epochs, defaults.batch_size, defaults.seed],
        "schedule": {n: [float(schedule(n, s)) for s in STEPS] for n in RUNS},
        **data_facts(twin, root, normalize),
    }

def identity(n):  # (3, 3, n, n): a centred 1 from each channel to itself.
    kernel = np.zeros((3, 3, n, n), np.float32)
    kernel[1, 1, np.arange(n), np.arange(n)] = 1.0
    return kernel

"""
CIFAR_TWIN_FACTS = {
    "keras": CIFAR_FACTS_PRELUDE
    + """keras_twin = load("keras_cifar", KERAS)
import keras
net = keras_twin.fast_resnet(10)
convs = [l for l in net.layers if isinstance(l, keras.layers.Conv2D) and l.name != "whiten"]
dirac = all(
    np.array_equal(np.asarray(c.kernel)[..., :n], identity(n))
    for c in convs for n in [min(c.kernel.shape[2:])]
)
norms = [l for l in net.layers if isinstance(l, keras.layers.BatchNormalization)]
x = images[:2].astype("float32")
facts = {
    **common(keras_twin, keras_twin.trainable_parameters(net),
             lambda n, s: keras_twin.OneCycle(n)(s), ROOT, keras_twin.normalize),
    "bn": sorted({(l.momentum, l.epsilon) for l in norms}),
    "dirac": dirac,
    "fixed_stem": [w.path for w in net.non_trainable_weights if "whiten" in w.path]
    == ["whiten/kernel"] and "whiten/bias" in [w.path for w in net.trainable_weights],
    "regularized": sorted(l.name.split("_")[0] for l in net.layers
                          if getattr(l, "kernel_regularizer", None) is not None),
    "views": np.stack([np.asarray(v) for v in keras_twin.views(x)]).tolist(),
}
print(json.dumps(facts))
""",
    "torch": CIFAR_FACTS_PRELUDE
    + """import torch
twin = load("torch_cifar", TORCH)
model = twin.FastResNet(10)
sgd, schedule = twin.optimizer(model, 7)
# The rates the LambdaLR sets (its base rate times its function), without stepping.
rates = [sgd.param_groups[0]["lr"]]
rates += [schedule.base_lrs[0] * schedule.lr_lambdas[0](step) for step in range(1, 9)]
convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m is not model.whiten]
dirac = lambda w: torch.nn.init.dirac_(torch.empty_like(w))
x = torch.from_numpy(images[:2].astype("float32")).permute(0, 3, 1, 2)

def normalize(images, mean, std):  # As the twin's train() does, on NCHW tensors.
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (mean, std))
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    return twin.normalize(nchw, mean, std).permute(0, 2, 3, 1).numpy()

facts = {
    **common(twin, twin.trainable_parameters(model), lambda n, s: twin.onecycle(s, n), ROOT,
             normalize),
    "bn": sorted({(1 - m.momentum, m.eps) for m in model.modules()
                  if isinstance(m, torch.nn.BatchNorm2d)}),
    "dirac": all(torch.equal(c.weight[:n], dirac(c.weight[:n]))
                 for c in convs for n in [min(c.weight.shape[:2])]),
    "fixed_stem": not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad,
    "optimizer": [[g["weight_decay"], len(g["params"]), g["nesterov"], g["momentum"]]
                  for g in sgd.param_groups],
    "stepped_rates": rates,
    "views": np.stack([v.permute(0, 2, 3, 1).numpy() for v in twin.views(x)]).tolist(),
}
print(json.dumps(facts))
""",
}


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory) -> str:
    """A CIFAR-shaped image folder: train/ of 2 classes x 30 JPEGs (flaxcnn's train[98%:]
    keeps one of each), test/ of 2 x 4."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_cifar")
    rng = np.random.default_rng(0)
    for split, count in (("train", 30), ("test", 4)):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg")
    return str(root)


@pytest.fixture(scope="module")
def cifar_twin_facts(tiny_cifar) -> dict:
    """{twin: its facts}, the PyTorch twin's None where PyTorch is not installed."""
    values = dict(KERAS=CIFAR_TWINS["keras"], TORCH=CIFAR_TWINS["torch"], ROOT=tiny_cifar)
    values.update(STEPS=CIFAR_SCHEDULE_STEPS, RUNS=CIFAR_RUN_LENGTHS)
    env = {**os.environ, "KERAS_BACKEND": "numpy", "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = {}
    for name, program in CIFAR_TWIN_FACTS.items():
        if name == "torch" and importlib.util.find_spec("torch") is None:
            continue
        for key, value in values.items():
            program = program.replace(key, repr(value))
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", program],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    facts = {"torch": None}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate()
        assert proc.returncode == 0, stderr[-2000:]
        facts[name] = json.loads(stdout.splitlines()[-1])
    return facts


def cifar_twin(facts: dict, name: str) -> dict:
    """The twin's facts; the PyTorch twin's are None without PyTorch, which skips."""
    if facts[name] is None:
        from flaxcnn import bench

        pytest.skip(bench.TORCH_MISSING)
    return facts[name]


def cifar_model_parameters(config, num_classes: int = 10) -> int:
    """The parameter count of the config's model on 32x32 RGB images, from shapes alone."""
    import jax
    import jax.numpy as jnp

    from flaxcnn import models

    model = models.create_model(config.model, num_classes=num_classes, **config.model_kwargs)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    return sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name", ["torch", "keras"])
def test_cifar_twins_have_the_flax_model_and_recipe(cifar_twin_facts, name):
    facts = cifar_twin(cifar_twin_facts, name)
    config = config_lib.load_file(CIFAR_CONFIG)
    assert facts["parameters"] == cifar_model_parameters(config) == 1_972_504
    kwargs = config.model_kwargs
    assert facts["recipe"] == {
        "STEM": kwargs.stem,
        "WIDTHS": list(kwargs.widths),
        "RESIDUAL": list(kwargs.residual),
        "LOGIT_SCALE": 0.125,  # FastResNet's default, as bn_momentum 0.9 below.
        "LEARNING_RATE": config.learning_rate,
        "MOMENTUM": config.optimizer_kwargs.momentum,
        "L2": config.l2,
        "LABEL_SMOOTHING": config.label_smoothing,
        "CROP": config.augment.crop,
        "TTA_SHIFT": config.test_time_augment.shift,
    }
    assert config.optimizer == "sgd" and config.optimizer_kwargs.nesterov
    assert config.lr_schedule == "onecycle" and config.warmup_steps == 0
    assert (config.train_split, config.validation_split) == ("train[:98%]", "train[98%:]")
    assert config.augment.crop_mode == "reflect" and config.augment.flip_horizontal
    assert config.test_time_augment.flip and config.normalize == "dataset"
    assert facts["defaults"] == [config.num_epochs, config.batch_size, config.seed]
    assert facts["bn"] == [[0.9, 1e-5]] and facts["dirac"] and facts["fixed_stem"]


@pytest.mark.parametrize("name", ["torch", "keras"])
def test_cifar_twins_schedules_are_flaxcnns_onecycle(cifar_twin_facts, name):
    from flaxcnn.training import state

    facts = cifar_twin(cifar_twin_facts, name)
    # optax's schedule is float32: near its end (2.6e-6) it is off by up to 3.5e-9.
    for total in CIFAR_RUN_LENGTHS:
        ours = state.SCHEDULES["onecycle"](0.4, total, 0)
        expected = [float(ours(step)) for step in CIFAR_SCHEDULE_STEPS]
        assert facts["schedule"][str(total)] == pytest.approx(expected, rel=1e-5, abs=1e-8)
    if name == "torch":  # The rate the optimizer steps with, through its LambdaLR.
        ours = state.SCHEDULES["onecycle"](0.4, 7, 0)
        expected = [float(ours(step)) for step in range(9)]
        assert facts["stepped_rates"] == pytest.approx(expected, rel=1e-5, abs=1e-8)
        # L2 on the kernels only (0.5 * l2 * sum(w^2): l2 * w in the gradient), Nesterov.
        # 7 kernels (6 convolutions, the dense); the whitening bias and 6 batch norms' 2.
        assert facts["optimizer"] == [[5e-4, 7, True, 0.9], [0.0, 13, True, 0.9]]
    else:  # Keras's L2 has no 0.5: L2(l2 / 2) on every convolution and the dense kernel.
        assert facts["regularized"] == ["conv2d"] * 6 + ["dense"]


@pytest.mark.parametrize("name", ["torch", "keras"])
def test_cifar_twins_split_normalise_whiten_and_view_as_flaxcnn(cifar_twin_facts, tiny_cifar, name):
    import numpy as np

    from flaxcnn.data import image_folder, preprocess
    from flaxcnn.models import test_time, whitening

    facts = cifar_twin(cifar_twin_facts, name)
    dataset = f"folder:{tiny_cifar}"
    train, labels, _ = image_folder.split_paths(dataset, "train[:98%]")
    validation, _, _ = image_folder.split_paths(dataset, "train[98%:]")
    assert facts["split"] == [train, validation] and len(validation) == 2
    assert facts["validation_percent"] == 2  # train[98%:]
    assert facts["labels"] == labels.tolist()
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    stats = preprocess.channel_stats(images)
    assert sum(facts["stats"], []) == pytest.approx(stats.mean + stats.std, rel=1e-12)
    kernel = whitening.whitening_kernel(preprocess.to_model_input(images, *stats), 2, 24)
    np.testing.assert_allclose(facts["kernel"], kernel, rtol=1e-6, atol=1e-7)
    assert facts["sample"] == whitening.sample_rows(7000, (32, 32, 3), 3).tolist()
    views = test_time.views(images[:2].astype(np.float32), flip=True, shift=1)
    np.testing.assert_array_equal(facts["views"], np.stack(views))


def cifar_smoke_run(name: str, root: str, tmp_path) -> dict:
    """The twin's whole command on `root`, two steps of batch 16: its results JSON."""
    out = tmp_path / f"{name}.json"
    command = [sys.executable, CIFAR_TWINS[name], "--data", root, "--batch-size", "16"]
    command += ["--max-steps", "2", "--out", str(out)]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout and "data loaded in" in proc.stdout
    with open(out) as f:
        return json.load(f)


def check_smoke_results(results: dict) -> None:
    assert results["steps"] == 2 and results["num_test_examples"] == 8
    assert 0 <= results["test_accuracy"] <= 1 and len(results["validation_accuracy"]) == 1
    assert results["train_examples_per_s"] > 0 and results["load_data_s"] >= 0
    assert results["parameters"] == 1_972_504 - 8 * 256  # Two classes' logits, not ten.


@pytest.mark.slow  # The peers' whole commands, as Keras's below: 15-25 s each.
def test_torch_cifar_twin_runs_its_whole_command(tiny_cifar, tmp_path):
    if importlib.util.find_spec("torch") is None:
        from flaxcnn import bench

        pytest.skip(bench.TORCH_MISSING)
    check_smoke_results(cifar_smoke_run("torch", tiny_cifar, tmp_path))


@pytest.mark.slow
def test_keras_cifar_twin_runs_its_whole_command(tiny_cifar, tmp_path):
    check_smoke_results(cifar_smoke_run("keras", tiny_cifar, tmp_path))


def test_cifar_commands_are_the_shell_commands_a_user_types():
    args = benchmark_cifar.parser().parse_args(["--data", "R", "--seeds", "3", "--max-steps", "5"])
    ours = benchmark_cifar.command("flaxcnn", "R", 3, "W", args)
    assert ours[1:7] == ["-m", "flaxcnn.main", "--workdir", "W", "--config", CIFAR_CONFIG]
    assert ours[7:] == [
        "--config.dataset=folder:R",
        "--config.seed=3",
        "--config.num_epochs=15",
        "--config.batch_size=512",
        "--config.num_train_steps=5",
    ]
    torch = benchmark_cifar.command("torch", "R", 3, "W", args)
    assert torch[1] == CIFAR_TWINS["torch"] and torch[2:6] == ["--data", "R", "--seed", "3"]
    assert torch[-4:] == ["--out", os.path.join("W", "results.json"), "--max-steps", "5"]
    keras = benchmark_cifar.command("keras-jax", "R", 3, "W", args)
    assert keras[1] == CIFAR_TWINS["keras"]
    assert benchmark_cifar.environment("keras-jax", "C")["KERAS_BACKEND"] == "jax"
    assert benchmark_cifar.environment("flaxcnn", "C")["XDG_CACHE_HOME"] == "C"

    # scripts/benchmark.py --cifar hands its --cifar-* options over.
    class Args:
        cifar_contenders, cifar_seeds, cifar_repeats = ["flaxcnn", "keras"], [0, 1], 2
        cifar_epochs, cifar_max_steps, cifar_data, out = 3, 0, "R", "O"

    options = benchmark_cifar.parser().parse_args(benchmark.cifar_arguments(Args))
    assert (options.contenders, options.seeds, options.repeats) == (["flaxcnn", "keras"], [0, 1], 2)
    assert (options.epochs, options.data, options.out) == (3, "R", "O")


def test_cifar_timing_reads_each_commands_own_peak_memory_and_stops_at_the_timeout():
    grow = "import numpy as np; a = np.ones(300 * 2**20 // 8); print('done')"
    env = dict(os.environ)
    big = benchmark_cifar.run_timed([sys.executable, "-c", grow], env, 60)
    small = benchmark_cifar.run_timed([sys.executable, "-c", "print('done')"], env, 60)
    assert big["returncode"] == small["returncode"] == 0 and "done" in small["output"]
    # Each its own: the smaller command after the bigger one reads its own, smaller peak (a
    # RUSAGE_CHILDREN maximum would not), and not this process's RSS either.
    assert big["peak_memory_mb"] > 300 > 100 > small["peak_memory_mb"]
    sleep = [sys.executable, "-c", "import time; time.sleep(30)"]
    stopped = benchmark_cifar.run_timed(sleep, env, 0.5)
    assert stopped["returncode"] is None and stopped["seconds"] < 10


def test_cifar_table_compares_flaxcnn_with_the_fastest_peer_as_accurate():
    def run(contender, seed, seconds, accuracy, repeat=1):
        return {
            "contender": contender,
            "seed": seed,
            "repeat": repeat,
            "failed": False,
            "seconds": seconds,
            "accuracy": accuracy,
            "peak_memory_mb": 1000.0,
            "cpu_s": 2 * seconds,
        }

    rows = [
        # Seed 0: both peers reach 90%; the faster one counts.
        run("flaxcnn", 0, 100.0, 0.905),
        run("torch", 0, 150.0, 0.902),
        run("keras", 0, 300.0, 0.91),
        # Seed 1: flaxcnn falls short (0.895); torch (0.89) is below even that, Keras not.
        run("flaxcnn", 1, 100.0, 0.895),
        run("torch", 1, 120.0, 0.89),
        run("keras", 1, 250.0, 0.899),
        # Seed 2: no peer as accurate; torch failed.
        run("flaxcnn", 2, 100.0, 0.92),
        {"contender": "torch", "seed": 2, "repeat": 1, "failed": True},
        run("keras", 2, 90.0, 0.85),
    ]
    lines = benchmark_cifar.table(rows)
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:11]]
    # contender, seed, repeat, seconds, accuracy, reached, MB, CPU s, speed-up.
    assert cells[0][:4] == ["flaxcnn", "0", "1 (empty caches)", "100.0"]
    assert cells[0][4:] == ["0.9050", "yes", "1,000", "200", "1.50x"]
    assert cells[1][2:] == ["1", "150.0", "0.9020", "yes", "1,000", "300", "-"]
    assert cells[3][-1] == "2.50x" and cells[3][5] == "no"
    assert cells[6][-1] == "no peer as accurate"
    assert cells[7] == ["torch", "2", "1", "failed", "-", "-", "-", "-", "-"]
    assert lines[-1] == "flaxcnn's speed-up, median over its runs: 2.00x"
