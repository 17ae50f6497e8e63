"""Command line: `python -m flaxcnn.main --workdir DIR [--config FILE] [--config.key=value]`."""

import logging as pylogging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "default_config.py")

flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_bool("verbose", False, "Show tracebacks of errors and every library's log lines.")
flags.mark_flag_as_required("workdir")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file.", lock_config=True)
FLAGS = flags.FLAGS


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
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf
    import tensorflow_datasets as tfds

    tf.config.set_visible_devices([], "GPU")  # tf.data only: leave the accelerators to JAX.
    if not FLAGS.verbose:
        logging.get_absl_handler().addFilter(_quiet_libraries)
        tfds.disable_progress_bar()
    _enable_compilation_cache()
    from flaxcnn import input_pipeline, train

    logging.info("JAX %s on %s: %s", jax.__version__, jax.default_backend(), jax.devices())
    try:
        results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, input_pipeline.DataError, FloatingPointError) as e:
        if FLAGS.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"test accuracy {results['test_accuracy']:.4f} "
        f"({results['num_test_examples']} examples), loss {results['test_loss']:.4f}"
    )


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
