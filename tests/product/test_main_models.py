"""A model class defined in `__main__` (a script run directly, or a notebook cell: the
quickstart notebook's test) trains with `flaxcnn.fit`, is saved with its run, and comes back
in new processes: `load_run`, evaluate, predict; resuming with a changed class is refused."""

import json
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import flaxcnn
    from flax import linen as nn


    class Tiny(nn.Module):
        num_classes: int = 10

        @nn.compact
        def __call__(self, x, train: bool = False):
            x = x.reshape(x.shape[0], -1)
            return nn.Dense(self.num_classes)(nn.relu(nn.Dense(HIDDEN)(x)))


    if __name__ == "__main__":
        results = flaxcnn.fit(
            Tiny(), "embedded_mnist", sys.argv[1], num_train_steps=20, force="--force" in sys.argv
        )
        print("accuracy", results["test_accuracy"])
    """
)
LOAD = (
    "import sys, numpy as np, flaxcnn\n"
    "run = flaxcnn.load_run(sys.argv[1])\n"
    "print(run.predict_proba(np.zeros((3, 28, 28, 1))).shape)\n"
)


@pytest.fixture(scope="session")
def train_script(run_command):
    def train_script(tmp_path, workdir, hidden=16, *flags):
        script = tmp_path / f"tiny_{hidden}.py"
        script.write_text(SCRIPT.replace("HIDDEN", str(hidden)))
        return run_command(
            str(workdir),
            *flags,
            module=script.stem,
            cwd=tmp_path,
            env={"PYTHONPATH": str(tmp_path)},
        )

    return train_script


# Slow: each trains or evaluates in a new process (the quickstart notebook's test covers a
# notebook's class in the quick suite).
@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_script):
    tmp_path = tmp_path_factory.mktemp("main_models")
    workdir = tmp_path / "runs" / "tiny"
    result = train_script(tmp_path, workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp_path, workdir


@pytest.mark.slow
def test_a_script_class_is_saved_with_its_run(trained):
    _, workdir = trained
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"] == f"{workdir}/model_class.pkl:Tiny"
    source = (workdir / "model_class.py").read_text()
    assert source.startswith("class Tiny(nn.Module):") and "nn.Dense(16)" in source


@pytest.mark.slow
def test_new_processes_load_evaluate_and_predict_it(trained, tmp_path, run_command):
    _, workdir = trained
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    loaded = run_command(
        str(workdir), module="load", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)}
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip().endswith("(3, 10)")
    evaluated = run_command("--workdir", str(workdir), module="flaxcnn.evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.loads((workdir / "results.json").read_text())
    assert f"accuracy {results['test_accuracy']:.4f}" in evaluated.stdout


@pytest.mark.slow
def test_resuming_with_a_changed_class_is_refused_and_force_moves_the_run(trained, train_script):
    tmp_path, workdir = trained
    changed = train_script(tmp_path, workdir, 24)
    assert changed.returncode != 0
    assert (
        "holds a run of model 'Tiny as in model_class.py' (not 'a Tiny of another source')"
        in changed.stderr.strip().splitlines()[-1]
    )
    forced = train_script(tmp_path, workdir, 24, "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "nn.Dense(24)" in (workdir / "model_class.py").read_text()
    assert "nn.Dense(16)" in (workdir / "replaced-1" / "model_class.py").read_text()


def test_an_unloadable_class_file_is_a_one_line_error(tmp_path):
    from flaxcnn import resolver

    bad = tmp_path / "model_class.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"^cannot load the model class saved in .*load_run"):
        resolver.load_saved_class(str(bad))
    with pytest.raises(ValueError, match="is missing"):
        resolver.load_saved_class(str(tmp_path / "none.pkl"))


def test_without_a_workdir_a_main_class_is_refused_saying_what_to_do():
    from flax import linen as nn

    import flaxcnn

    Local = type("Local", (nn.Module,), {"__module__": "__main__", "__call__": lambda s, x: x})
    with pytest.raises(ValueError, match="train it with flaxcnn.fit, which saves the class"):
        flaxcnn.make_config(Local)


def test_load_run_takes_the_class_where_its_saved_one_cannot_load(tmp_path, monkeypatch):
    import numpy as np
    from flax import linen as nn

    import flaxcnn
    from flaxcnn import resolver

    class Local(nn.Module):  # Defined in a function: saved by value like a `__main__` class.
        num_classes: int = 10

        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))

    workdir = tmp_path / "run"
    flaxcnn.fit(Local(), "embedded_mnist", str(workdir), num_train_steps=2, steps_per_dispatch=1)
    (workdir / "model_class.pkl").write_bytes(b"saved by another Python")
    monkeypatch.setattr(resolver, "_defined_here", {})  # As in a new process.
    monkeypatch.setattr(resolver, "_loaded", {})
    with pytest.raises(ValueError, match="cannot load the model class saved in"):
        flaxcnn.load_run(str(workdir))
    run = flaxcnn.load_run(str(workdir), model=Local)
    assert run.predict_proba(np.zeros((2, 28, 28, 1), np.uint8)).shape == (2, 10)
    # A class loaded or given is not this process's to save: the run's files stay as they are.
    resolver.save_model_class(run.config.model)
    assert (workdir / "model_class.pkl").read_bytes() == b"saved by another Python"
