"""Every family of the zoo (CNN, RNN, autoencoder, VAE, GAN) against its Keras twin
(`scripts/peers/keras_families.py`): training throughput, achieved FLOP/s as a fraction of
the machine's peak, and whole-command time.

    python scripts/benchmark_families.py [--epochs 0.25] [--repeats 3] [--command-repeats 1]
        [--user-model-repeats 2]
    python scripts/benchmark.py --families   # the same, from the main benchmark

Throughput: flaxcnn's run of `configs/<family>_mnist.py` as its loop runs it (the AOT-compiled
multi-step function on the training split kept on the device, real shuffled batches) over
`--epochs` epochs' worth of steps after a warm-up dispatch; the twin's `fit` over the same
number of examples, its second epoch timed (the first traces and compiles). The step's FLOPs
are XLA's cost analysis of the compiled one-step function with the standard layers (no loop:
XLA counts a loop's body once; nor custom calls: oneDNN's convolutions); achieved FLOP/s =
FLOPs per step * steps/s; the peak is a 2048 x 2048 float32 matmul's, the faster of XLA's
and TensorFlow's, measured in every repeat. Each contender runs in a fresh process and the
contenders take turns (each repeat runs every one once), so a shared machine's drift slows
them alike; medians over the repeats. Whole command:
`python -m flaxcnn.main --config configs/<family>_mnist.py --config.num_epochs=1` (the
generative runs' extra scores, which the twins do not compute, off) against
`keras_families.py --family <family> --epochs 1`, from start to exit; the first flaxcnn run
of a family has empty caches. Last, the user models written with plain `flax.linen` against
their Keras twins, whole command at batch 32 and 128 (`peers/compare_user_models.py`).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from flaxcnn import bench
from flaxcnn.bench import median_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWIN = os.path.join(REPO, "scripts", "peers", "keras_families.py")
FAMILIES = {
    "cnn": "cnn_mnist",
    "rnn": "rnn_mnist",
    "autoencoder": "ae_mnist",
    "vae": "vae_mnist",
    "gan": "gan_mnist",
}
TRAIN_EXAMPLES = 54_000  # MNIST's train[:90%], what both contenders train on.
MAX_DISPATCH = 16  # The most steps flaxcnn's loop runs per dispatch.
PEAK_SIZE = 2048
PEAK_REPEATS = 10
# Extras at the end of a flaxcnn run that the twins do not compute.
NO_EXTRAS = {"vae": ["--config.score_samples=0", "--config.iw_samples=0"]}
NO_EXTRAS["gan"] = ["--config.score_samples=0"]
# Settings of a family's config changed to train as its twin does: the GAN's twin is a plain
# DCGAN, without R1 and without the clusters it conditions itself on.
AS_THE_TWIN = {"gan": {"r1_gamma": 0.0, "num_clusters": 0}}
ANSWER = re.compile(r"test (accuracy|loss) (-?[0-9.]+)")


def load_config(family: str, tfds: str):
    """The family's flaxcnn config on the tfds folder `tfds`."""
    config = bench.load_module(os.path.join(REPO, "configs", f"{FAMILIES[family]}.py")).get_config()
    config.data_dir = tfds
    config.update(AS_THE_TWIN.get(family, {}))
    return config


def peak_flops() -> dict:
    """FLOP/s of a PEAK_SIZE^2 float32 matmul, the median of PEAK_REPEATS calls, jitted by
    XLA and in a tf.function (oneDNN): the peak is the faster one's."""
    import jax
    import jax.numpy as jnp
    import tensorflow as tf

    a = jax.random.normal(jax.random.key(0), (PEAK_SIZE, PEAK_SIZE), jnp.float32)
    xla_matmul = jax.jit(jnp.matmul)
    b = tf.constant(np.asarray(a))
    tf_matmul = tf.function(tf.matmul)
    rates = {
        "xla": 2 * PEAK_SIZE**3 / median_seconds(lambda: xla_matmul(a, a).block_until_ready()),
        "tf": 2 * PEAK_SIZE**3 / median_seconds(lambda: tf_matmul(b, b).numpy()),
    }
    return {"flops_per_s": max(rates.values()), **rates}


def median_seconds(fn) -> float:
    """The median time of PEAK_REPEATS calls of `fn`, after one that compiles."""
    fn()
    seconds = []
    for _ in range(PEAK_REPEATS):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def flaxcnn_steps(family: str, tfds: str, steps: int) -> tuple:
    """The run's compiled training functions {k: k steps per dispatch}, its state, device
    data, rng, mesh, and the batches of indices of a warm-up dispatch and `steps` steps
    (epochs' shuffled batches, as the loop draws them)."""
    import jax

    from flaxcnn import tasks
    from flaxcnn.data import batching, device_data, input_pipeline
    from flaxcnn.runner import steps as compiled_steps
    from flaxcnn.runtime import sharding

    config = load_config(family, tfds)
    split = input_pipeline.load_split(config.dataset, config.train_split, config.data_dir)
    mesh, task, rng = sharding.create_mesh(), tasks.get_task(config.task), jax.random.key(0)
    state = task.create_state(config, rng, split.image_shape, split.num_classes, 10**6)
    data = device_data.put_split(split, mesh)
    per_epoch = split.num_examples // config.batch_size
    fns = compiled_steps.compile_steps(
        task, config, state, data, data, mesh, rng, most_steps=min(steps, per_epoch)
    ).train
    epochs = [
        batching.epoch_indices(split.num_examples, config.batch_size, 0, e)
        for e in range(-(-(steps + MAX_DISPATCH) // per_epoch))
    ]
    return fns, state, data, rng, np.concatenate(epochs)[: steps + MAX_DISPATCH], mesh


def bench_flaxcnn(family: str, tfds: str, epochs: float) -> dict:
    """Examples/s of `epochs` epochs' worth of training steps dispatched as the loop does
    (k steps at once, the rest one by one), and the FLOPs of one step."""
    import jax

    from flaxcnn.data import device_data

    batch_size = load_config(family, tfds).batch_size
    steps = max(1, round(epochs * TRAIN_EXAMPLES / batch_size))
    fns, state, data, rng, indices, mesh = flaxcnn_steps(family, tfds, steps)
    k = max(fns)
    state, metrics = fns[k](state, data, device_data.shard_indices(indices[:k], mesh), rng)
    jax.block_until_ready(metrics)  # The warm-up dispatch; its batches are not timed.
    chunks = [indices[i : i + k] for i in range(k, k + steps // k * k, k)]
    chunks += [indices[k + steps // k * k + i][None] for i in range(steps % k)]
    chunks = [device_data.shard_indices(c, mesh) for c in chunks]
    start = time.perf_counter()
    for chunk in chunks:
        state, metrics = fns[len(chunk)](state, data, chunk, rng)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    return {
        "examples_per_s": steps * batch_size / seconds,
        "steps_per_s": steps / seconds,
        "flops_per_step": step_flops(family, tfds),
        "steps_per_dispatch": k,
        "batch_size": batch_size,
    }


def step_flops(family: str, tfds: str) -> float:
    """XLA's count of one training step's FLOPs, the step traced with the standard layers:
    XLA counts none inside the custom calls that run oneDNN's convolutions."""
    from flaxcnn.cpu import rewrite as cpu_rewrite

    with cpu_rewrite.standard_layers():
        return flaxcnn_steps(family, tfds, 1)[0][1].cost_analysis()["flops"]


def bench_keras(family: str, npz: str, epochs: float) -> dict:
    """Examples/s of the twin's second `fit` epoch over `epochs` epochs' worth of the
    training images (no validation pass: flaxcnn's timed steps have none either)."""
    keras_families = bench.load_module(TWIN)
    examples = round(epochs * TRAIN_EXAMPLES)
    result = keras_families.train(family, 2, npz, examples=examples)
    return {"examples_per_s": result["examples_per_s"]}


def worker(args) -> None:
    """One measurement in this fresh process, printed as a RESULT line."""
    if args.worker == "peak":
        result = peak_flops()
    elif args.worker == "flaxcnn":
        result = bench_flaxcnn(args.family, args.tfds, args.epochs)
    else:
        result = bench_keras(args.family, args.npz, args.epochs)
    bench.print_result(result)


def run_worker(name: str, family: str, args) -> dict | None:
    """`worker` in a fresh process: its result, or None (the reason printed)."""
    cmd = [sys.executable, __file__, "--worker", name] + (["--family", family] if family else [])
    cmd += ["--epochs", str(args.epochs), "--npz", args.npz, "--tfds", args.tfds]
    return bench.run_worker(cmd, f"{name} {family}", environment(), REPO)


def environment(**extra: str) -> dict:
    """bench's environment of a measured process, Keras on TensorFlow."""
    return bench.environment(KERAS_BACKEND="tensorflow", **extra)


def run_throughput(args) -> dict:
    """{"contender:family": [result or None per repeat]}, with "peak:" the matmul's; each
    repeat runs every contender once, in turn."""
    jobs = [("peak", "")] + [(c, f) for f in args.families for c in args.contenders]
    runs = {f"{name}:{family}": [] for name, family in jobs}
    for repeat in range(args.repeats):
        for name, family in jobs:
            result = run_worker(name, family, args)
            runs[f"{name}:{family}"].append(result)  # None when failed: repeats stay aligned.
            rate = result and result.get("examples_per_s", result.get("flops_per_s"))
            print(f"repeat {repeat + 1}: {name:8s} {family:12s} {rate or 0:14,.0f}", flush=True)
    return runs


def paired_ratio(ours: list, theirs: list) -> float | None:
    """The median over the repeats of flaxcnn's examples/s over the twin's in that repeat."""
    ratios = [a["examples_per_s"] / b["examples_per_s"] for a, b in zip(ours, theirs) if a and b]
    return statistics.median(ratios) if ratios else None


def throughput_table(runs: dict, families: list[str]) -> list[str]:
    """Per family: flaxcnn's examples/s, the step's FLOPs, the FLOP/s they make and their
    fraction of the peak (both medians over the repeats), the twin's examples/s and
    flaxcnn's speed-up (ratio of the medians; median of the per-repeat ratios)."""
    peak = median_of(runs["peak:"], "flops_per_s")
    xla, tf = median_of(runs["peak:"], "xla"), median_of(runs["peak:"], "tf")
    table = [
        f"Peak: {_giga(peak)} GFLOP/s, the faster {PEAK_SIZE}x{PEAK_SIZE} float32 matmul "
        f"(medians: XLA {_giga(xla)}, TensorFlow {_giga(tf)}).",
        "",
        "| family | batch | GFLOP/step (XLA) | flaxcnn ex/s | flaxcnn GFLOP/s | of peak "
        "| Keras ex/s | flaxcnn / Keras | per repeat |",
        "| --- " * 9 + "|",
    ]
    for family in families:
        ours, theirs = runs.get(f"flaxcnn:{family}", []), runs.get(f"keras:{family}", [])
        done = [r for r in ours if r]
        flops = done[0]["flops_per_step"] if done else None
        rates = [r["flops_per_step"] * r["steps_per_s"] for r in done]
        achieved = statistics.median(rates) if rates else None
        fraction = f"{achieved / peak:.1%}" if achieved and peak else "-"
        ex, twin = (
            median_of(ours, "examples_per_s"),
            median_of(theirs, "examples_per_s"),
        )
        ratio = f"{ex / twin:.2f}x" if ex and twin else "-"
        paired = paired_ratio(ours, theirs)
        table.append(
            f"| {family} | {done[0]['batch_size'] if done else '-'} | {_giga(flops, '.3f')} "
            f"| {_number(ex)} | {_giga(achieved)} | {fraction} | {_number(twin)} | {ratio} "
            f"| {'-' if paired is None else f'{paired:.2f}x'} |"
        )
    return table


def _giga(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value / 1e9, spec)


def _number(value: float | None, spec: str = ",.0f") -> str:
    return bench.fmt(value, spec)


def family_command(name: str, family: str, workdir: str, args) -> list[str]:
    """The shell command a user types: one epoch of the family (validation each epoch, the
    test split at the end) in flaxcnn or its Keras twin."""
    if name == "keras":
        return [sys.executable, TWIN, "--family", family, "--epochs", "1", "--npz", args.npz]
    config = os.path.join(REPO, "configs", f"{FAMILIES[family]}.py")
    command = [sys.executable, "-m", "flaxcnn.main", "--workdir", workdir, "--config", config]
    as_twin = [f"--config.{key}={value}" for key, value in AS_THE_TWIN.get(family, {}).items()]
    return command + ["--config.num_epochs=1", *NO_EXTRAS.get(family, []), *as_twin]


def time_command(name: str, family: str, cache_home: str, args) -> dict | None:
    """Wall seconds of the command from start to exit and its test metric; None (the reason
    printed) when it fails. `cache_home`: the XDG cache (flaxcnn's splits and compilations)."""
    env = environment(XDG_CACHE_HOME=cache_home, TFDS_DATA_DIR=args.tfds)
    label = f"{name} {family} command"
    with tempfile.TemporaryDirectory() as workdir:
        timed = bench.time_command(family_command(name, family, workdir, args), label, env, REPO)
        parts = run_parts(workdir)
    answer = timed and ANSWER.search(timed[1])
    if not answer:
        if timed:
            print(f"{label} printed no test metric", flush=True)
        return None
    return {
        "seconds": timed[0],
        "metric": answer.group(1),
        "value": float(answer.group(2)),
        **parts,
    }


def run_parts(workdir: str) -> dict:
    """Where a flaxcnn command's time went, from its results.json: compiling the steps and
    training (with the validation passes); {} for the twin, which writes none."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        results = json.load(f)
    return {"compile_s": results["compile_time_s"], "train_s": results["train_time_s"]}


def run_commands(args) -> dict:
    """{"contender:family": [run or None]}: each family's two commands, taking turns, 1 +
    `--command-repeats` times; flaxcnn's first run of a family with empty caches."""
    scratch = tempfile.mkdtemp(prefix="flaxcnn-families-")
    runs = {f"{c}:{f}": [] for f in args.families for c in args.contenders}
    try:
        for repeat in range(1 + args.command_repeats):
            for key, results in runs.items():
                name, family = key.split(":")
                result = time_command(name, family, os.path.join(scratch, family), args)
                results.append(result)
                seconds = result["seconds"] if result else float("nan")
                print(f"command {repeat + 1}: {key:20s} {seconds:6.1f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return runs


def command_table(runs: dict, families: list[str]) -> list[str]:
    """Per family: flaxcnn's first command (empty caches), its later ones (median), the
    seconds it spent compiling and training (median of all), the twin's (median of all: it
    keeps no cache), the twin's time over flaxcnn's later one (the first without later ones),
    and both test metrics (accuracy or loss, median)."""
    table = [
        "| family | flaxcnn s, first (empty caches) | flaxcnn s, later (median) "
        "| of which compiling / training s | Keras s | Keras / flaxcnn "
        "| test metric (flaxcnn / Keras) |",
        "| --- " * 7 + "|",
    ]
    for family in families:
        ours, theirs = runs.get(f"flaxcnn:{family}", []), runs.get(f"keras:{family}", [])
        first = ours[0]["seconds"] if ours and ours[0] else None
        later_median = median_of(ours[1:], "seconds")
        later = later_median or first
        twin = median_of(theirs, "seconds")
        ratio = f"{twin / later:.2f}x" if twin and later else "-"
        name = next((r["metric"] for r in ours + theirs if r), "")
        values = " / ".join(_number(median_of(s, "value"), ".4f") for s in (ours, theirs))
        parts = " / ".join(_number(median_of(ours, k), ".1f") for k in ("compile_s", "train_s"))
        table.append(
            f"| {family} | {_number(first, '.1f')} | {_number(later_median, '.1f')} "
            f"| {parts} | {_number(twin, '.1f')} | {ratio} | {name} {values} |"
        )
    return table


def compare_user_models():
    """scripts/peers/compare_user_models.py, imported on demand (workers need none of it)."""
    return bench.load_module(os.path.join(os.path.dirname(TWIN), "compare_user_models.py"))


def run_user_models(args) -> dict:
    """The user models' whole commands at batch 32 and 128, the contenders taking turns."""
    module = compare_user_models()
    models, batch_sizes = list(module.MODELS), [32, 128]
    return module.compare(models, batch_sizes, args.user_model_repeats, args.contenders, args.tfds)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument(
        "--epochs", type=float, default=0.25, help="epochs' worth of examples timed (throughput)"
    )
    parser.add_argument(
        "--contenders",
        nargs="+",
        default=["flaxcnn", "keras"],
        choices=["flaxcnn", "keras"],
        help="flaxcnn alone on a GPU, whose twins would run on the CPU",
    )
    parser.add_argument("--repeats", type=int, default=3, help="throughput repeats")
    parser.add_argument(
        "--command-repeats",
        type=int,
        default=1,
        help="whole commands run after the first of each (-1: no whole commands)",
    )
    parser.add_argument(
        "--user-model-repeats",
        type=int,
        default=2,
        help="repeats of the user models' commands (0: none)",
    )
    bench.add_data_options(parser, REPO)
    parser.add_argument("--worker", choices=("peak", "flaxcnn", "keras"), help=argparse.SUPPRESS)
    parser.add_argument("--family", choices=FAMILIES, help=argparse.SUPPRESS)
    return parser


def run(args) -> list[str]:
    """The benchmark: the markdown report's lines; JSON and markdown written to `args.out`."""
    report, results = [f"Load average (1 min) at the start: {os.getloadavg()[0]:.2f}", ""], {}
    results["throughput"] = run_throughput(args)
    report += [
        "## Families: training throughput",
        "",
        *throughput_table(results["throughput"], args.families),
    ]
    if args.command_repeats >= 0:
        results["commands"] = run_commands(args)
        report += ["", "## Families: whole command (1 epoch)", ""]
        report += command_table(results["commands"], args.families)
    if args.user_model_repeats > 0:
        results["user_models"] = run_user_models(args)
        report += ["", "## User models (plain flax.linen): whole command (2 epochs)", ""]
        report += compare_user_models().table(results["user_models"], args.contenders)
    report += ["", f"Load average (1 min) at the end: {os.getloadavg()[0]:.2f}"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "families.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "families.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.worker:
        return worker(args)
    print("\n".join(run(args)))


if __name__ == "__main__":
    main()
