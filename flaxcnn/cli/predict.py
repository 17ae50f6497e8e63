"""Classify image files with a trained run:

    python -m flaxcnn.predict --workdir W [--which latest|best] [--top_k 3] [--json] IMAGE...

Image files PIL reads (PNG, JPEG, GIF, ...) of any size and colour mode (L, LA, RGB, RGBA,
P, CMYK, I;16, ...) are preprocessed as the training data was
(flaxcnn.data.image_folder.to_array): EXIF orientation applied, converted with PIL to 'L'
for a 1-channel model or 'RGB' for a 3-channel one, resized to the training size with PIL's
BILINEAR filter, scaled from uint8 to [0, 1]. An animated image counts by its first frame.
A directory stands for the .png, .jpg and .jpeg files in it and below it (hidden ones
skipped), as an image folder's class folder does. Images of more than PIL's
`Image.MAX_IMAGE_PIXELS` pixels are refused (a possible decompression bomb).

Prints one line per image, `PATH: CLASS (p), CLASS (p), ...` with the top-k classes (named
as in the dataset when it names them), or with `--json` one JSON object holding every
prediction and error. A file that cannot be read as an image (or a directory holding
no image) gets one line `error: PATH: why` on stderr and the others are still predicted.

Exit code: 0 when every file was predicted, 1 when any file failed, 2 when nothing could be
predicted for another reason (bad arguments, a workdir without a run or checkpoint).
"""

import argparse
import json
import os
import sys

import numpy as np

from flaxcnn.cli.evaluate import quiet_tensorflow
from flaxcnn.data import image_folder, input_pipeline
from flaxcnn.inference import Run, load_run, top_k


def expand_paths(paths: list[str]) -> tuple[list[str], dict[str, str]]:
    """The files to predict: each path, or a directory's image files; and {path: error} of
    directories that hold none."""
    files, errors = [], {}
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = image_folder.image_files(path)
        if not found:
            extensions = ", ".join(image_folder.EXTENSIONS)
            errors[path] = f"{path}: a directory holding no image files ({extensions})"
        files += [os.path.join(path, name) for name in found]
    return files, errors


def read_images(
    paths: list[str], image_shape: tuple[int, int, int]
) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """(paths read, their (N, H, W, C) uint8 images, {path: error} of those that failed)."""
    good, images, errors = [], [], {}
    for path in paths:
        try:
            images.append(image_folder.to_array(image_folder.open_image(path), image_shape))
            good.append(path)
        except image_folder.FolderError as e:
            errors[path] = str(e)
    stacked = np.stack(images) if images else np.zeros((0, *image_shape), np.uint8)
    return good, stacked, errors


def predict_files(run: Run, paths: list[str], k: int) -> tuple[list[dict], dict[str, str]]:
    """The top-`k` classes of each readable file (directories expanded), and the errors of
    the others."""
    files, directory_errors = expand_paths(paths)
    good, images, errors = read_images(files, run.image_shape)
    errors = {**directory_errors, **errors}
    indices, probabilities = top_k(run.predict_proba(images), k)
    predictions = [
        {
            "path": path,
            "top_k": [
                {"class": run.class_names[int(i)], "index": int(i), "probability": float(p)}
                for i, p in zip(row_indices, row_probabilities)
            ],
        }
        for path, row_indices, row_probabilities in zip(good, indices, probabilities)
    ]
    return predictions, errors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flaxcnn.predict", description="Classify image files with a trained run."
    )
    parser.add_argument("--workdir", required=True, help="The run's directory.")
    parser.add_argument("--which", default="latest", choices=("latest", "best"))
    parser.add_argument("--top_k", type=int, default=3, help="Classes shown per image.")
    parser.add_argument("--json", action="store_true", help="One JSON object on stdout.")
    parser.add_argument("--data_dir", help="tfds data_dir of the run's dataset, if moved.")
    parser.add_argument("--verbose", action="store_true", help="Tracebacks of errors.")
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="Image files, or directories of them."
    )
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top_k must be at least 1, got {args.top_k}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_tensorflow()
    try:
        run = load_run(args.workdir, args.which, data_dir=args.data_dir)
    except (ValueError, input_pipeline.DataError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    predictions, errors = predict_files(run, args.images, args.top_k)
    for message in errors.values():
        print(f"error: {message}", file=sys.stderr)
    if args.json:
        output = {
            "workdir": args.workdir,
            "which": run.which,
            "step": run.step,
            "predictions": predictions,
            "errors": [
                {"path": path, "error": message.removeprefix(f"{path}: ")}
                for path, message in errors.items()
            ],
        }
        print(json.dumps(output, indent=2))
    else:
        for prediction in predictions:
            ranked = ", ".join(
                f"{c['class']} ({c['probability']:.4f})" for c in prediction["top_k"]
            )
            print(f"{prediction['path']}: {ranked}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
