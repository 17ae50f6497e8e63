"""Side-by-side speed of the Keras MNIST CNN: flaxcnn, Keras 3 and PyTorch.

    python scripts/benchmark.py [--batch-sizes 32 128] [--repeats 5] [--out benchmark]

First the whole command, as a user waits for it: each contender's command run as a fresh
process, timed from its start to its exit (the answer printed): `python -m flaxcnn.main
--config configs/seed_keras.py --config.num_epochs=3 --config.batch_size=B` against
`scripts/peers/keras_mnist.py` and `scripts/peers/torch_mnist.py`, each training 3 epochs on
full MNIST with the 10% validation pass each epoch and the test evaluation at the end. The
first run of each has empty caches (a fresh XDG cache folder: no decoded splits, no compiled
steps); then `--whole-command-repeats` runs with what the first left, the contenders taking
turns. Also the README's main job (`python -m flaxcnn.main --workdir W`), first with a fresh
tfds folder, then warm.

Then throughput. Each trainer runs in its own subprocess, on full MNIST from ../shared/data
(flaxcnn through tfds, the peers from the npz). The trainers take turns: each repeat runs every
trainer once, so that a machine whose speed drifts (a shared one) slows them alike. Reported
per trainer and batch size: examples/s of a training epoch of 54,000 images with its validation
pass (median over the repeats; flaxcnn and Keras time their second epoch, so that one-time
compilation, reported separately, is not in it), pure step throughput on one in-memory batch,
and peak memory (max RSS). Then time to accuracy: wall seconds from the start of a run until
its test accuracy (checked every epoch) first reaches 98.5%, for flaxcnn
(`configs/seed_fast.py`) and Keras `fit` (batch 32 and 128, Adam 1e-3, up to 15 epochs). Writes
JSON and markdown.

    python scripts/benchmark.py --families [--families-epochs 0.25] [--families-repeats 3]

runs instead every zoo family against its Keras twin (`scripts/benchmark_families.py`):
throughput, FLOP/s as a fraction of the machine's peak, and whole-command time; then the
plain-`flax.linen` user models against theirs.

    python scripts/benchmark.py --cifar [--cifar-data ROOT] [--cifar-seeds 0 1] [--cifar-repeats 1]

runs instead CIFAR-10's `configs/cifar10_fast.py` against its PyTorch and Keras twins, whole
commands to 15 epochs' test accuracy (`scripts/benchmark_cifar.py`).
"""

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from flaxcnn import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINERS = ("flaxcnn", "keras-tf", "keras-jax", "torch")
STEP_ITERS = 320
TARGET_ACCURACY = 0.985
KERAS_MAX_EPOCHS = 15
KERAS_TTA_BATCHES = (32, 128)


def load_npz(path: str):
    data = np.load(path)
    x = data["x_train"][..., None].astype(np.float32) / 255
    return x, data["y_train"].astype(np.int64)


def flaxcnn_config(name: str, args, **overrides):
    """`configs/<name>.py` on the shared tfds folder, with `overrides`."""
    config = bench.load_module(os.path.join(REPO, "configs", f"{name}.py")).get_config()
    config.update(data_dir=args.tfds, **overrides)
    return config


def bench_flaxcnn(args) -> dict:
    import jax

    from flaxcnn import tasks
    from flaxcnn.data import batching, device_data, input_pipeline
    from flaxcnn.reporting.writers import read_metrics
    from flaxcnn.runner import loop, steps
    from flaxcnn.runtime import sharding

    # Two epochs of a real run; the second is timed between the validation records that
    # end the epochs (training, validation and checkpoint, as Keras's epoch has them).
    config = flaxcnn_config("seed_keras", args, num_epochs=2, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as workdir:
        results = loop.train_and_evaluate(config, workdir)
        records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    ends = [r["time"] for r in records if r["split"] == "validation"]
    epoch_rate = results["steps"] // 2 * args.batch_size / (ends[1] - ends[0])

    # Step throughput: the run's own compiled multi-step function on one batch of indices.
    split = input_pipeline.load_split(config.dataset, config.train_split, config.data_dir)
    mesh = sharding.create_mesh()
    task = tasks.get_task(config.task)
    rng = jax.random.key(0)
    state = task.create_state(config, rng, split.image_shape, split.num_classes, 10**6)
    data = device_data.put_split(split, mesh)
    train_fns = steps.compile_steps(task, config, state, data, data, mesh, rng).train
    k = max(train_fns)
    indices = batching.epoch_indices(split.num_examples, args.batch_size, 0, 0)[:1]
    chunk = device_data.shard_indices(np.repeat(indices, k, axis=0), mesh)
    state, metrics = train_fns[k](state, data, chunk, rng)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(STEP_ITERS // k):
        state, metrics = train_fns[k](state, data, chunk, rng)
    jax.block_until_ready(metrics)
    step_rate = STEP_ITERS // k * k * args.batch_size / (time.perf_counter() - start)
    return {"epoch": epoch_rate, "compile_s": results["compile_time_s"], "step": step_rate}


def keras_model():
    """The classic example's model, as the Keras peer script builds and compiles it."""
    peer = bench.load_module(os.path.join(REPO, "scripts", "peers", "keras_mnist.py"))
    return peer.keras_model()


def bench_keras(args) -> dict:
    import keras

    x, y = load_npz(args.npz)
    model = keras_model()
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
        epochs=2,
        validation_split=0.1,
        verbose=0,
        callbacks=[Timer()],
    )
    xb, yb = x[: args.batch_size], y[: args.batch_size]
    model.train_on_batch(xb, yb)
    start = time.perf_counter()
    for _ in range(STEP_ITERS):
        model.train_on_batch(xb, yb)
    step_rate = STEP_ITERS * args.batch_size / (time.perf_counter() - start)
    # The first epoch also traces and compiles; the second is timed.
    return {"epoch": 54_000 / times[1], "compile_s": times[0] - times[1], "step": step_rate}


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

    start = time.perf_counter()
    model.train()
    for xb, yb in loader:
        train_step(xb, yb)
    model.eval()
    with torch.no_grad():
        model(x_val).argmax(1).eq(y_val).float().mean()
    epoch_rate = 54_000 / (time.perf_counter() - start)
    xb, yb = x_train[: args.batch_size], y_train[: args.batch_size]
    start = time.perf_counter()
    for _ in range(STEP_ITERS):
        train_step(xb, yb)
    step_rate = STEP_ITERS * args.batch_size / (time.perf_counter() - start)
    return {"epoch": epoch_rate, "compile_s": 0.0, "step": step_rate}


def tta_flaxcnn(args) -> dict:
    """Seconds from the call until the test accuracy first reaches the target, with the
    test split as the run's per-epoch validation (`configs/seed_fast.py`)."""
    from flaxcnn.reporting.writers import read_metrics
    from flaxcnn.runner import loop

    config = flaxcnn_config("seed_fast", args, validation_split="test")
    with tempfile.TemporaryDirectory() as workdir:
        start = time.time()
        loop.train_and_evaluate(config, workdir)
        records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    curve = [(r["time"] - start, r["accuracy"]) for r in records if r["split"] == "validation"]
    return {"curve": curve}


def tta_keras(args) -> dict:
    """The same for Keras `fit` (batch `args.batch_size`, Adam 1e-3), testing every epoch."""
    import keras

    keras.utils.set_random_seed(0)
    data = np.load(args.npz)
    x, y = data["x_train"][..., None].astype("float32") / 255, data["y_train"]
    x_test, y_test = data["x_test"][..., None].astype("float32") / 255, data["y_test"]
    model = keras_model()
    curve = []
    start = time.time()

    class TestEveryEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)[1]
            curve.append((time.time() - start, accuracy))
            model.stop_training = accuracy >= TARGET_ACCURACY

    model.fit(
        x,
        y,
        batch_size=args.batch_size,
        epochs=KERAS_MAX_EPOCHS,
        validation_split=0.1,
        verbose=0,
        callbacks=[TestEveryEpoch()],
    )
    return {"curve": curve}


WORKERS = {
    "flaxcnn": bench_flaxcnn,
    "keras-tf": bench_keras,
    "keras-jax": bench_keras,
    "torch": bench_torch,
    "flaxcnn-tta": tta_flaxcnn,
    "keras-tf-tta": tta_keras,
}


def worker(args) -> None:
    if args.worker.startswith("keras"):
        os.environ["KERAS_BACKEND"] = args.worker.split("-")[1].replace("tf", "tensorflow")
    result = WORKERS[args.worker](args)
    result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bench.print_result(result)


def run_worker(name: str, batch_size: int, args) -> dict | None:
    """Runs one worker in a fresh process; its result, or None (with the reason printed)."""
    if name == "torch" and not bench.has_torch():
        return None
    cmd = [sys.executable, __file__, "--worker", name, "--batch-size", str(batch_size)]
    cmd += ["--npz", args.npz, "--tfds", args.tfds]
    return bench.run_worker(cmd, f"{name} at batch {batch_size}", bench.environment(), REPO)


def throughput_table(rows: list[dict]) -> list[str]:
    """Each trainer's medians, and flaxcnn's speed-up over it: the ratio of the medians, and
    the median of the ratios within each repeat (the trainers ran close together in time)."""
    table = [
        "| trainer | batch | epoch ex/s (median) | flaxcnn / it | flaxcnn / it per repeat "
        "| step ex/s | compile s | peak MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ours = next(
            (r for r in rows if r["trainer"] == "flaxcnn" and r["batch_size"] == row["batch_size"]),
            None,
        )
        ratio = paired = "-"
        if ours:
            ratio = f"{ours['epoch_median'] / row['epoch_median']:.2f}x"
            ratios = [a / b for a, b in zip(ours["epoch"], row["epoch"]) if a and b]
            paired = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        table.append(
            f"| {row['trainer']} | {row['batch_size']} | {row['epoch_median']:,.0f} | {ratio} "
            f"| {paired} | {row['step']:,.0f} | {row['compile_s']:.2f} "
            f"| {row['peak_memory_mb']:,.0f} |"
        )
    return table


def time_to_target(curve: list) -> float | None:
    return next((t for t, accuracy in curve if accuracy >= TARGET_ACCURACY), None)


def tta_table(rows: list[dict]) -> list[str]:
    table = [
        f"| trainer | settings | seconds to {TARGET_ACCURACY:.1%} test accuracy "
        "| test accuracy by epoch |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        seconds = time_to_target(row["curve"])
        reached = f"{seconds:.1f}" if seconds else f"not in {row['curve'][-1][0]:.0f} s"
        accuracies = " ".join(f"{a:.4f}" for _, a in row["curve"])
        table.append(f"| {row['trainer']} | {row['settings']} | {reached} | {accuracies} |")
    return table


WHOLE_COMMAND_CONTENDERS = ("flaxcnn", "keras", "torch")
PEER_NAMES = {"keras": "Keras fit (TF)", "torch": "PyTorch"}
ANSWER = re.compile(r"test accuracy ([0-9.]+)")


def contender_command(name: str, batch_size: int, workdir: str, args) -> list[str]:
    """The shell command of a whole-command contender: `--whole-command-epochs` epochs of the
    seed model on full MNIST, validation each epoch, the test split at the end, the answer
    printed; or (`flaxcnn-default`) the README's main job as it is written there."""
    command = [sys.executable, "-m", "flaxcnn.main", "--workdir", workdir]
    epochs = str(args.whole_command_epochs)
    if name == "flaxcnn":
        command += ["--config", os.path.join(REPO, "configs", "seed_keras.py")]
        command += [f"--config.num_epochs={epochs}", f"--config.batch_size={batch_size}"]
    elif name != "flaxcnn-default":
        script = os.path.join(REPO, "scripts", "peers", f"{name}_mnist.py")
        command = [sys.executable, script, "--npz", args.npz, "--epochs", epochs]
        command += ["--batch-size", str(batch_size)]
    return command


def time_command(name: str, batch_size: int, cache_home: str, tfds_dir: str, args) -> dict | None:
    """Wall seconds of one contender's command as a fresh process, from its start to its
    exit, and its printed test accuracy; None (the reason printed) when it fails.
    `cache_home` is the XDG cache folder (flaxcnn's decoded splits and compiled steps)."""
    env = bench.environment(XDG_CACHE_HOME=cache_home, TFDS_DATA_DIR=tfds_dir)
    label = f"{name} at batch {batch_size}"
    with tempfile.TemporaryDirectory() as workdir:
        command = contender_command(name, batch_size, workdir, args)
        timed = bench.time_command(command, label, env, REPO, args.whole_command_timeout)
    answer = timed and ANSWER.search(timed[1])
    if not answer:
        if timed:
            print(f"{label} printed no test accuracy")
        return None
    # The machine's load average over the last minute: a shared machine's is part of the story.
    return {"seconds": timed[0], "accuracy": float(answer.group(1)), "load": os.getloadavg()[0]}


def run_whole_commands(args) -> list[dict]:
    """Every contender's command at every batch size: first with empty caches (a fresh XDG
    cache folder per batch size; the README's main job also with a fresh tfds folder), then
    `--whole-command-repeats` times with the caches that first run left, the contenders
    taking turns in an order rotated each repeat (the machine is shared: its speed drifts)."""
    contenders = [c for c in WHOLE_COMMAND_CONTENDERS if c != "torch" or bench.has_torch()]
    jobs = [(c, b) for b in args.batch_sizes for c in contenders] + [("flaxcnn-default", 32)]
    scratch = tempfile.mkdtemp(prefix="flaxcnn-bench-")
    folders = {b: os.path.join(scratch, f"cache-{b}") for b in args.batch_sizes}
    default_tfds = os.path.join(scratch, "tfds")  # The main job prepares its dataset here.
    runs = {job: [] for job in jobs}
    try:
        for repeat in range(args.whole_command_repeats + 1):
            shift = repeat % len(contenders)
            for name, batch_size in jobs[shift:] + jobs[:shift]:
                default = name == "flaxcnn-default"
                cache_home = (
                    os.path.join(scratch, "cache-default") if default else folders[batch_size]
                )
                result = time_command(
                    name, batch_size, cache_home, default_tfds if default else args.tfds, args
                )
                runs[name, batch_size].append(result)  # None for a failed run: pairs stay.
                if result is not None:
                    print(
                        f"{'first' if repeat == 0 else f'repeat {repeat}'}: {name:15s} batch "
                        f"{batch_size:4d}: {result['seconds']:6.1f} s, test accuracy "
                        f"{result['accuracy']:.4f} (load {result['load']:.1f})",
                        flush=True,
                    )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [
        {"contender": name, "batch_size": batch_size, "runs": results}
        for (name, batch_size), results in runs.items()
    ]


def whole_command_table(rows: list[dict]) -> list[str]:
    """Per batch size: the first run (empty caches) and the median of the later runs of each
    contender, flaxcnn's speed-up over the best peer (ratio of the medians, and the median of
    the per-repeat ratios), and each contender's test accuracy (median)."""
    by_key = {(r["contender"], r["batch_size"]): r["runs"] for r in rows}
    peers = [c for c in WHOLE_COMMAND_CONTENDERS[1:] if any(k[0] == c for k in by_key)]
    table = [
        "| batch | run | flaxcnn s | "
        + " | ".join(f"{PEER_NAMES[p]} s" for p in peers)
        + " | flaxcnn vs best peer | per-repeat | test accuracy (flaxcnn / "
        + " / ".join(PEER_NAMES[p] for p in peers)
        + ") |",
        "| --- " * (6 + len(peers)) + "|",
    ]
    for batch_size in sorted({b for c, b in by_key if c == "flaxcnn"}):
        series = [by_key[("flaxcnn", batch_size)]] + [by_key[(p, batch_size)] for p in peers]
        for label, part in (
            ("first (empty caches)", slice(0, 1)),
            ("later (median)", slice(1, None)),
        ):
            table.append(_whole_command_row(batch_size, label, [s[part] for s in series]))
    default = by_key.get(("flaxcnn-default", 32))
    if default:
        for label, part in (
            ("first (empty caches)", slice(0, 1)),
            ("later (median)", slice(1, None)),
        ):
            seconds = bench.median_of(default[part], "seconds")
            accuracy = bench.median_of(default[part], "accuracy")
            table.append(
                f"| README main job | {label} | {bench.fmt(seconds)} |"
                + " - |" * len(peers)
                + f" - | - | {bench.fmt(accuracy, '.4f')} |"
            )
    return table


def _whole_command_row(batch_size: int, label: str, series: list[list]) -> str:
    medians = [bench.median_of(s, "seconds") for s in series]
    ours, peer_medians = medians[0], [m for m in medians[1:] if m is not None]
    ratio = f"{min(peer_medians) / ours:.2f}x" if ours and peer_medians else "-"
    paired = []
    for ours_run, *peer_runs in zip(*series):  # One repeat: every contender's run.
        done = [r["seconds"] for r in peer_runs if r is not None]
        if ours_run is not None and done:  # Against the best peer that finished.
            paired.append(min(done) / ours_run["seconds"])
    per_repeat = f"{statistics.median(paired):.2f}x" if len(series) > 1 and paired else "-"
    accuracies = " / ".join(bench.fmt(bench.median_of(s, "accuracy"), ".4f") for s in series)
    cells = " | ".join(bench.fmt(m) for m in medians)
    return f"| {batch_size} | {label} | {cells} | {ratio} | {per_repeat} | {accuracies} |"


def add_family_options(parser: argparse.ArgumentParser) -> None:
    """`--families` and its settings: scripts/benchmark_families.py's options."""
    parser.add_argument(
        "--families",
        action="store_true",
        help="instead: every zoo family (CNN, RNN, autoencoder, VAE, GAN) against its Keras "
        "twin, with FLOP/s as a fraction of the peak (scripts/benchmark_families.py)",
    )
    parser.add_argument("--families-epochs", type=float, default=0.25)
    parser.add_argument("--families-repeats", type=int, default=3)
    parser.add_argument("--families-command-repeats", type=int, default=1)
    parser.add_argument("--families-user-model-repeats", type=int, default=2)


def run_families(args) -> None:
    """scripts/benchmark_families.py with this command's options; its tables printed."""
    families = bench.load_module(os.path.join(REPO, "scripts", "benchmark_families.py"))
    families.main(
        ["--epochs", str(args.families_epochs), "--repeats", str(args.families_repeats)]
        + ["--command-repeats", str(args.families_command_repeats), "--npz", args.npz]
        + ["--user-model-repeats", str(args.families_user_model_repeats)]
        + ["--tfds", args.tfds, "--out", args.out]
    )


def add_cifar_options(parser: argparse.ArgumentParser) -> None:
    """`--cifar` and its settings: scripts/benchmark_cifar.py's options."""
    parser.add_argument(
        "--cifar",
        action="store_true",
        help="instead: CIFAR-10's cifar10_fast against its PyTorch and Keras twins, whole "
        "commands (scripts/benchmark_cifar.py)",
    )
    parser.add_argument("--cifar-data", help="ROOT/train/CLASS/*, ROOT/test (default: shared copy)")
    parser.add_argument("--cifar-contenders", nargs="+", default=["flaxcnn", "torch", "keras"])
    parser.add_argument("--cifar-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cifar-repeats", type=int, default=1)
    parser.add_argument("--cifar-epochs", type=int, default=15)
    parser.add_argument("--cifar-max-steps", type=int, default=0, help="smoke runs: K steps")


def run_cifar(args) -> None:
    """scripts/benchmark_cifar.py with this command's options; its table printed."""
    cifar = bench.load_module(os.path.join(REPO, "scripts", "benchmark_cifar.py"))
    cifar.main(cifar_arguments(args))


def cifar_arguments(args) -> list[str]:
    """scripts/benchmark_cifar.py's command line from this command's --cifar-* options."""
    argv = ["--contenders", *args.cifar_contenders]
    argv += ["--seeds", *map(str, args.cifar_seeds), "--repeats", str(args.cifar_repeats)]
    argv += ["--epochs", str(args.cifar_epochs), "--max-steps", str(args.cifar_max_steps)]
    argv += ["--data", args.cifar_data] if args.cifar_data else []
    return argv + ["--out", args.out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--trainers",
        nargs="*",
        default=["flaxcnn", "keras-tf", "torch"],
        choices=TRAINERS,
        help="throughput runs (none: only time to accuracy)",
    )
    parser.add_argument(
        "--time-to-accuracy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also time flaxcnn and Keras to {TARGET_ACCURACY * 100:.1f}%% test accuracy",
    )
    parser.add_argument(
        "--whole-command-repeats",
        type=int,
        default=3,
        help="runs of each whole command after its first (0 and 0 epochs: none at all)",
    )
    parser.add_argument("--whole-command-epochs", type=int, default=3)
    parser.add_argument(
        "--whole-command-timeout",
        type=float,
        default=1800,
        help="seconds after which a whole command is stopped and counted as failed",
    )
    bench.add_data_options(parser, REPO)
    add_family_options(parser)
    add_cifar_options(parser)
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.families:
        return run_families(args)
    if args.cifar:
        return run_cifar(args)

    report = []
    whole_rows = []
    if args.whole_command_epochs > 0:
        whole_rows = run_whole_commands(args)
        report += ["## Whole command (seconds from the prompt to the answer)", ""]
        report += [*whole_command_table(whole_rows), ""]

    runs = {(trainer, b): [] for b in args.batch_sizes for trainer in args.trainers}
    for repeat in range(args.repeats):
        for (trainer, batch_size), results in runs.items():
            result = run_worker(trainer, batch_size, args)
            results.append(result)  # None for a failed run, so repeats stay aligned.
            if result is not None:
                print(
                    f"repeat {repeat + 1}: {trainer:10s} batch {batch_size:4d}: epoch "
                    f"{result['epoch']:8,.0f} ex/s, step {result['step']:8,.0f} ex/s",
                    flush=True,
                )
    rows = [
        {
            "trainer": trainer,
            "batch_size": batch_size,
            "epoch": [r and r["epoch"] for r in results],
            "epoch_median": statistics.median(r["epoch"] for r in done),
            "step": statistics.median(r["step"] for r in done),
            "compile_s": statistics.median(r["compile_s"] for r in done),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in done),
        }
        for (trainer, batch_size), results in runs.items()
        if (done := [r for r in results if r is not None])
    ]
    if rows:
        report += ["## Throughput", "", *throughput_table(rows)]

    tta_rows = []
    if args.time_to_accuracy:
        runs = [("flaxcnn-tta", 0, "configs/seed_fast.py")]
        runs += [("keras-tf-tta", b, f"fit, batch {b}, Adam 1e-3") for b in KERAS_TTA_BATCHES]
        for name, batch_size, settings in runs:
            result = run_worker(name, batch_size, args)
            if result is not None:
                tta_rows.append({"trainer": name[:-4], "settings": settings, **result})
                print(f"{name} {settings}: {time_to_target(result['curve'])} s", flush=True)
        report += ["", "## Time to accuracy", "", *tta_table(tta_rows)]

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark.json"), "w") as f:
        results = {"whole_command": whole_rows, "throughput": rows, "time_to_accuracy": tta_rows}
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "benchmark.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
