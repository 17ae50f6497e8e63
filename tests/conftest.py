"""Shared fixtures: the embedded dataset prepared once, the optional real-MNIST folder, the
command in a fresh process, and the image-folder runs of the streaming tests."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_TFDS = REPO.parent / "shared" / "data" / "tfds"
# Full trainings (tests/product/test_accuracy.py) take many minutes on a 2-core CPU: the slow
# suite's per-test bound, unless a test carries its own @pytest.mark.timeout.
SLOW_TIMEOUT_S = 3600


# The quick suite's time is mostly XLA compiling small programs, which XLA:CPU's classic
# emitters without LLVM's optimisations do 2-3x faster than its defaults (the whole quick
# suite: 175 s against 331 s), computing the same up to float32 rounding. The slow suite
# trains to accuracy targets and times nothing by the clock, but runs what users run: XLA's
# defaults.
QUICK_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"


def pytest_configure(config) -> None:
    """One on-disk compilation cache for the whole run, shared by the xdist workers (they
    inherit the controller's environment) and the commands the tests start: most tests
    compile the same small steps, and compiling is most of their time. Kept out of the
    user's own cache, and removed at the end."""
    import jax

    from flaxcnn.data.cache import CACHE_ENV as SPLIT_CACHE_ENV

    if not hasattr(config, "workerinput"):  # The controller, or a run without xdist.
        cache = tempfile.mkdtemp(prefix="flaxcnn-test-jax-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
        # Hermetic: a home of the run's own, so the split, scorer and kernel caches (under
        # ~/.cache) start empty and the user's are never read or written.
        os.environ["HOME"] = os.path.join(cache, "home")
        os.environ.pop("XDG_CACHE_HOME", None)
        os.environ.pop(SPLIT_CACHE_ENV, None)
        os.environ.pop("FLAXCNN_CACHE_DIR", None)
        if config.getoption("markexpr", "").replace(" ", "") == "notslow":
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_XLA_FLAGS}"
    assert os.path.expanduser("~/.cache").startswith(os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config) -> None:
    if not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ.pop("JAX_COMPILATION_CACHE_DIR", ""), ignore_errors=True)


# A skip whose reason starts so says the test cannot apply on this platform; under CI every
# other skip is a failure, so a green CI has run every test that applies.
PLATFORM_SKIP = "not on this platform: "


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if not (os.environ.get("CI") and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not reason.startswith(("Skipped: " + PLATFORM_SKIP, PLATFORM_SKIP)):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, which runs every test that applies: {reason}"


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    # The full trainings first: xdist hands each worker the next tests in this order, so one
    # started late would run on alone after the other worker has finished the rest.
    items.sort(key=lambda item: item.get_closest_marker("full_training") is None)


# A few steps, and evaluation splits of one batch of 500 (unoptimised programs run slowly).
TINY_RUN = {
    "num_train_steps": 8,
    "eval_batch_size": 500,
    "validation_split": "train[95%:]",
    "test_split": "test[:500]",
}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A tfds data_dir holding the embedded dataset, prepared offline, with the splits of the
    default config and of `tiny_config` decoded into the split cache: the commands that tests
    start read them without importing TensorFlow."""
    from flaxcnn import default_config
    from flaxcnn.data import input_pipeline

    path = str(tmp_path_factory.mktemp("tfds"))
    input_pipeline.get_builder(input_pipeline.EMBEDDED, path)
    default = default_config.get_config()
    tiny = (TINY_RUN["validation_split"], TINY_RUN["test_split"])
    for split in (default.train_split, default.validation_split, default.test_split, *tiny):
        input_pipeline.load_split(input_pipeline.EMBEDDED, split, path)
    return path


@pytest.fixture(scope="session")
def shared_tfds() -> str:
    """The prepared real-MNIST tfds folder beside the repo (see `find_shared_tfds`)."""
    return _find_shared_tfds(SHARED_TFDS)


@pytest.fixture(scope="session")
def find_shared_tfds():
    """`find_shared_tfds(root)`: `root` if it holds the prepared real MNIST; tests needing it
    skip without it, except under CI (the `CI` environment variable set), where its absence
    is a failure: a green CI must have run them."""
    return _find_shared_tfds


def _find_shared_tfds(root: pathlib.Path) -> str:
    if not (root / "mnist").is_dir():
        message = f"real MNIST not found at {root}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (required when CI is set)")
        pytest.skip(message)
    return str(root)


@pytest.fixture(scope="session")
def tiny_config(request):
    """`tiny_config(**overrides)`: the default config shrunk (`TINY_RUN`), for end-to-end
    tests, on the `data_dir` fixture's dataset unless `data_dir` is among the overrides; one
    step per dispatch, whose compilation is the quickest (several steps per dispatch equal
    single steps: data/test_device_data.py; the slow suite's runs dispatch several)."""
    from flaxcnn import default_config

    def make(**overrides):
        config = default_config.get_config()
        if "data_dir" not in overrides:
            config.data_dir = request.getfixturevalue("data_dir")
        config.update(TINY_RUN)
        config.log_every_steps = 4
        config.steps_per_dispatch = 1
        config.update(overrides)
        return config

    return make


@pytest.fixture(scope="session")
def tiny_data_flags() -> list[str]:
    """Command-line flags shrinking a run to small splits of its dataset: 20 steps an epoch
    of 640 training images, a validation and a test split of a few hundred."""
    return [
        "--config.train_split=train[:640]",
        "--config.validation_split=train[90%:95%]",
        "--config.test_split=test[:300]",
        "--config.eval_batch_size=150",
        "--config.batch_size=32",  # 20 steps an epoch.
        "--config.log_every_steps=6",
    ]


@pytest.fixture(scope="session")
def platform_skip() -> str:
    """The start of a skip's reason saying the test cannot apply on this platform."""
    return PLATFORM_SKIP


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def run_command():
    """`run_command(*args, module=, env=, cwd=, timeout=)`: see `_run_command`."""
    return _run_command


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli(*args, timeout=180)`: the training command (`_run_command`'s default)."""

    def run_cli(*args, timeout=180) -> subprocess.CompletedProcess:
        return _run_command(*args, timeout=timeout)

    return run_cli


def _run_command(
    *args: str, module: str = "flaxcnn.main", env: dict | None = None, cwd=REPO, timeout=300
) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in a fresh interpreter on the CPU, its output captured;
    `env` adds to (or overrides) this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu", **(env or {})},
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_run_flags() -> list[str]:
    """The command-line flags of `tiny_config`'s run (not its logging or dispatch)."""
    return [f"--config.{key}={value}" for key, value in TINY_RUN.items()]


@pytest.fixture(scope="session")
def prior_run(data_dir, tmp_path_factory, tiny_run_flags) -> str:
    """The workdir of a finished tiny run, shared (copied) by the bad-input and the
    damaged-workdir tests."""
    from flaxcnn.cli import train

    workdir = str(tmp_path_factory.mktemp("prior") / "run")
    train.run([f"--workdir={workdir}", f"--config.data_dir={data_dir}", *tiny_run_flags])
    return workdir


@pytest.fixture(scope="session")
def mnist_folder(tmp_path_factory) -> str:
    """An image folder `<root>/<split>/<digit>/<i>.png` of the embedded MNIST's first 800
    training and 300 test images."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("mnist_folder")
    data = np.load(REPO / "flaxcnn" / "data" / "embedded_mnist.npz")
    for split, count in (("train", 800), ("test", 300)):
        images, labels = data[f"x_{split}"][:count], data[f"y_{split}"][:count]
        for digit in range(10):
            os.makedirs(root / split / str(digit), exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(root / split / str(label) / f"{i}.png")
    return str(root)


@pytest.fixture(scope="session")
def tiny_flags(tiny_data_flags) -> list[str]:
    """`tiny_data_flags` for `mnist_folder`: 2 epochs of 20 steps, in grayscale."""
    return [*tiny_data_flags, "--config.num_epochs=2", "--config.color_mode=grayscale"]


@pytest.fixture(scope="session")
def train(run_command, tiny_flags):
    """`train(workdir, folder, *args)`: the command on the image folder `folder` with
    `tiny_flags` and `args`, on one CPU device; it must succeed."""

    def train(workdir, folder: str, *args: str) -> None:
        one_device = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1"
        result = run_command(
            f"--workdir={workdir}", f"--config.dataset=folder:{folder}", *tiny_flags, *args,
            env={"XLA_FLAGS": one_device},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]

    return train


# Keys of results.json and metrics.jsonl that vary between equal runs.
TIMINGS = ("time", "_per_s", "peak_memory", "steps_this_run")


@pytest.fixture(scope="session")
def outcome():
    """`outcome(workdir)`: what equal runs share bit for bit: the newest checkpoint of each
    slot (its step and every leaf of the state), `results.json` and `metrics.jsonl` less their
    timings."""
    return _outcome


def _outcome(workdir) -> dict:
    import json

    from flaxcnn import run_files

    slots = [run_files.CHECKPOINTS]
    if os.path.isdir(os.path.join(workdir, run_files.BEST_CHECKPOINTS)):
        slots.append(run_files.BEST_CHECKPOINTS)
    with open(os.path.join(workdir, run_files.RESULTS)) as f:
        results = json.load(f)
    with open(os.path.join(workdir, run_files.METRICS)) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    drop = lambda d: {k: v for k, v in d.items() if not any(t in k for t in TIMINGS)}  # noqa: E731
    return {
        "checkpoints": {slot: _checkpoint_arrays(workdir, slot) for slot in slots},
        "results": drop(results),
        "metrics": [drop(m) for m in metrics],
    }


def _checkpoint_arrays(workdir, slot: str) -> tuple[int, list] | None:
    """The newest committed step of a checkpoint slot and its arrays (every leaf of the state:
    parameters, optimizer state, batch statistics, moving averages, step)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    directory = os.path.join(workdir, slot)
    steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit())
    if not steps:
        return None
    item = os.path.join(directory, str(steps[-1]), "default")  # StandardSave's one item.
    restored = ocp.StandardCheckpointer().restore(item)
    leaves = [np.asarray(x) for x in jax.tree.leaves(restored)]
    return steps[-1], leaves
