"""Train the classifier that scores a dataset's generative models:

    python -m flaxcnn.cli.scorer --dataset mnist [--data_dir D] [--scorer_dir S]
                                 [--image_size H W] [--color_mode grayscale|rgb] [--retrain]

The scorer is an ordinary classification run (flaxcnn.reporting.generative_metrics's
`scorer_config`) kept in `S/<dataset>` (default ~/.cache/flaxcnn/scorers), which generative
runs load with flaxcnn.inference.load_run to compute their inception score and Frechet
distance. The train command calls `ensure_scorer` before a generative run that asks for scores
(`config.score_samples` > 0), so the scorer is trained here, before the run, never from inside
it. Prints the scorer's workdir and test accuracy. Bad input: `error: ...`, exit code 2.
"""

import argparse
import logging
import shutil
import sys

import ml_collections

from flaxcnn.reporting import generative_metrics as gm

USAGE_ERROR = 2


def needs_scorer(config: ml_collections.ConfigDict) -> bool:
    """Whether the run of `config` scores its samples at the end: a generative task with
    `score_samples` > 0."""
    return config.get("task") in gm.GENERATIVE_TASKS and config.get("score_samples", 0) > 0


def train_scorer(
    dataset: str,
    data_dir: str | None = None,
    scorer_dir: str = gm.DEFAULT_SCORER_DIR,
    image_size=None,
    color_mode: str | None = None,
    overrides: dict | None = None,
) -> str:
    """Trains the scorer of `dataset` (with `scorer_config` updated by `overrides`) into its
    workdir under `scorer_dir`, unless a finished one is there; returns that workdir."""
    workdir = gm.scorer_workdir(scorer_dir, dataset, image_size, color_mode)
    if gm.has_scorer(workdir):
        return workdir
    from flaxcnn.runner import loop

    config = gm.scorer_config(dataset, data_dir, image_size, color_mode)
    config.update(overrides or {})
    logging.info("Training the scorer of %s into %s.", dataset, workdir)
    loop.train_and_evaluate(config, workdir)
    return workdir


def ensure_scorer(config: ml_collections.ConfigDict) -> str | None:
    """The scorer workdir the run of `config` will load, trained first when missing; None when
    the run scores nothing."""
    if not needs_scorer(config):
        return None
    return train_scorer(
        config.dataset,
        config.data_dir,
        config.get("scorer_dir") or gm.DEFAULT_SCORER_DIR,
        config.get("image_size"),
        config.get("color_mode"),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flaxcnn.cli.scorer",
        description="Train the classifier that scores a dataset's generative models.",
    )
    parser.add_argument("--dataset", required=True, help="tfds name, e.g. mnist")
    parser.add_argument("--data_dir", default=None, help="tfds data dir (default $TFDS_DATA_DIR)")
    parser.add_argument("--scorer_dir", default=gm.DEFAULT_SCORER_DIR)
    parser.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--color_mode", choices=("grayscale", "rgb"), default=None)
    parser.add_argument("--retrain", action="store_true", help="Delete a kept scorer first.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from flaxcnn.data import input_pipeline

    image_size = tuple(args.image_size) if args.image_size else None
    workdir = gm.scorer_workdir(args.scorer_dir, args.dataset, image_size, args.color_mode)
    try:
        if args.retrain:
            shutil.rmtree(workdir, ignore_errors=True)
        train_scorer(args.dataset, args.data_dir, args.scorer_dir, image_size, args.color_mode)
        scorer = gm.load_scorer(workdir)
    except (ValueError, input_pipeline.DataError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return USAGE_ERROR
    print(f"scorer {workdir}: test accuracy {scorer.test_accuracy:.4f}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
