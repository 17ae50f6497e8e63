"""Whole-command time and training throughput of the user models (plain `flax.linen`:
`configs/user_cnn.py`, `user_flax_example.py`, `user_keras_example.py`) under flaxcnn (with
and without the CPU rewrite of standard layers) against their Keras twins
(`keras_user_models.py`), taking turns.

    python scripts/peers/compare_user_models.py [--models user_cnn flax_example keras_example]
        [--batch-sizes 32 128] [--repeats 3] [--contenders flaxcnn flaxcnn-plain keras]
    python scripts/benchmark_families.py   # also runs it, beside the families

flaxcnn reads full MNIST through tfds from ../shared/data/tfds; Keras from the npz. Prints
one line per run and a markdown table of the medians per model and batch size; the machine
may be shared, so each repeat runs every contender once.
"""

import argparse
import json
import os
import re
import sys
import tempfile

from flaxcnn import bench

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TFDS = os.path.join(REPO, "..", "shared", "data", "tfds")
MODELS = bench.load_module(os.path.join(HERE, "keras_user_models.py")).MODELS


def command(
    model: str, contender: str, batch_size: int, workdir: str, tfds: str
) -> tuple[list[str], dict]:
    env = bench.environment(TFDS_DATA_DIR=tfds)
    if contender == "keras":
        twin = os.path.join(HERE, "keras_user_models.py")
        return [sys.executable, twin, "--model", model, "--batch-size", str(batch_size)], env
    if contender == "flaxcnn-plain":
        env["FLAXCNN_FAST_CPU_LAYERS"] = "0"
    return [
        sys.executable,
        "-m",
        "flaxcnn.main",
        "--workdir",
        workdir,
        "--config",
        os.path.join(REPO, "configs", MODELS[model][0]),
        f"--config.batch_size={batch_size}",
    ], env


def run_once(model: str, contender: str, batch_size: int, tfds: str) -> dict | None:
    """One whole command: its wall seconds, training examples/s and test accuracy; None (the
    reason printed) when it fails."""
    with tempfile.TemporaryDirectory() as workdir:
        argv, env = command(model, contender, batch_size, os.path.join(workdir, "run"), tfds)
        timed = bench.time_command(argv, f"{model} {contender} {batch_size}", env, REPO)
        if timed is None:
            return None
        seconds, stdout = timed
        if contender == "keras":
            rate = float(re.search(r"examples/s \(last epoch\): (\d+)", stdout)[1])
            accuracy = float(re.search(r"test accuracy ([\d.]+)", stdout)[1])
        else:
            with open(os.path.join(workdir, "run", "results.json")) as f:
                results = json.load(f)
            rate, accuracy = results["examples_per_s"], results["test_accuracy"]
        return {"seconds": seconds, "examples_per_s": rate, "accuracy": accuracy}


def compare(
    models: list[str], batch_sizes: list[int], repeats: int, contenders: list[str], tfds: str
) -> dict[str, list[dict]]:
    """{"model batch contender": [run]}: every contender once per repeat, taking turns."""
    runs = {}
    for repeat in range(repeats):
        for model in models:
            for batch_size in batch_sizes:
                for contender in contenders:
                    result = run_once(model, contender, batch_size, tfds)
                    runs.setdefault(f"{model} {batch_size} {contender}", []).append(result)
                    print(
                        f"repeat {repeat} {model} batch {batch_size} {contender}: {result}",
                        flush=True,
                    )
    return runs


def table(runs: dict[str, list[dict]], contenders: list[str]) -> list[str]:
    """Markdown: per model and batch size, each contender's median whole-command seconds and
    training examples/s, Keras's seconds over flaxcnn's, and the test accuracies."""
    header = " | ".join(f"{c} s (train ex/s)" for c in contenders)
    lines = [
        f"| model | batch | {header} | Keras / flaxcnn | test accuracy ({', '.join(contenders)}) |",
        "| --- " * (4 + len(contenders)) + "|",
    ]
    for row in dict.fromkeys(key.rsplit(" ", 1)[0] for key in runs):
        cells, seconds, accuracies = [], {}, []
        for contender in contenders:
            results = runs.get(f"{row} {contender}", [])
            seconds[contender] = bench.median_of(results, "seconds")
            rate, accuracy = (
                bench.median_of(results, "examples_per_s"),
                bench.median_of(results, "accuracy"),
            )
            failed = rate is None
            cells.append("failed" if failed else f"{seconds[contender]:.1f} ({rate:,.0f})")
            accuracies.append(f"{accuracy:.4f}" if accuracy is not None else "-")
        ours, theirs = seconds.get("flaxcnn"), seconds.get("keras")
        ratio = f"{theirs / ours:.2f}x" if ours and theirs else "-"
        model, batch_size = row.split(" ")
        lines.append(
            f"| {model} | {batch_size} | {' | '.join(cells)} | {ratio} | {' / '.join(accuracies)} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contenders", nargs="+", default=["flaxcnn", "flaxcnn-plain", "keras"])
    parser.add_argument("--tfds", default=TFDS)
    args = parser.parse_args()
    runs = compare(args.models, args.batch_sizes, args.repeats, args.contenders, args.tfds)
    print("\n".join(["", *table(runs, args.contenders)]))


if __name__ == "__main__":
    main()
