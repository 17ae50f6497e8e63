"""CIFAR-10 fast, whole commands: flaxcnn's `configs/cifar10_fast.py` against its twins.

The twins: PyTorch and Keras 3 (`scripts/peers/torch_cifar.py`, `scripts/peers/keras_cifar.py`:
the same net, whitening, initialisation, schedule, regularisation, augmentation and test-time
views).

    python scripts/benchmark_cifar.py [--data ROOT] [--contenders flaxcnn torch keras]
        [--seeds 0] [--repeats 1] [--epochs 15] [--max-steps K] [--out benchmark]
    python scripts/benchmark.py --cifar [--cifar-data ROOT] [--cifar-seeds 0 1] ...

Each contender's whole command runs as a fresh process and is timed from its start to its exit,
as a user waits for it: `python -m flaxcnn.main --workdir W --config configs/cifar10_fast.py
--config.dataset=folder:ROOT --config.seed=S --config.num_epochs=E` against `torch_cifar.py
--data ROOT --seed S --epochs E` and `keras_cifar.py` (the same; `keras-jax` runs it on JAX).
Each repeat runs every contender once per seed, in an order rotated each repeat, so a shared
machine's drift slows them alike. flaxcnn keeps decoded splits and compiled steps in its XDG
cache: one fresh cache folder serves the whole benchmark, so flaxcnn's first run (repeat 1)
starts with empty caches and later repeats use what it left; the twins keep none.

Peak memory is each command's largest process's peak RSS, from `os.wait4` on that command
(its own and its reaped children's maximum, e.g. flaxcnn's decoding processes: a max, not a
sum), started by a small launcher process so that it does not inherit this process's RSS as
its floor. `getrusage(RUSAGE_CHILDREN)` deltas cannot give it: that maximum is over every
child so far, so a smaller later command would read as the earlier one's peak. CPU seconds
(user + system) come from the same call; wall seconds from the command's start to its exit.

Test accuracy is each run's own report: flaxcnn's `W/results.json` (`test_accuracy`, with its
per-epoch validation accuracy from `W/metrics.jsonl`), the twins' `--out` JSON. The table
marks whether each run reached the target (90%: cifar10_fast's) and, on flaxcnn's rows, its
speed-up: the seconds of the fastest peer of the same seed and repeat that reached the same
accuracy (the target, or flaxcnn's own accuracy if flaxcnn fell short of it) over flaxcnn's.
Without `--data` the shared JPEG copy (../shared/data/cifar10-jpeg) is unpacked to a temporary
folder first (not timed); accuracies on it are "CIFAR-10 (JPEG q75 copy)" figures.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile

from flaxcnn import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(REPO, "scripts", "peers")
CONFIG = os.path.join(REPO, "configs", "cifar10_fast.py")
ARCHIVE = os.path.join(REPO, "..", "shared", "data", "cifar10-jpeg", "cifar10-jpeg.tar.gz")
CONTENDERS = ("flaxcnn", "torch", "keras", "keras-jax")
PEER_SCRIPTS = {"torch": "torch_cifar.py", "keras": "keras_cifar.py", "keras-jax": "keras_cifar.py"}
BACKENDS = {"keras": "tensorflow", "keras-jax": "jax"}
TARGET = 0.90
RESULTS = "results.json"  # The twins' --out, and flaxcnn's own file in its workdir.


def command(name: str, root: str, seed: int, workdir: str, args) -> list[str]:
    """The shell command of contender `name`: the recipe on the image folder `root`, seeded
    `seed`, its results written in `workdir` (flaxcnn's workdir; the twins' --out there)."""
    if name == "flaxcnn":
        return [
            sys.executable,
            "-m",
            "flaxcnn.main",
            "--workdir",
            workdir,
            "--config",
            CONFIG,
            f"--config.dataset=folder:{root}",
            f"--config.seed={seed}",
            f"--config.num_epochs={args.epochs}",
            f"--config.batch_size={args.batch_size}",
        ] + ([f"--config.num_train_steps={args.max_steps}"] if args.max_steps else [])
    script = os.path.join(PEERS, PEER_SCRIPTS[name])
    peer = [sys.executable, script, "--data", root, "--seed", str(seed)]
    peer += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    peer += ["--out", os.path.join(workdir, RESULTS)]
    return peer + (["--max-steps", str(args.max_steps)] if args.max_steps else [])


def environment(name: str, cache_home: str) -> dict:
    """bench's environment of a measured process, with flaxcnn's XDG cache `cache_home` and
    the Keras backend of a Keras contender."""
    extra = {"XDG_CACHE_HOME": cache_home}
    if name in BACKENDS:
        extra["KERAS_BACKEND"] = BACKENDS[name]
    return bench.environment(**extra)


# Runs the command given after the path of its report, as a child of this small, fresh
# process, and writes its wall seconds and `os.wait4` rusage there. A child's peak RSS starts
# from its parent's (Linux carries the parent's high-water mark across exec): this launcher's
# few MB, not the benchmark's own (or a test runner's) hundreds.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"seconds": seconds, "returncode": os.waitstatus_to_exitcode(status),
               "peak_memory_mb": usage.ru_maxrss / 1024,  # KB on Linux.
               "cpu_s": usage.ru_utime + usage.ru_stime}, f)
"""


def run_timed(cmd: list[str], env: dict, timeout: float) -> dict:
    """Runs `cmd` to its exit (through `LAUNCHER`): wall seconds, its exit code (None: stopped
    at `timeout`), peak RSS in MB and CPU seconds (`os.wait4`'s rusage of this command alone,
    its reaped children included), and the end of its output."""
    with tempfile.TemporaryDirectory(prefix="cifar-timed-") as folder:
        report, log_path = os.path.join(folder, "rusage.json"), os.path.join(folder, "log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, report, *cmd],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                start_new_session=True,  # Its own group: a timeout stops the command too.
            )
            stopped = False
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                stopped = True
        with open(log_path) as log:
            output = log.read()[-3000:]
        if stopped or not os.path.exists(report):  # Or the launcher failed to start it.
            return {"seconds": timeout, "returncode": None if stopped else 1, "output": output}
        with open(report) as f:
            return {**json.load(f), "output": output}


def read_results(name: str, workdir: str) -> dict | None:
    """The run's test accuracy and per-epoch validation accuracy (and what else its results
    hold of examples/s and times), or None when it wrote no results."""
    path = os.path.join(workdir, RESULTS)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        results = json.load(f)
    keys = ("train_examples_per_s", "examples_per_s", "load_data_s", "compile_time_s")
    out = {k: results[k] for k in keys if k in results}
    out["accuracy"] = results["test_accuracy"]
    if name == "flaxcnn":
        out["validation_accuracy"] = flaxcnn_validation(workdir)
    else:
        out["validation_accuracy"] = results.get("validation_accuracy", [])
    return out


def flaxcnn_validation(workdir: str) -> list[float]:
    """flaxcnn's validation accuracy after each epoch, from its metrics.jsonl."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r["accuracy"] for r in records if r.get("split") == "validation"]


def run_one(name: str, root: str, seed: int, cache_home: str, args) -> dict | None:
    """One whole command, timed; its results, or None (why printed) when it failed."""
    with tempfile.TemporaryDirectory(prefix=f"cifar-{name}-") as workdir:
        cmd = command(name, root, seed, workdir, args)
        timed = run_timed(cmd, environment(name, cache_home), args.timeout)
        results = read_results(name, workdir)
    if timed["returncode"] is None:
        print(f"{name} seed {seed}: over {args.timeout:.0f} s, stopped", flush=True)
        return None
    if timed["returncode"] or results is None:
        print(f"{name} seed {seed} failed:\n{timed['output']}", flush=True)
        return None
    timed.pop("output")
    return {**timed, **results, "load": os.getloadavg()[0]}


def run(args, root: str) -> list[dict]:
    """Every contender once per seed per repeat, taking turns in an order rotated each
    repeat: rows of (contender, seed, repeat, result or None)."""
    contenders = [c for c in args.contenders if c != "torch" or bench.has_torch()]
    scratch = tempfile.mkdtemp(prefix="flaxcnn-cifar-")
    rows = []
    try:
        for repeat in range(1, args.repeats + 1):
            shift = (repeat - 1) % max(len(contenders), 1)
            for seed in args.seeds:
                for name in contenders[shift:] + contenders[:shift]:
                    result = run_one(name, root, seed, os.path.join(scratch, "cache"), args)
                    rows.append(
                        {"contender": name, "seed": seed, "repeat": repeat, **(result or {})}
                    )
                    rows[-1]["failed"] = result is None
                    if result:
                        print(
                            f"repeat {repeat}: {name:9s} seed {seed}: {result['seconds']:7.1f} s, "
                            f"test accuracy {result['accuracy']:.4f}, "
                            f"{result['peak_memory_mb']:,.0f} MB (load {result['load']:.1f})",
                            flush=True,
                        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def speedup(row: dict, rows: list[dict], target: float = TARGET) -> float | None:
    """flaxcnn's speed-up in `row`: the seconds of the fastest peer run of the same seed and
    repeat whose accuracy reached flaxcnn's (the target, or flaxcnn's own accuracy when that
    is below it), over flaxcnn's seconds; None when no peer reached it."""
    if row["failed"]:
        return None
    bar = min(target, row["accuracy"])
    peers = [
        r["seconds"]
        for r in rows
        if r["contender"] != "flaxcnn"
        and not r["failed"]
        and (r["seed"], r["repeat"]) == (row["seed"], row["repeat"])
        and r["accuracy"] >= bar
    ]
    return min(peers) / row["seconds"] if peers else None


def table(rows: list[dict], target: float = TARGET) -> list[str]:
    """The markdown table: one row per run, and flaxcnn's median speed-up."""
    lines = [
        f"| contender | seed | repeat | whole command s | test accuracy | reached {target:.0%} "
        "| peak RSS MB | CPU s | flaxcnn speed-up vs the fastest peer as accurate |",
        "| --- " * 9 + "|",
    ]
    ratios = []
    for row in rows:
        first = row["contender"] == "flaxcnn" and row["repeat"] == 1
        run = f"{row['repeat']}{' (empty caches)' if first else ''}"
        if row["failed"]:
            lines.append(f"| {row['contender']} | {row['seed']} | {run} | failed |" + " - |" * 5)
            continue
        ratio = "-"
        if row["contender"] == "flaxcnn":
            value = speedup(row, rows, target)
            ratio = "no peer as accurate" if value is None else f"{value:.2f}x"
            ratios += [] if value is None else [value]
        lines.append(
            f"| {row['contender']} | {row['seed']} | {run} | {row['seconds']:.1f} "
            f"| {row['accuracy']:.4f} | {'yes' if row['accuracy'] >= target else 'no'} "
            f"| {row['peak_memory_mb']:,.0f} | {row['cpu_s']:.0f} | {ratio} |"
        )
    if ratios:
        lines += ["", f"flaxcnn's speed-up, median over its runs: {statistics.median(ratios):.2f}x"]
    return lines


def unpack(archive: str = ARCHIVE) -> str:
    """The shared JPEG copy of CIFAR-10 unpacked to a new temporary folder (its root)."""
    root = tempfile.mkdtemp(prefix="cifar10-jpeg-")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", help="ROOT with train/CLASS/* and test/CLASS/* (default: the shared copy)"
    )
    parser.add_argument(
        "--contenders", nargs="+", default=["flaxcnn", "torch", "keras"], choices=CONTENDERS
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (contender, seed)")
    parser.add_argument("--epochs", type=int, default=15, help="passed to every contender")
    parser.add_argument("--batch-size", type=int, default=512, help="passed to every contender")
    parser.add_argument("--max-steps", type=int, default=0, help="stop each after K steps (smoke)")
    parser.add_argument("--target", type=float, default=TARGET, help="the accuracy to reach")
    parser.add_argument(
        "--timeout", type=float, default=7200, help="seconds after which a command is stopped"
    )
    parser.add_argument("--out", default="benchmark", help="folder of cifar.json and cifar.md")
    return parser


def main(argv: list[str] | None = None) -> list[str]:
    args = parser().parse_args(argv)
    root = args.data or unpack()
    try:
        start_load = os.getloadavg()[0]
        rows = run(args, root)
    finally:
        if not args.data:
            shutil.rmtree(root, ignore_errors=True)
    data = args.data or "CIFAR-10 (JPEG q75 copy)"
    report = [
        f"{data}: the cifar10_fast recipe, {args.epochs} epochs of batch {args.batch_size}"
        + (f", at most {args.max_steps} steps" if args.max_steps else "")
        + f"; load average (1 min) {start_load:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end.",
        "",
        *table(rows, args.target),
    ]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cifar.json"), "w") as f:
        json.dump({"args": vars(args), "runs": rows}, f, indent=2)
    with open(os.path.join(args.out, "cifar.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    print("\n".join(report))
    return report


if __name__ == "__main__":
    main()
