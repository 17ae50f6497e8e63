"""Bad command lines: one line, exit 2, and nothing touched."""

import hashlib
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from flaxcnn import run_files
from flaxcnn import workdir as workdir_lib
from flaxcnn.cli import train as train_cli

REPO = pathlib.Path(__file__).resolve().parents[2]

# A restore that fails inside orbax leaves tensorstore coroutines behind, reported when they
# are collected after their event loop closed; harmless, and not this project's to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# --- Bad command lines ----------------------------------------------------------------------


def run_on_read_only_mount(directory: str, argv, timeout=180) -> subprocess.CompletedProcess:
    """The training command in a mount namespace of its own where `directory` is a
    read-only bind mount of itself (for root, whom permissions do not stop)."""
    mount = f"mount --bind {directory} {directory} && mount -o remount,bind,ro {directory}"
    command = shlex.join([sys.executable, "-m", "flaxcnn.main", *argv])
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", f"{mount} && exec {command}"],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"},
        cwd=REPO,
        timeout=timeout,
    )


def snapshot(path: str) -> dict[str, tuple]:
    """Every file under `path` with its modification time and content hash, except the
    workdir lock (which records the pid of the last run that held it)."""
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            if name == run_files.LOCK:
                continue
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            files[os.path.relpath(full, path)] = (os.stat(full).st_mtime_ns, digest)
    return files


def case(name, flags, words, slow=False):
    return pytest.param(flags, words, id=name, marks=[pytest.mark.slow] if slow else [])


# Each case: the flags added after --workdir=WORKDIR --config.data_dir=... and the tiny
# run's flags (WORKDIR: a copy of the prior run; TMP: a folder beside it, holding a config file
# whose get_config() fails), and the words the one-line error must hold.
# Each case runs the command in-process (its error comes before any training); the
# unwritable workdir runs as a process of its own (for root, on a read-only mount).
CASES = [
    case("unknown model", ["--config.model=Nope"], ["unknown model 'Nope'"]),
    case(
        "unknown dataset",
        ["--config.dataset=no_such_ds"],
        ["unknown tfds dataset 'no_such_ds'"],
    ),
    case("zero learning rate", ["--config.learning_rate=0"], ["learning_rate must be"]),
    case("unknown optimizer", ["--config.optimizer=adagradd"], ["unknown optimizer 'adagradd'"]),
    case("unknown schedule", ["--config.lr_schedule=steep"], ["unknown schedule 'steep'"]),
    case("zero batch", ["--config.batch_size=0"], ["batch_size must be positive"]),
    case(
        "zero epochs",
        ["--config.num_train_steps=-1", "--config.num_epochs=0"],
        ["num_epochs must be positive"],
    ),
    case("batch over dataset", ["--config.batch_size=20000"], ["larger than the 9000"]),
    case("malformed override", ["--config.learning_rate=abc"], ["learning_rate", "'abc'"]),
    case("unknown key", ["--config.nope=1"], ["unknown config key 'nope'"]),
    case("misspelt key", ["--config.learning_rat=1"], ["'learning_rat'", "'learning_rate'"]),
    case(
        "missing config file",
        ["--config=WORKDIR/none.py"],
        ["config file", "none.py", "not found"],
    ),
    case(
        "config file that fails",
        ["--config=TMP/broken.py"],
        ["cannot load config file", "broken.py", "ZeroDivisionError"],
    ),
    case("stray argument", ["stray"], ["unexpected arguments: stray"]),
    case(
        "other model in workdir",
        ["--config.model=CNN"],
        ["holds a run of model 'SeedCNN'", "--force"],
    ),
    case("workdir is a file", ["--workdir=WORKDIR/config.json"], ["config.json is a file"]),
    case(
        "workdir not creatable",
        ["--workdir=WORKDIR/config.json/sub"],
        ["cannot create --workdir"],
    ),
    case("workdir not writable", ["chmod"], ["is not writable"], slow=True),  # A process.
]


def train_in_process(argv, capsys) -> subprocess.CompletedProcess:
    """The train command run here, as a completed process would report it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_cli.run(list(argv))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, exit_info.value.code, captured.out, captured.err)


@pytest.mark.parametrize("flags, words", CASES)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(
    prior_run, data_dir, tmp_path, capsys, flags, words, run_cli, tiny_run_flags
):
    workdir = str(tmp_path / "run")
    shutil.copytree(prior_run, workdir)
    read_only = flags == ["chmod"]
    if read_only:
        flags = []
        os.chmod(workdir, 0o500)
    (tmp_path / "broken.py").write_text("def get_config():\n    return 1 / 0\n")
    before = snapshot(workdir)
    flags = [f.replace("WORKDIR", workdir).replace("TMP", str(tmp_path)) for f in flags]
    argv = (f"--workdir={workdir}", f"--config.data_dir={data_dir}", *tiny_run_flags, *flags)
    if read_only and os.geteuid() == 0:  # Root writes through permissions: mount it read-only.
        result = run_on_read_only_mount(workdir, argv)
    elif read_only:
        result = run_cli(*argv)
    else:
        result = train_in_process(argv, capsys)
    os.chmod(workdir, 0o700)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: "), lines[-1]
    assert all(word in lines[-1] for word in words), lines[-1]
    assert [line for line in lines if line.startswith("error")] == [lines[-1]]
    assert snapshot(workdir) == before


def test_force_moves_the_other_run_aside(prior_run, data_dir, tmp_path, tiny_config):
    workdir = tmp_path / "run"
    shutil.copytree(prior_run, workdir)
    before = snapshot(str(workdir))
    # A bad setting after the move check: the move is what --force does, nothing more.
    workdir_lib.prepare_workdir(
        str(workdir), tiny_config(data_dir="unused", model="CNN"), force=True
    )
    # The lock stays: this process holds it.
    assert sorted(os.listdir(workdir)) == ["replaced-1", run_files.LOCK]
    assert snapshot(str(workdir / "replaced-1")) == before


def test_unwritable_workdir_is_refused_even_for_root(tmp_path, monkeypatch, tiny_config):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(workdir_lib.tempfile, "TemporaryFile", refuse)
    with pytest.raises(ValueError, match="is not writable: Permission denied"):
        workdir_lib.prepare_workdir(str(tmp_path), tiny_config(data_dir="unused"), force=False)


def test_same_run_in_workdir_passes_the_checks(prior_run, tmp_path, tiny_config):
    workdir = tmp_path / "run"
    shutil.copytree(prior_run, workdir)
    assert workdir_lib.check_run_identity(str(workdir), tiny_config(data_dir="unused")) == {}
    assert (
        workdir_lib.check_run_identity(str(tmp_path / "new"), tiny_config(data_dir="unused"))
        is None
    )
    workdir_lib.prepare_workdir(str(tmp_path / "new"), tiny_config(data_dir="unused"), force=False)
    assert os.path.isdir(tmp_path / "new")
