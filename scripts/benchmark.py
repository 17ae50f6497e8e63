"""Side-by-side training throughput of the Keras MNIST CNN: flaxcnn, Keras 3 and PyTorch.

    python scripts/benchmark.py [--batch-sizes 32 128] [--repeats 3] [--out benchmark]

Each trainer runs in its own subprocess, one after the other in this one invocation, on
full MNIST from ../shared/data (flaxcnn through tfds, the peers from the npz). Reported
per trainer and batch size: examples/s of one training epoch of 54,000 images with its
validation pass (median of the repeats; one-time compilation reported separately), pure step
throughput on one in-memory batch, and peak memory (max RSS). Writes JSON and markdown.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
TRAINERS = ("flaxcnn", "keras-tf", "keras-jax", "torch")
STEP_ITERS = 300


def load_npz(path: str):
    data = np.load(path)
    x = data["x_train"][..., None].astype(np.float32) / 255
    return x, data["y_train"].astype(np.int64)


def bench_flaxcnn(args) -> dict:
    import functools

    import jax
    import optax

    from flaxcnn import default_config, steps, train
    from flaxcnn.models import create_model
    from flaxcnn.state import create_train_state

    config = default_config.get_config()
    config.update(dataset="mnist", data_dir=args.tfds, num_epochs=1, batch_size=args.batch_size)
    config.log_every_steps = 10**9
    epochs, compiles = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as workdir:
            results = train.train_and_evaluate(config, workdir)
        epochs.append(results["examples_per_s"])
        compiles.append(results["compile_time_s"])

    state = create_train_state(
        create_model("SeedCNN"), optax.adam(1e-3), jax.random.key(0), (28, 28, 1)
    )
    micro = train.resolve_microbatch_size(config)
    step = jax.jit(functools.partial(steps.train_step, microbatch_size=micro), donate_argnums=0)
    x, y = load_npz(args.npz)
    batch = {
        "image": jax.device_put(x[: args.batch_size]),
        "label": jax.device_put(y[: args.batch_size].astype(np.int32)),
    }
    rng = jax.random.key(0)
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(STEP_ITERS):
        state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    step_rate = STEP_ITERS * args.batch_size / (time.perf_counter() - start)
    return {"epoch": epochs, "compile_s": statistics.median(compiles), "step": step_rate}


def bench_keras(args) -> dict:
    import keras

    x, y = load_npz(args.npz)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(
        x,
        y,
        batch_size=args.batch_size,
        epochs=args.repeats + 1,
        validation_split=0.1,
        verbose=0,
        callbacks=[Timer()],
    )
    epoch_rates = [54_000 / t for t in times[1:]]  # The first epoch also traces and compiles.
    xb, yb = x[: args.batch_size], y[: args.batch_size]
    model.train_on_batch(xb, yb)
    start = time.perf_counter()
    for _ in range(STEP_ITERS):
        model.train_on_batch(xb, yb)
    step_rate = STEP_ITERS * args.batch_size / (time.perf_counter() - start)
    return {
        "epoch": epoch_rates,
        "compile_s": times[0] - statistics.median(times[1:]),
        "step": step_rate,
    }


def bench_torch(args) -> dict:
    import torch
    from torch import nn

    torch.manual_seed(0)
    x, y = load_npz(args.npz)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(y)
    (x_train, y_train), (x_val, y_val) = (x[:54_000], y[:54_000]), (x[54_000:], y[54_000:])
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5408, 10)
    )
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True
    )

    def train_step(xb, yb):
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()

    epoch_rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model.train()
        for xb, yb in loader:
            train_step(xb, yb)
        model.eval()
        with torch.no_grad():
            model(x_val).argmax(1).eq(y_val).float().mean()
        epoch_rates.append(54_000 / (time.perf_counter() - start))
    xb, yb = x_train[: args.batch_size], y_train[: args.batch_size]
    start = time.perf_counter()
    for _ in range(STEP_ITERS):
        train_step(xb, yb)
    step_rate = STEP_ITERS * args.batch_size / (time.perf_counter() - start)
    return {"epoch": epoch_rates, "compile_s": 0.0, "step": step_rate}


def worker(args) -> None:
    if args.worker.startswith("keras"):
        os.environ["KERAS_BACKEND"] = args.worker.split("-")[1].replace("tf", "tensorflow")
    bench = {"flaxcnn": bench_flaxcnn, "torch": bench_torch}.get(args.worker, bench_keras)
    result = bench(args)
    result["epoch_median"] = statistics.median(result["epoch"])
    result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--trainers", nargs="+", default=["flaxcnn", "keras-tf", "torch"], choices=TRAINERS
    )
    parser.add_argument("--npz", default=os.path.join(SHARED, "mnist", "mnist.npz"))
    parser.add_argument("--tfds", default=os.path.join(SHARED, "tfds"))
    parser.add_argument("--out", default="benchmark")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    rows = []
    for batch_size in args.batch_sizes:
        for trainer in args.trainers:
            if (
                trainer == "torch"
                and subprocess.run(
                    [sys.executable, "-c", "import torch"], capture_output=True
                ).returncode
            ):
                print("torch is not installed: skipped (pip install torch==2.13.0)")
                continue
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                trainer,
                "--batch-size",
                str(batch_size),
                "--repeats",
                str(args.repeats),
                "--npz",
                args.npz,
                "--tfds",
                args.tfds,
            ]
            env = {
                **os.environ,
                "TF_CPP_MIN_LOG_LEVEL": "3",
                "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
            }
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{trainer} at batch {batch_size} failed:\n{proc.stderr[-3000:]}")
                continue
            row = {"trainer": trainer, "batch_size": batch_size, **json.loads(lines[-1][7:])}
            rows.append(row)
            print(
                f"{trainer:10s} batch {batch_size:4d}: epoch {row['epoch_median']:8,.0f} ex/s, "
                f"step {row['step']:8,.0f} ex/s, compile {row['compile_s']:.2f} s, "
                f"peak {row['peak_memory_mb']:,.0f} MB",
                flush=True,
            )

    table = [
        "| trainer | batch | epoch ex/s (median) | flaxcnn / it | step ex/s | compile s "
        "| peak MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ours = next(
            (r for r in rows if r["trainer"] == "flaxcnn" and r["batch_size"] == row["batch_size"]),
            None,
        )
        ratio = f"{ours['epoch_median'] / row['epoch_median']:.2f}x" if ours else "-"
        table.append(
            f"| {row['trainer']} | {row['batch_size']} | {row['epoch_median']:,.0f} | {ratio} "
            f"| {row['step']:,.0f} | {row['compile_s']:.2f} | {row['peak_memory_mb']:,.0f} |"
        )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(args.out, "benchmark.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
