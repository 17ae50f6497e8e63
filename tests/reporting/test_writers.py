"""The writers behind one interface (clu's MetricWriter shape): the run's MetricWriter writes
JSONL, TensorBoard and any writer added to it, with scalars named "split/metric"."""

import numpy as np

from flaxcnn.reporting.writers import MetricWriter, Progress, read_metrics


class Recorder:
    """A writer of one's own: what it is given, in order."""

    def __init__(self):
        self.calls = []

    def write_scalars(self, step, scalars):
        self.calls.append(("scalars", step, dict(scalars)))

    def write_images(self, step, images):
        self.calls.append(("images", step, sorted(images)))

    def write_hparams(self, hparams):
        self.calls.append(("hparams", hparams))

    def flush(self):
        self.calls.append(("flush",))

    def close(self):
        self.calls.append(("close",))


def test_every_writer_gets_each_write_and_jsonl_keeps_a_record_per_split(tmp_path):
    writer, recorder = MetricWriter(str(tmp_path)), Recorder()
    writer.add(recorder)
    writer.write_hparams("{}")
    writer.write(4, "train", {"loss": 0.5, "accuracy": 0.75})
    writer.write_scalars(8, {"train/loss": 0.25, "validation/loss": 0.3})
    writer.write_image(8, "samples", np.zeros((4, 4, 1), np.uint8))
    writer.close()
    assert recorder.calls == [
        ("hparams", "{}"),
        ("scalars", 4, {"train/loss": 0.5, "train/accuracy": 0.75}),
        ("scalars", 8, {"train/loss": 0.25, "validation/loss": 0.3}),
        ("images", 8, ["samples"]),
        ("close",),
    ]
    records = [
        {k: v for k, v in r.items() if k != "time"}
        for r in read_metrics(str(tmp_path / "metrics.jsonl"))
    ]
    assert records == [
        {"step": 4, "split": "train", "loss": 0.5, "accuracy": 0.75},
        {"step": 8, "split": "train", "loss": 0.25},
        {"step": 8, "split": "validation", "loss": 0.3},
    ]
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_progress_shows_only_the_training_metrics(caplog):
    progress = Progress(total_steps=10, start_step=0, batch_size=2, log_every=5)
    # On absl's logger: an in-process run of the CLI before this test may leave its level at
    # WARNING.
    with caplog.at_level("INFO", logger="absl"):
        progress.write_scalars(5, {"validation/loss": 1.0})
        assert "step 5/10" not in caplog.text
        progress.write_scalars(5, {"train/loss": 1.0})
    assert "step 5/10 loss=1.0000" in caplog.text
