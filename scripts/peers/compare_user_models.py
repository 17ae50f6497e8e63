"""Whole-command time and training throughput of the user models (plain `flax.linen`:
`configs/user_cnn.py`, `user_flax_example.py`, `user_keras_example.py`) under flaxcnn (with
and without the CPU rewrite of standard layers) against their Keras twins
(`keras_user_models.py`), taking turns.

    python scripts/peers/compare_user_models.py [--models user_cnn flax_example keras_example]
        [--batch-sizes 32 128] [--repeats 3] [--contenders flaxcnn flaxcnn-plain keras]

flaxcnn reads full MNIST through tfds from ../shared/data/tfds; Keras from the npz. Prints
one line per run and the medians per model, contender and batch size; the machine may be
shared, so each repeat runs every contender once.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TFDS = os.path.join(REPO, "..", "shared", "data", "tfds")
sys.path.insert(0, HERE)
from keras_user_models import MODELS  # noqa: E402


def command(model: str, contender: str, batch_size: int, workdir: str) -> tuple[list[str], dict]:
    env = dict(os.environ, TFDS_DATA_DIR=TFDS)
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


def run_once(model: str, contender: str, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        argv, env = command(model, contender, batch_size, os.path.join(workdir, "run"))
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
        seconds = time.perf_counter() - start
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
            return {"seconds": None}
        if contender == "keras":
            rate = float(re.search(r"examples/s \(last epoch\): (\d+)", done.stdout)[1])
            accuracy = float(re.search(r"test accuracy ([\d.]+)", done.stdout)[1])
        else:
            with open(os.path.join(workdir, "run", "results.json")) as f:
                results = json.load(f)
            rate, accuracy = results["examples_per_s"], results["test_accuracy"]
        return {"seconds": seconds, "examples_per_s": rate, "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contenders", nargs="+", default=["flaxcnn", "flaxcnn-plain", "keras"])
    args = parser.parse_args()
    runs = {}
    for repeat in range(args.repeats):
        for model in args.models:
            for batch_size in args.batch_sizes:
                for contender in args.contenders:
                    result = run_once(model, contender, batch_size)
                    runs.setdefault((model, contender, batch_size), []).append(result)
                    print(
                        f"repeat {repeat} {model} batch {batch_size} {contender}: {result}",
                        flush=True,
                    )
    print("\nmodel, contender, batch: median whole-command s, median training ex/s, accuracies")
    for (model, contender, batch_size), results in runs.items():
        ok = [r for r in results if r["seconds"] is not None]
        if not ok:
            print(f"{model}, {contender}, {batch_size}: all runs failed")
            continue
        seconds = statistics.median(r["seconds"] for r in ok)
        rate = statistics.median(r["examples_per_s"] for r in ok)
        accuracies = ", ".join(f"{r['accuracy']:.4f}" for r in ok)
        print(f"{model}, {contender}, {batch_size}: {seconds:.1f} s, {rate:.0f} ex/s, {accuracies}")


if __name__ == "__main__":
    main()
