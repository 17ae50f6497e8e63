"""Train the classifier that scores a dataset's generative models:

    python -m flaxcnn.cli.scorer --dataset mnist [--data_dir D] [--scorer_dir S]
                                 [--image_size H W] [--color_mode grayscale|rgb] [--retrain]

The scorer is an ordinary classification run (flaxcnn.scoring's `scorer_config`) kept in
`S/<dataset>` (default ~/.cache/flaxcnn/scorers), which generative runs load to compute their
inception score and Frechet distance; the train command trains it when a run needs it. Prints
the scorer's workdir and test accuracy. Bad input: `error: ...`, exit code 2.
"""

import argparse
import logging
import shutil
import sys

from flaxcnn import scoring

USAGE_ERROR = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flaxcnn.cli.scorer",
        description="Train the classifier that scores a dataset's generative models.",
    )
    parser.add_argument("--dataset", required=True, help="tfds name, e.g. mnist")
    parser.add_argument("--data_dir", default=None, help="tfds data dir (default $TFDS_DATA_DIR)")
    parser.add_argument("--scorer_dir", default=scoring.DEFAULT_SCORER_DIR)
    parser.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--color_mode", choices=("grayscale", "rgb"), default=None)
    parser.add_argument("--retrain", action="store_true", help="Delete a kept scorer first.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from flaxcnn.data import input_pipeline

    image_size = tuple(args.image_size) if args.image_size else None
    workdir = scoring.scorer_workdir(args.scorer_dir, args.dataset, image_size, args.color_mode)
    try:
        if args.retrain:
            shutil.rmtree(workdir, ignore_errors=True)
        scoring.train_scorer(
            args.dataset, args.data_dir, args.scorer_dir, image_size, args.color_mode
        )
        scorer = scoring.load_scorer(workdir)
    except (ValueError, input_pipeline.DataError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return USAGE_ERROR
    print(f"scorer {workdir}: test accuracy {scorer.test_accuracy:.4f}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
