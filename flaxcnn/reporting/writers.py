"""Where a run's numbers go: `metrics.jsonl`, TensorBoard events, `curves.png`, and the
console (a progress bar on a terminal, plain log lines elsewhere)."""

import json
import os
import sys
import time

import matplotlib
import tensorflow as tf
from absl import logging

from flaxcnn import run_files

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class MetricWriter:
    """Appends `{"step", "split", "time" (Unix seconds), metrics...}` records to JSONL and
    TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = run_files.path(workdir, run_files.METRICS)
        self.enabled = enabled
        self.tensorboard = tf.summary.create_file_writer(workdir) if enabled else None

    def truncate_after(self, step: int) -> None:
        """Drops records past `step`: those of a run interrupted after its last checkpoint."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        records = read_metrics(self.path)
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records if r["step"] <= step)

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            record = {"step": step, "split": split, "time": time.time(), **metrics}
            f.write(json.dumps(record) + "\n")
        with self.tensorboard.as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar(f"{split}/{name}", value)
        self.tensorboard.flush()

    def write_image(self, step: int, name: str, image) -> None:
        """An (H, W, C) uint8 image, to TensorBoard."""
        if self.enabled:
            with self.tensorboard.as_default(step=step):
                tf.summary.image(name, image[None])
            self.tensorboard.flush()

    def write_hparams(self, config_json: str) -> None:
        if self.enabled:
            with self.tensorboard.as_default(step=0):
                tf.summary.text("config", f"```\n{config_json}\n```")

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(metrics_path: str, out_path: str) -> None:
    """Every metric of every split against step, one panel each."""
    records = read_metrics(metrics_path)
    ignored = ("step", "split", "time")
    names = list(dict.fromkeys(k for r in records for k in r if k not in ignored))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    axes = axes[0]
    for ax, name in zip(axes, names):
        for split in ("train", "validation"):
            points = [(r["step"], r[name]) for r in records if r["split"] == split and name in r]
            if points:
                ax.plot(*zip(*points), marker="." if split == "validation" else None, label=split)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


class Progress:
    """Per-epoch progress: a tqdm bar on a terminal, a log line every `log_every` steps
    elsewhere; both show the first metrics, examples/s and the ETA of the run."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int, log_every: int):
        self.total_steps, self.batch_size, self.log_every = total_steps, batch_size, log_every
        self.start_step, self.start_time = start_step, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self.start_time
        steps_per_s = (step - self.start_step) / max(elapsed, 1e-9)
        eta = (self.total_steps - step) / max(steps_per_s, 1e-9)
        fields = {name: f"{value:.4f}" for name, value in list(metrics.items())[:3]}
        fields["ex/s"] = f"{steps_per_s * self.batch_size:,.0f}"
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(fields, refresh=False)
        else:
            text = " ".join(f"{k}={v}" for k, v in fields.items())
            logging.info("step %d/%d %s eta=%.0fs", step, self.total_steps, text, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
