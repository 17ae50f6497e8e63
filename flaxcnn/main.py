"""Command line: `python -m flaxcnn.main --workdir DIR [--config FILE] [--config.key=value]`."""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "default_config.py")

flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flag_as_required("workdir")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file.", lock_config=True)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only: leave the accelerators to JAX.
    from flaxcnn import train

    logging.info("JAX %s on %s: %s", jax.__version__, jax.default_backend(), jax.devices())
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(
        f"test accuracy {results['test_accuracy']:.4f} "
        f"({results['num_test_examples']} examples), loss {results['test_loss']:.4f}",
        file=sys.stdout,
    )


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
