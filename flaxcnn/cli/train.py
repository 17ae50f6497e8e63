"""Command line: `python -m flaxcnn.main --workdir DIR [--config FILE] [--config.key=value]`.

Exit codes: 0 done; 2 bad input (a one-line `error: ...` on stderr, the traceback with
--verbose): a malformed flag or config override, an unknown config key, a config file that is
missing or does not load, a workdir that cannot be used, a setting the run cannot work with;
128 + N stopped by signal N after saving a checkpoint (130 Ctrl-C, 143 SIGTERM: rerun the same
command to resume); 1 anything else (a multi-process run whose processes cannot connect, a bug).
"""

import argparse
import logging as pylogging
import os
import sys

import jax
from absl import flags, logging

from flaxcnn import config as config_lib
from flaxcnn import workdir as workdir_lib
from flaxcnn.runtime import distributed

USAGE_ERROR = 2
OVERRIDE_PREFIXES = ("--config.", "-config.")


class _UsageError(Exception):
    """A command line that cannot be parsed; its message is the whole story."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # One line, exit 2 (argparse would print its usage first).
        raise _UsageError(message)


def fail(message: str, code: int = USAGE_ERROR) -> None:
    """Exits with a one-line `error: ...` on stderr."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    """The arguments besides the config overrides (`--config.KEY=VALUE`)."""
    parser = _Parser(
        prog="python -m flaxcnn.main",
        description="Train (or resume) a run in --workdir.",
        epilog="--config.KEY=VALUE (or --config.KEY VALUE) overrides any setting of the config "
        "(see flaxcnn/default_config.py); keys under model_kwargs and optimizer_kwargs may be "
        "new. Models, tasks and optimizers: a built-in name, package.module:Name or "
        "path/to/file.py:Name.",
        allow_abbrev=False,
    )
    parser.add_argument("--workdir", required=True, help="Checkpoints, logs and results.")
    parser.add_argument(
        "--config",
        help="Config file with a get_config() (default: flaxcnn/default_config.py); "
        "FILE:ARG calls get_config('ARG').",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="Tracebacks of errors, every library's logs."
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="Train into a workdir that holds a run of another task, model or dataset: that "
        f"run's files are first moved into WORKDIR/{workdir_lib.REPLACED_PREFIX}N/ (nothing is "
        "deleted).",
    )
    parser.add_argument("--coordinator_address", help="HOST:PORT of process 0 (multi-process).")
    parser.add_argument("--num_processes", type=int, help="Processes of a multi-process run.")
    parser.add_argument("--process_id", type=int, help="This process's index.")
    parser.add_argument(
        "--distributed",
        default="auto",
        choices=list(distributed.MODES),
        help="Start jax.distributed: auto (when the flags above or the environment, e.g. "
        "SLURM or JAX_COORDINATOR_ADDRESS, describe several processes), on (always; lets JAX "
        "detect TPU pods and Kubernetes), off.",
    )
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(the other arguments, the (key, value) config overrides in order): `--config.KEY=VALUE`
    or `--config.KEY VALUE`; a bare `--config.KEY` is True."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(OVERRIDE_PREFIXES):
            key, has_value, value = arg.split(".", 1)[1].partition("=")
            if not has_value:
                if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    value, i = argv[i + 1], i + 1
                else:
                    value = "true"
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def parse_args(argv: list[str]):
    """(arguments, config): the config file loaded with its overrides applied, or exits
    with a one-line error."""
    rest, overrides = split_overrides(argv)
    verbose = "--verbose" in rest
    try:
        args, unknown = build_parser().parse_known_args(rest)
        if unknown:
            raise _UsageError(f"unexpected arguments: {' '.join(unknown)}")
        config = config_lib.load(args.config, overrides)
    except (_UsageError, config_lib.ConfigError) as e:
        if verbose and isinstance(e, config_lib.ConfigError):
            raise
        fail(str(e))
    return args, config


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


def _configure_logging(verbose: bool) -> None:
    """Library chatter filtered (unless `verbose`), one process logging, and the devices
    said. TensorFlow and tfds are imported (and kept off the accelerators) only when a split
    is read through tfds, not from the cache of decoded splits (input_pipeline.import_tfds)."""
    if not verbose:
        logging.get_absl_handler().addFilter(_quiet_libraries)
        if jax.process_index() > 0:
            logging.set_verbosity(logging.WARNING)  # One process tells the story.
    logging.info(
        "JAX %s on %s: %d devices, %d processes (this is process %d)",
        jax.__version__,
        jax.default_backend(),
        jax.device_count(),
        jax.process_count(),
        jax.process_index(),
    )


def main(args: argparse.Namespace, config) -> None:
    """Trains `config` into `args.workdir`; exits with a one-line error on bad input."""
    from flaxcnn.data import input_pipeline
    from flaxcnn.training import signals

    try:
        # Before anything touches a backend: the devices of every process form one mesh.
        distributed.initialize(
            args.coordinator_address, args.num_processes, args.process_id, args.distributed
        )
    except ValueError as e:
        fail(str(e))
    except distributed.DistributedError as e:
        fail(str(e), code=1)
    try:
        config_lib.validate(config)  # Before the workdir is touched: names, numbers.
        for key in ("batch_size", "eval_batch_size"):
            if key in getattr(args, "overridden", ()):  # The user's own: split, or say how.
                config_lib.check_divisible(key, config[key], jax.device_count())
        workdir_lib.prepare_workdir(args.workdir, config, args.force)
    except ValueError as e:  # DataError included.
        if args.verbose:
            raise
        fail(_first_line(e))
    _configure_logging(args.verbose)
    _enable_compilation_cache()
    from flaxcnn import scoring
    from flaxcnn.runner import loop

    try:
        # A generative run that scores its samples loads a scorer trained here, beforehand.
        scorer = scoring.prepare_scorer(config)
        results = loop.train_and_evaluate(config, args.workdir, scorer=scorer)
    except (ValueError, input_pipeline.DataError, FloatingPointError) as e:
        if args.verbose:
            raise
        fail(_first_line(e))
    except signals.Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        if args.verbose:
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
    """`python -m flaxcnn.main ...` (`argv` without the program name; default sys.argv)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # absl logging (used throughout) without absl's flag parsing: INFO lines to stderr.
    flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    args, config = parse_args(argv)
    args.overridden = {key for key, _ in split_overrides(argv)[1]}
    main(args, config)


if __name__ == "__main__":
    run()
