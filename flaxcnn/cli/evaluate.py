"""Evaluate a trained classifier without training:

    python -m flaxcnn.evaluate --workdir W [--split test] [--dataset NAME] [--data_dir D]
                               [--which latest|best] [--batch_size N]

Restores the run (flaxcnn.inference.load_run), runs the task's `eval_step` over every example
of the split (padded, masked batches gathered on the device, as the loop evaluates), and
writes `W/eval_<split>.json` (loss, accuracy, count, per-class accuracy, confusion matrix,
step, checkpoint) and `W/confusion_<split>.png`, then prints a one-line summary.

The split is read from the run's dataset unless `--dataset`/`--data_dir` say otherwise, with
the run's `image_size` and `color_mode`. In file names a split's '%' becomes 'pct' and other
symbols '_' ('train[90%:]' -> 'eval_train_90pct.json'); a dataset other than the run's comes
first ('eval_mnist_test.json'). Bad input: `error: ...` on stderr, exit code 2.
"""

import argparse
import json
import os
import re
import sys

import jax
import numpy as np

from flaxcnn import config as config_lib
from flaxcnn.data import device_data, input_pipeline, preprocess
from flaxcnn.inference import Run, load_config, load_run
from flaxcnn.reporting import reports
from flaxcnn.runner import steps
from flaxcnn.tasks import classification


def evaluate_state(
    state,
    split: input_pipeline.Split,
    batch_size: int,
    normalization: preprocess.Normalization | None = None,
) -> dict:
    """Mean loss and accuracy over every example of `split`, their count and the
    "confusion" counts (true, predicted), evaluated as the training loop evaluates: the
    split on the device, padded and masked batches gathered there (standardised by
    `normalization`, the run's). `state` is on the default device (as `load_run` restores
    it)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    data = device_data.with_normalization(device_data.put_split(split, mesh), normalization, mesh)
    rng = jax.random.key(0)  # Unused by a classifier's evaluation.
    rows = range(split.num_examples)
    evaluate = steps.compile_evaluation(
        classification.eval_step, state, data, batch_size, mesh, rng, len(rows)
    )
    metrics, count = steps.evaluate(evaluate, state, data, rows, batch_size, mesh, rng)
    return {**metrics, "count": count}


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
    """Evaluates `run` on a split; writes `output_paths` (the report as JSON and the confusion
    matrix as PNG) and returns the report."""
    config = run.config
    json_path, png_path = output_paths(run, split_name, dataset)
    dataset = dataset or config.dataset
    split = input_pipeline.load_split(
        dataset,
        split_name,
        data_dir or config.data_dir,
        config.get("image_size"),
        config.get("color_mode"),
    )
    if tuple(split.image_shape) != tuple(run.image_shape):
        raise ValueError(
            f"split {split_name!r} of {dataset!r} has images of shape {split.image_shape}; "
            f"the model takes {run.image_shape}"
        )
    if split.num_classes != run.num_classes:
        raise ValueError(
            f"{dataset!r} has {split.num_classes} classes; the model has {run.num_classes}"
        )
    batch_size = batch_size or config_lib.eval_batch_size(config)
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    evaluation = evaluate_state(run.state, split, batch_size, run.normalization)
    report = reports.report_from_confusion(evaluation["confusion"], run.class_names)
    results = {
        "dataset": dataset,
        "split": split_name,
        "which": run.which,
        "step": run.step,
        "loss": evaluation["loss"],
        "accuracy": evaluation["accuracy"],
        "count": evaluation["count"],
        **{k: report[k] for k in ("class_names", "per_class_accuracy", "confusion_matrix")},
    }
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    reports.plot_confusion_matrix(
        np.asarray(report["confusion_matrix"]),
        run.class_names,
        png_path,
        title=f"{dataset} {split_name}, step {run.step}",
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
