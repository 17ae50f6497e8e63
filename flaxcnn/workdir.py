"""A run's workdir, for the train command and `flaxcnn.fit` alike: created and checked
writable, locked for the life of the process (`run.lock`), and kept to one run: a run of
another task, model or dataset (its identity) is refused, or with `force` moved aside into
`workdir/replaced-N/`. Raises ValueError with a one-line message."""

import fcntl
import json
import os
import shutil
import tempfile

import jax
import ml_collections
from absl import logging

from flaxcnn import config as config_lib
from flaxcnn import resolver, run_files

# What makes two runs incompatible in one workdir (and the value of a config without the key).
RUN_IDENTITY = {"task": "classification", "model": None, "dataset": None}
REPLACED_PREFIX = "replaced-"
SAVED_SOURCE = resolver.SAVED_CLASS_FILE.replace(resolver.SAVED_CLASS_SUFFIX, ".py")


def check_run_identity(workdir: str, config: ml_collections.ConfigDict) -> dict[str, tuple] | None:
    """The settings (task, model, dataset) in which the run already in `workdir` differs from
    `config`, as {key: (old, new)}; None when `workdir` holds no run yet."""
    path = run_files.path(workdir, run_files.CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        logging.warning("Cannot read %s (%s): not comparing it with this run.", path, e)
        return None
    new = config.to_dict()
    return {
        key: (old.get(key, default), new.get(key, default))
        for key, default in RUN_IDENTITY.items()
        if old.get(key, default) != new.get(key, default)
    }


def _check_names_known(config: ml_collections.ConfigDict, keys) -> None:
    """Raises the resolvers' own errors for unknown task/model/dataset names, so that an
    unknown name is reported as such rather than as a workdir holding another run."""
    if "task" in keys:
        from flaxcnn.tasks import get_task

        get_task(config.task)
    if "model" in keys:
        from flaxcnn.models import resolve_model

        resolve_model(config.model)
    if "dataset" in keys:
        config_lib.check_dataset_name(config)


def move_run_aside(workdir: str) -> str:
    """Moves every file of `workdir` (earlier replaced runs excepted) into a new
    `workdir/replaced-<n>/` and returns its path."""
    n = 1
    while os.path.exists(os.path.join(workdir, f"{REPLACED_PREFIX}{n}")):
        n += 1
    target = os.path.join(workdir, f"{REPLACED_PREFIX}{n}")
    os.makedirs(target)
    for name in os.listdir(workdir):
        if not name.startswith(REPLACED_PREFIX) and name != run_files.LOCK:  # Held by this run.
            shutil.move(os.path.join(workdir, name), os.path.join(target, name))
    return target


_held_locks: dict[str, object] = {}  # Open lock files, held until this process ends.


def lock_workdir(workdir: str) -> None:
    """Takes `workdir/run.lock` for the life of this process, or raises ValueError naming the
    live process that holds it. An flock is released by the kernel when its holder dies, so a
    killed run never leaves the workdir locked; the file only records the holder's pid."""
    path = os.path.realpath(run_files.path(workdir, run_files.LOCK))
    if path in _held_locks:
        return
    f = open(path, "a+")  # noqa: SIM115  (held open until the process ends)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise ValueError(f"{workdir} is in use by process {pid}") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held_locks[path] = f


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, force: bool) -> None:
    """Creates `workdir` if missing, checks it can be written, and refuses (unless `force`) to
    train into one that holds a run of another task, model or dataset. Raises ValueError."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create --workdir {workdir}: {e.strerror}") from None
    try:
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ValueError(f"--workdir {workdir} is not writable: {e.strerror}") from None
    if jax.process_index() == 0:  # The processes of one run share its workdir.
        lock_workdir(workdir)
    differences = check_run_identity(workdir, config) or {}
    if resolver.saved_class_changed(config.model):
        name = config.model.rpartition(":")[2]
        differences["model"] = (f"{name} as in {SAVED_SOURCE}", f"a {name} of another source")
    if differences:
        _replace_run(workdir, config, differences, force)
    if jax.process_index() == 0:
        resolver.save_model_class(config.model)  # A class from `__main__`, saved by value.


def _replace_run(
    workdir: str, config: ml_collections.ConfigDict, differences: dict, force: bool
) -> None:
    """Refuses to train over a run that `differences` sets apart, or (`force`) moves it."""
    _check_names_known(config, differences)
    what = ", ".join(f"{key} {old!r} (not {new!r})" for key, (old, new) in differences.items())
    if not force:
        raise ValueError(
            f"--workdir {workdir} holds a run of {what}: use another --workdir, or --force to "
            f"move that run into {workdir}/{REPLACED_PREFIX}N/ and start a new one"
        )
    # Every process has read the workdir before process 0 moves the run, and waits for it.
    _sync_processes("flaxcnn:workdir_checked")
    if jax.process_index() == 0:
        logging.warning(
            "%s held a run of %s; moved it to %s", workdir, what, move_run_aside(workdir)
        )
    _sync_processes("flaxcnn:workdir_prepared")


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
