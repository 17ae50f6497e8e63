"""One workdir, one run: the lock refuses a second live run, and a killed run leaves none."""

import os
import pathlib
import subprocess
import sys

import pytest

from flaxcnn import run_files
from flaxcnn import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# A restore that fails inside orbax leaves tensorstore coroutines behind, reported when they
# are collected after their event loop closed; harmless, and not this project's to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


TINY = ("--config.num_train_steps=8", "--config.eval_batch_size=500")


# --- One workdir, one run -------------------------------------------------------------------


def hold_lock_in_another_process(workdir) -> subprocess.Popen:
    """A process that takes `workdir`'s lock as a run does, then waits to be killed."""
    code = (
        "import sys, time; from flaxcnn import workdir; workdir.lock_workdir(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(600)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(workdir)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_live_run_s_workdir_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    holder = hold_lock_in_another_process(tmp_path)
    try:
        with pytest.raises(ValueError, match=rf"^{tmp_path} is in use by process {holder.pid}$"):
            workdir_lib.lock_workdir(str(tmp_path))
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock.
        holder.wait()
    workdir_lib.lock_workdir(str(tmp_path))
    assert (tmp_path / run_files.LOCK).read_text() == f"{os.getpid()}\n"


@pytest.mark.slow  # Two starts of the command line.
def test_second_command_on_a_live_run_s_workdir_exits_2_naming_the_process(
    data_dir, tmp_path, run_cli
):
    workdir = tmp_path / "run"
    holder = hold_lock_in_another_process(workdir.mkdir() or workdir)
    try:
        result = run_cli(f"--workdir={workdir}", f"--config.data_dir={data_dir}", *TINY)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {workdir} is in use by process {holder.pid}"
    )
    assert os.listdir(workdir) == [run_files.LOCK]  # Nothing else written.
    result = run_cli(f"--workdir={workdir}", f"--config.data_dir={data_dir}", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
