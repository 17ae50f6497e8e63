"""Command line: `python -m flaxcnn.main --workdir DIR [--config FILE] [--config.key=value]`.

Exit codes: 0 done; 2 bad input (a one-line `error: ...` on stderr, the traceback with
--verbose): a malformed flag or config override, an unknown config key, a config file that is
missing or does not load, a workdir that cannot be used, a setting the run cannot work with;
128 + N stopped by signal N after saving a checkpoint (130 Ctrl-C, 143 SIGTERM: rerun the same
command to resume); 1 anything else (a multi-process run whose processes cannot connect, a bug).
"""

import fcntl
import json
import logging as pylogging
import os
import re
import shutil
import sys
import tempfile

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from flaxcnn import run_files
from flaxcnn.runtime import distributed

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "default_config.py")
USAGE_ERROR = 2
# What makes two runs incompatible in one workdir (and the value of a config without the key).
RUN_IDENTITY = {"task": "classification", "model": None, "dataset": None}
REPLACED_PREFIX = "replaced-"

flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_bool("verbose", False, "Show tracebacks of errors and every library's log lines.")
flags.DEFINE_bool(
    "force",
    False,
    "Train into a workdir that holds a run of another task, model or dataset: that run's "
    f"files are first moved into WORKDIR/{REPLACED_PREFIX}N/ (nothing is deleted).",
)
flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for a run over several processes."
)
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_enum(
    "distributed",
    "auto",
    list(distributed.MODES),
    "Start jax.distributed: auto (when the flags above or the environment, e.g. SLURM or "
    "JAX_COORDINATOR_ADDRESS, describe several processes), on (always; lets JAX detect TPU "
    "pods and Kubernetes), off.",
)
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


class _UsageError(Exception):
    """A command line that cannot be parsed; its message is the whole story."""


def fail(message: str, code: int = USAGE_ERROR) -> None:
    """Exits with a one-line `error: ...` on stderr."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _config_path(argv: list[str]) -> str | None:
    """The file named by the last `--config FILE` / `--config=FILE`, without `:args`."""
    path = None
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith(("--config=", "-config=")):
            path = arg.split("=", 1)[1]
    return None if path is None else path.split(":", 1)[0]


def _flag_error_message(error: Exception, argv: list[str]) -> str:
    """One line for an error raised while parsing the flags and loading the config."""
    if isinstance(error, (AttributeError, KeyError)):  # ml_collections: no such config field.
        return _unknown_key_message(error, argv)
    config_file = _config_path(argv) or _DEFAULT_CONFIG
    if isinstance(error, flags.Error):
        if "Error whilst parsing config file" in str(error):  # get_config() raised.
            return f"cannot load config file {config_file!r}: {_first_line(error)}"
        return _first_line(error)
    # The config file's own code failed (ml_collections defers that as an OSError).
    cause = error.__cause__ if isinstance(error, OSError) and error.__cause__ else error
    return f"cannot load config file {config_file!r}: {type(cause).__name__}: {_first_line(cause)}"


def _unknown_key_message(error: Exception, argv: list[str]) -> str:
    while error.args and isinstance(error.args[0], Exception):
        error = error.args[0]  # The innermost message names the key and what it resembles.
    text = str(error.args[0]) if error.args else ""
    key = re.search(r"[A-Za-z_][\w-]*", text)
    key = key.group(0) if key else text
    hint = re.search(r'Did you mean "([^"]+)"', text)
    hint = f"; did you mean {hint.group(1)!r}?" if hint else ""
    overrides = [
        a.lstrip("-").split("=")[0] for a in argv if a.startswith(("--config.", "-config."))
    ]
    named = [o for o in overrides if key in o.split(".")]
    where = f" in --{named[0]}" if named else ""
    return f"unknown config key {key!r}{where}{hint}"


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # The flags library prefixes config files' errors with a traceback: keep the last line.
    return lines[-1] if "Error whilst parsing config file" in lines[0] else lines[0]


def parse_flags(argv: list[str]) -> list[str]:
    """Parses the flags (the config file and its overrides included) or exits with a one-line
    error; the absl `flags_parser` of `app.run`."""
    try:
        path = _config_path(argv)
        if path is not None and not os.path.isfile(path):
            raise _UsageError(f"config file {path!r} not found")
        if "config" not in FLAGS:
            # Defined here, not at import: it parses the overrides in argv as it is defined.
            config_flags.DEFINE_config_file(
                "config", _DEFAULT_CONFIG, "Config file.", lock_config=True, sys_argv=argv
            )
        rest = FLAGS(argv)
        if len(rest) > 1:
            raise _UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
        FLAGS.config  # noqa: B018  (loads the config: a file that fails to load raises here)
    except _UsageError as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001  (a config file's own code may raise anything)
        if "--verbose" in argv:
            raise
        fail(_flag_error_message(e, argv))
    return rest


def check_run_identity(workdir: str, config) -> dict[str, tuple] | None:
    """The settings (task, model, dataset) in which the run already in `workdir` differs from
    `config`, as {key: (old, new)}; None when there is no earlier run to compare with."""
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


def _check_names_known(config, keys) -> None:
    """Raises the registries' own errors for unknown task/model/dataset names, so that an
    unknown name is reported as such rather than as a workdir holding another run."""
    if "task" in keys:
        from flaxcnn.tasks import get_task

        get_task(config.task)
    if "model" in keys:
        from flaxcnn.models import MODELS

        if config.model not in MODELS:
            raise ValueError(f"unknown model {config.model!r}; valid: {', '.join(sorted(MODELS))}")
    if "dataset" in keys:
        import tensorflow_datasets as tfds

        from flaxcnn.data import input_pipeline

        name = config.dataset.split("/")[0].split(":")[0]
        try:
            tfds.builder_cls(name)
        except tfds.core.registered.DatasetNotFoundError as e:
            first = str(e).splitlines()[0]
            raise input_pipeline.DataError(f"unknown tfds dataset {name!r}: {first}") from None


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


def prepare_workdir(workdir: str, config, force: bool) -> None:
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
    differences = check_run_identity(workdir, config)
    if not differences:
        return
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


def _quiet_libraries(record: pylogging.LogRecord) -> bool:
    """Keeps orbax's and tfds's per-save chatter out of the log (warnings still pass)."""
    noisy = ("/orbax/", "/tensorflow_datasets/")
    return record.levelno >= pylogging.WARNING or not any(p in record.pathname for p in noisy)


def _enable_compilation_cache() -> None:
    """Keeps compiled steps on disk, so a second run of a config starts faster. A cache dir
    given by JAX_COMPILATION_CACHE_DIR wins over the default under the user's cache dir."""
    if not jax.config.jax_compilation_cache_dir:
        cache_home = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
        jax.config.update("jax_compilation_cache_dir", os.path.join(cache_home, "flaxcnn", "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv: list[str]) -> None:
    del argv  # Checked by parse_flags.
    from flaxcnn.data import input_pipeline
    from flaxcnn.training import signals

    try:
        # Before anything touches a backend: the devices of every process form one mesh.
        distributed.initialize(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed
        )
    except ValueError as e:
        fail(str(e))
    except distributed.DistributedError as e:
        fail(str(e), code=1)
    try:
        prepare_workdir(FLAGS.workdir, FLAGS.config, FLAGS.force)
    except ValueError as e:  # DataError included.
        if FLAGS.verbose:
            raise
        fail(_first_line(e))
    import tensorflow as tf
    import tensorflow_datasets as tfds

    tf.config.set_visible_devices([], "GPU")  # tf.data only: leave the accelerators to JAX.
    if not FLAGS.verbose:
        logging.get_absl_handler().addFilter(_quiet_libraries)
        tfds.disable_progress_bar()
        if jax.process_index() > 0:
            logging.set_verbosity(logging.WARNING)  # One process tells the story.
    _enable_compilation_cache()
    from flaxcnn.training import loop

    logging.info(
        "JAX %s on %s: %d devices, %d processes (this is process %d)",
        jax.__version__,
        jax.default_backend(),
        jax.device_count(),
        jax.process_count(),
        jax.process_index(),
    )
    try:
        results = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, input_pipeline.DataError, FloatingPointError) as e:
        if FLAGS.verbose:
            raise
        fail(_first_line(e))
    except signals.Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        if FLAGS.verbose:
            raise
        fail("interrupted without a checkpoint of the current step", code=130)
    if jax.process_index() == 0:
        print(summary(results))


def summary(results: dict) -> str:
    """One line of a run's test results."""
    if "test_accuracy" in results:
        return (
            f"test accuracy {results['test_accuracy']:.4f} "
            f"({results['num_test_examples']} examples), loss {results['test_loss']:.4f}"
        )
    scores = {k.replace("_", " "): v for k, v in results.items() if k.startswith("test_")}
    for name in ("inception_score", "frechet_distance"):  # Of a generator's samples.
        if name in results:
            scores[f"samples' {name.replace('_', ' ')}"] = results[name]
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) or "done"


def run(argv: list[str] | None = None) -> None:
    app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
