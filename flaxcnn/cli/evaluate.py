"""Evaluate a trained classifier without training:

    python -m flaxcnn.evaluate --workdir W [--split test] [--dataset NAME] [--data_dir D]
                               [--which latest|best] [--batch_size N]

Restores the run (flaxcnn.inference.load_run), runs the task's `eval_step` over every example
of the split (padded, masked batches gathered on the device, as the loop evaluates), and
writes `W/eval_<split>.json` (loss, accuracy, count, per-class accuracy, confusion matrix,
step, checkpoint) and `W/confusion_<split>.png`, then prints a one-line summary.

The split is read from the run's dataset unless `--dataset`/`--data_dir` say otherwise, with
the run's `image_size`, `color_mode` and `input_crop` (its evaluation view), and streamed
when the run's `input` streams it (`evaluation.read_split`). In file names a split's '%'
becomes 'pct' and other symbols '_' ('train[90%:]' -> 'eval_train_90pct.json'); a dataset
other than the run's comes first ('eval_mnist_test.json'). Bad input: `error: ...` on
stderr, exit code 2.
"""

import argparse
import json
import os
import re
import sys

import numpy as np

from flaxcnn.data import input_pipeline
from flaxcnn.inference import Run, load_config, load_run
from flaxcnn.reporting import reports


def file_stem(split: str, dataset: str | None = None) -> str:
    """The name part of an evaluation's files: the split ('train[90%:]' -> 'train_90pct'),
    after the dataset's name when it is not the run's own ('mnist_test')."""
    text = split if dataset is None else f"{dataset}_{split}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text.replace("%", "pct")).strip("_")
    return name or "split"


def output_paths(run: Run, split: str, dataset: str | None = None) -> tuple[str, str]:
    """(`eval_<stem>.json`, `confusion_<stem>.png`) in the run's workdir."""
    own = dataset in (None, run.config.dataset)
    stem = file_stem(split, None if own else dataset)
    return (
        os.path.join(run.workdir, f"eval_{stem}.json"),
        os.path.join(run.workdir, f"confusion_{stem}.png"),
    )


def evaluate_run(
    run: Run,
    split_name: str = "test",
    dataset: str | None = None,
    data_dir: str | None = None,
    batch_size: int | None = None,
) -> dict:
    """Evaluates `run` on a split (`Run.evaluate`); writes `output_paths` (the report as JSON
    and the confusion matrix as PNG) and returns the report."""
    json_path, png_path = output_paths(run, split_name, dataset)
    results = run.evaluate(split_name, dataset, data_dir, batch_size)
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    reports.plot_confusion_matrix(
        np.asarray(results["confusion_matrix"]),
        run.class_names,
        png_path,
        title=f"{results['dataset']} {split_name}, step {run.step}",
    )
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flaxcnn.evaluate", description="Evaluate a trained run on a split."
    )
    parser.add_argument("--workdir", required=True, help="The run's directory.")
    parser.add_argument("--split", default="test", help="Split, tfds syntax (default: test).")
    parser.add_argument("--dataset", help="Dataset to evaluate on (default: the run's).")
    parser.add_argument("--data_dir", help="tfds data_dir (default: the run's).")
    parser.add_argument("--which", default="latest", choices=("latest", "best"))
    parser.add_argument("--batch_size", type=int, help="Default: the run's eval_batch_size.")
    parser.add_argument("--verbose", action="store_true", help="Tracebacks of errors.")
    return parser.parse_args(argv)


def quiet_tensorflow() -> None:
    """TensorFlow's C++ logs stay quiet. TensorFlow itself (3 s to import) is imported, and
    kept off the accelerators, only if a split is read through tfds
    (input_pipeline.import_tfds), not from the cache of decoded splits."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_tensorflow()
    try:
        # --data_dir locates the run's own dataset only when that is what is evaluated.
        same_dataset = args.dataset in (None, load_config(args.workdir).dataset)
        run = load_run(args.workdir, args.which, data_dir=args.data_dir if same_dataset else None)
        results = evaluate_run(run, args.split, args.dataset, args.data_dir, args.batch_size)
    except (ValueError, input_pipeline.DataError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    json_path, png_path = output_paths(run, args.split, args.dataset)
    print(
        f"{results['dataset']} {results['split']}: accuracy {results['accuracy']:.4f}, "
        f"loss {results['loss']:.4f} on {results['count']} examples "
        f"({results['which']} checkpoint, step {results['step']}) -> "
        f"{json_path}, {png_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
