"""The open framework: a user's own model, task and optimizer, from the command line and from
Python, through the same loop, checkpoints, evaluation, prediction and export."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import flaxcnn
from flaxcnn import config as config_lib
from flaxcnn import default_config, inference, run_files
from flaxcnn.cli import evaluate, export, predict
from flaxcnn.models import create_model, model_arguments
from flaxcnn.tasks import get_task
from flaxcnn.training.regularization import decay_mask
from flaxcnn.training.state import create_optimizer

REPO = pathlib.Path(__file__).resolve().parents[2]

# A user's model file: plain flax.linen layers, nothing from flaxcnn.
USER_NETS = '''
import jax.numpy as jnp
from flax import linen as nn


class TinyNet(nn.Module):
    width: int = 4
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(self.width, (3, 3), strides=(2, 2))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class Denoiser(nn.Module):
    """No num_classes: built without it."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.sigmoid(nn.Conv(1, (3, 3))(nn.relu(nn.Conv(4, (3, 3))(x))))
'''

# A user's task written against flaxcnn.tasks.base.Task alone: denoising.
DENOISE_TASK = """
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from flaxcnn.models import create_model, model_arguments


def create_state(config, rng, input_shape, num_classes, total_steps):
    model = create_model(config.model, **config.model_kwargs)
    params = model.init(rng, jnp.zeros((1, *input_shape)), train=False)["params"]
    tx = optax.adam(config.learning_rate)
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def step_kwargs(config):
    return {"noise": 0.3}


def _errors(state, params, clean, noisy):
    out = state.apply_fn({"params": params}, noisy, train=False)
    return jnp.mean((out - clean) ** 2, axis=(1, 2, 3))


def train_step(state, batch, rng, *, noise):
    rng = jax.random.fold_in(rng, state.step)
    clean = batch["image"]
    noisy = jnp.clip(clean + noise * jax.random.normal(rng, clean.shape), 0.0, 1.0)
    loss_fn = lambda p: jnp.mean(_errors(state, p, clean, noisy))
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    count = jnp.float32(clean.shape[0])
    return state.apply_gradients(grads=grads), {"loss": loss * count, "count": count}


def eval_step(state, batch, rng):
    weights = batch["mask"].astype(jnp.float32)
    errors = _errors(state, state.params, batch["image"], batch["image"])
    return {"loss": jnp.sum(errors * weights), "count": jnp.sum(weights)}
"""


@pytest.fixture(scope="session")
def run_train(run_command):
    def run_train(*args, cwd) -> subprocess.CompletedProcess:
        return run_command(*args, env={"PYTHONPATH": str(REPO)}, cwd=cwd)

    return run_train


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("user")
    (path / "my_nets.py").write_text(USER_NETS)
    (path / "denoise_task.py").write_text(DENOISE_TASK)
    return path


@pytest.fixture(scope="module")
def user_run(user_dir, data_dir, run_train, tiny_run_flags) -> str:
    """A model from a user's file, trained from the command line by a relative path, with a
    model argument the config never had: 4 steps, then 8 (a resume)."""
    workdir = str(user_dir / "run")
    args = [
        f"--workdir={workdir}",
        "--config.model=my_nets.py:TinyNet",
        "--config.model_kwargs.width=6",
        f"--config.data_dir={data_dir}",
        *tiny_run_flags,
        "--config.log_every_steps=2",
    ]
    first = run_train(*args, "--config.num_train_steps=4", cwd=user_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(*args, "--config.num_train_steps=8", cwd=user_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "test accuracy" in second.stdout
    return workdir


def test_user_model_file_trains_resumes_and_is_recorded_absolute(user_run, user_dir):
    results = json.loads((user_dir / "run" / run_files.RESULTS).read_text())
    assert results["steps"] == 8 and results["steps_this_run"] == 4  # Resumed at step 4.
    config = json.loads((user_dir / "run" / run_files.CONFIG).read_text())
    assert config["model"] == f"{user_dir / 'my_nets.py'}:TinyNet"
    assert config["model_kwargs"] == {"width": 6}
    summary = (user_dir / "run" / run_files.MODEL_SUMMARY).read_text()
    assert "Conv" in summary and "Total Parameters: " in summary


def test_user_model_evaluates_predicts_and_exports_with_parity(user_run, tmp_path, data_dir):
    from PIL import Image

    from flaxcnn.data import input_pipeline

    assert evaluate.main(["--workdir", user_run]) == 0
    with open(os.path.join(user_run, "eval_test.json")) as f:
        assert json.load(f)["count"] == 2000
    images = input_pipeline.load_split("embedded_mnist", "test[:5]", data_dir).images
    Image.fromarray(images[0][..., 0]).save(tmp_path / "digit.png")
    assert predict.main(["--workdir", user_run, "--json", str(tmp_path / "digit.png")]) == 0
    out = str(tmp_path / "export")
    assert export.main(["--workdir", user_run, "--out", out]) == 0
    with open(os.path.join(out, export.STABLEHLO_FILE), "rb") as f:
        exported = jax.export.deserialize(f.read())
    run = inference.load_run(user_run)
    assert run.step == 8
    np.testing.assert_allclose(exported.call(images), run.predict_proba(images), atol=1e-5)


def test_console_command_runs_each_command(user_run, capsys):
    from flaxcnn import cli

    assert cli.run_command(["evaluate", "--workdir", user_run, "--split", "test[:100]"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert cli.run_command(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err
    with open(REPO / "pyproject.toml", "rb") as f:
        import tomllib

        assert tomllib.load(f)["project"]["scripts"]["flaxcnn"] == "flaxcnn.cli:main"


@pytest.mark.slow
def test_python_api_records_an_instance_and_loads_it_back(user_dir, data_dir, tmp_path):
    sys.path.insert(0, str(user_dir))
    try:
        import my_nets
    finally:
        sys.path.remove(str(user_dir))
    workdir = str(tmp_path / "api")
    settings = dict(data_dir=data_dir, num_train_steps=4, eval_batch_size=500)
    results = flaxcnn.fit(my_nets.TinyNet(width=3), "embedded_mnist", workdir, **settings)
    assert results["steps"] == 4 and 0 <= results["test_accuracy"] <= 1
    with open(os.path.join(workdir, run_files.CONFIG)) as f:
        config = json.load(f)
    assert config["model"] == f"{user_dir / 'my_nets.py'}:TinyNet"
    assert config["model_kwargs"] == {"width": 3}  # num_classes comes from the dataset.
    run = flaxcnn.load_run(workdir)
    assert run.predict_proba(np.zeros((2, 28, 28, 1), np.uint8)).shape == (2, 10)
    assert run.state.params["Conv_0"]["kernel"].shape[-1] == 3
    # Finished: the same call re-reports without training.
    assert flaxcnn.fit(my_nets.TinyNet(width=3), "embedded_mnist", workdir, **settings) == results


@pytest.mark.slow
def test_user_task_file_runs_through_the_loop(user_dir, data_dir, tmp_path):
    workdir = str(tmp_path / "denoise")
    results = flaxcnn.fit(
        f"{user_dir / 'my_nets.py'}:Denoiser",
        "embedded_mnist",
        workdir,
        task=str(user_dir / "denoise_task.py"),
        data_dir=data_dir,
        num_train_steps=6,
        eval_batch_size=500,
        log_every_steps=3,
    )
    assert results["steps"] == 6 and results["num_test_examples"] == 2000
    assert 0 < results["test_loss"] < 0.5  # Mean squared error per pixel.
    assert set(results) >= {"test_loss", "train_time_s"}


def test_describe_model_refuses_local_classes_and_unrecordable_fields():
    from flax import linen as nn

    class Local(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return x

    with pytest.raises(ValueError, match="inside a function"):
        config_lib.describe_model(Local())
    from flaxcnn.models.cnn import CNN

    assert config_lib.describe_model(CNN(widths=(4, 8), num_classes=3)) == (
        "flaxcnn.models.cnn:CNN",
        {"widths": (4, 8)},
    )
    with pytest.raises(ValueError, match="cannot be recorded in config.json"):
        config_lib.describe_model(CNN(widths=(object(),)))


def test_resolver_names_builtins_import_paths_and_files(user_dir):
    assert create_model("flaxcnn.models.cnn:SeedCNN").__class__.__name__ == "SeedCNN"
    model = create_model(f"{user_dir / 'my_nets.py'}:TinyNet", num_classes=7, width=2)
    assert (model.num_classes, model.width) == (7, 2)
    # The dataset's num_classes goes only to modules that take it.
    denoiser = f"{user_dir / 'my_nets.py'}:Denoiser"
    assert model_arguments(denoiser, {"num_classes": 7}) == {}  # Dropped: it takes none.
    assert type(create_model(denoiser, num_classes=7)).__name__ == "Denoiser"
    same = config_lib.resolve("model", f"{user_dir / 'my_nets.py'}:TinyNet", {})
    assert same is type(model)  # One module per file: classes keep their identity.
    with pytest.raises(ValueError, match=r"unknown model 'Nope'; valid: CNN, .*SeedCNN, or an"):
        create_model("Nope")
    with pytest.raises(ValueError, match="has no 'Missing'"):
        create_model(f"{user_dir / 'my_nets.py'}:Missing")
    with pytest.raises(ValueError, match="not found"):
        create_model("no_such_file.py:Net")
    with pytest.raises(ValueError, match="takes no argument 'widht' .did you mean 'width'"):
        create_model(f"{user_dir / 'my_nets.py'}:TinyNet", widht=3)
    assert get_task(str(user_dir / "denoise_task.py")).step_kwargs(None) == {"noise": 0.3}
    with pytest.raises(ValueError, match="task .* lacks create_state, train_step, eval_step"):
        get_task(f"{user_dir / 'my_nets.py'}")


def test_overrides_open_only_the_user_dicts_and_store_paths_absolute(user_dir, monkeypatch):
    monkeypatch.chdir(user_dir)
    config = config_lib.load(
        None,
        [
            ("model", "my_nets.py:TinyNet"),
            ("model_kwargs.width", "32"),
            ("model_kwargs.cell", "gru"),
            ("optimizer_kwargs.b1", "0.95"),
            ("augment.rotation", "10"),
            ("image_size", "(28, 28)"),
            ("imports", "('my_nets.py',)"),
        ],
    )
    assert config.model == f"{user_dir / 'my_nets.py'}:TinyNet"
    assert config.model_kwargs.to_dict() == {"width": 32, "cell": "gru"}
    assert config.optimizer_kwargs.b1 == 0.95 and config.augment.rotation == 10.0
    assert config.image_size == (28, 28) and config.imports == (str(user_dir / "my_nets.py"),)
    for overrides, message in [
        (
            [("learning_rat", "1")],
            "unknown config key 'learning_rat'; did you mean 'learning_rate'",
        ),
        ([("augment.rotatoin", "1")], "unknown config key 'rotatoin' in --config.augment.rotatoin"),
        ([("batch_size", "1.5")], "batch_size.*'1.5'"),
        ([("skip_nonfinite", "maybe")], "not a bool"),
    ]:
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.load(None, overrides)


def test_any_optax_optimizer_with_its_arguments_under_the_schedule():
    config = default_config.get_config()
    config.optimizer = "lion"
    config.optimizer_kwargs.b1 = 0.999  # Flips the second update's sign (0.9 does not).
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    grads = {"w": jnp.full((3, 2), 0.2), "b": jnp.full(2, -0.1)}

    def two_updates(tx):
        state = tx.init(params)
        first, state = tx.update(grads, state, params)
        second, _ = tx.update(jax.tree.map(lambda g: -g, grads), state, params)
        return second

    got = two_updates(create_optimizer(config, total_steps=10))
    want = two_updates(optax.lion(1e-3, b1=0.999, weight_decay=0.0))
    default_b1 = two_updates(optax.lion(1e-3, weight_decay=0.0))
    for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(default_b1)):
        np.testing.assert_allclose(a, b)
        assert not np.allclose(a, c)  # b1 reached the optimizer.
    config.optimizer_kwargs = ml_collections.ConfigDict({"b3": 1.0})
    with pytest.raises(ValueError, match="optimizer_kwargs.b3 is not an argument of .*'lion'"):
        create_optimizer(config, 10)
    # Weight decay goes to any optimizer that takes it, on the kernels only; not to one that
    # does not.
    config.optimizer_kwargs = ml_collections.ConfigDict()
    config.weight_decay = 0.1
    decayed = two_updates(create_optimizer(config, 10))
    want = two_updates(optax.lion(1e-3, weight_decay=0.1, mask=decay_mask(params)))
    undecayed = two_updates(optax.lion(1e-3, weight_decay=0.0))
    np.testing.assert_allclose(decayed["w"], want["w"])
    assert not np.allclose(decayed["w"], undecayed["w"])  # The kernel decays ...
    np.testing.assert_allclose(decayed["b"], undecayed["b"])  # ... the bias does not.
    config.optimizer = "rmsprop"
    with pytest.raises(ValueError, match="weight_decay needs optimizer 'adamw'"):
        create_optimizer(config, 10)


def test_an_optimizer_by_import_path(user_dir, tiny_config):
    (user_dir / "my_opt.py").write_text(
        "import optax\n\ndef scaled_sgd(learning_rate, factor=0.5):\n"
        "    return optax.chain(optax.sgd(learning_rate), optax.scale(factor))\n"
    )
    optimizer = f"{user_dir / 'my_opt.py'}:scaled_sgd"
    config = tiny_config(data_dir="unused", learning_rate=1.0, optimizer=optimizer)
    config.optimizer_kwargs.factor = 0.25
    tx = create_optimizer(config, 10)
    updates, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))
    np.testing.assert_allclose(updates["w"], -0.25)


@pytest.mark.slow
def test_model_summary_is_a_layer_table_or_a_parameter_list():
    from flaxcnn.reporting.summary import model_summary
    from flaxcnn.training.state import create_train_state

    model = create_model("CNN", widths=(4, 8))
    state = create_train_state(model, optax.adam(1e-3), jax.random.key(0), (28, 28, 1))
    table = model_summary(state, (28, 28, 1))
    assert table.startswith("Model CNN, input (28, 28, 1)")
    assert "Conv_0" in table and "float32[1,28,28,4]" in table and "Total Parameters: " in table

    class NoModule:  # E.g. a GAN's state: its parameters, one line each, and the total.
        params = state.params

    listed = model_summary(NoModule(), (28, 28, 1))
    assert "Dense_0/kernel     392x10" in listed
    assert listed.endswith(
        f"Total parameters: {sum(x.size for x in jax.tree.leaves(state.params)):,}\n"
    )


def test_a_config_file_may_define_its_model_and_point_at_itself(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.py").write_text(
        textwrap.dedent("""
        from flax import linen as nn

        from flaxcnn import default_config


        class Mine(nn.Module):
            num_classes: int = 10

            @nn.compact
            def __call__(self, x, train=False):
                return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


        def get_config():
            config = default_config.get_config()
            config.model = "configs/mine.py:Mine"  # Relative to where the command runs.
            return config
        """)
    )
    monkeypatch.chdir(tmp_path)
    config = config_lib.load("configs/mine.py")
    assert config.model == f"{tmp_path / 'configs' / 'mine.py'}:Mine"
    config_lib.validate(config)
    assert type(create_model(config.model, num_classes=3)).__name__ == "Mine"


def test_a_model_without_a_train_argument_is_refused_by_name(tmp_path, tiny_config):
    (tmp_path / "plain.py").write_text(
        "from flax import linen as nn\n\n\nclass NoTrain(nn.Module):\n"
        "    @nn.compact\n    def __call__(self, x):\n        return nn.Dense(10)(x)\n"
    )
    config = tiny_config(data_dir="unused", model=f"{tmp_path / 'plain.py'}:NoTrain")
    with pytest.raises(ValueError, match=r"NoTrain': __call__ must accept `train: bool`"):
        config_lib.validate(config)
    config.task = str(tmp_path / "plain.py")  # Not a task: the task is checked first.
    with pytest.raises(ValueError, match="lacks create_state"):
        config_lib.validate(config)
