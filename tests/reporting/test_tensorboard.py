"""TensorBoard events of a run, read back with TensorBoard's own reader."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tf_masked_crc32c

from flaxcnn.reporting.writers import MetricWriter, masked_crc32c, read_metrics
from flaxcnn.run_files import METRICS
from flaxcnn.runner import loop


def read_events(logdir: str) -> ea.EventAccumulator:
    """Every event, none sampled away (size_guidance 0 keeps all)."""
    accumulator = ea.EventAccumulator(
        logdir, size_guidance={ea.TENSORS: 0, ea.IMAGES: 0, ea.SCALARS: 0}
    )
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def run_events(data_dir, tmp_path_factory, tiny_config) -> tuple[str, ea.EventAccumulator]:
    workdir = str(tmp_path_factory.mktemp("run"))
    loop.train_and_evaluate(tiny_config(num_train_steps=8), workdir)
    return workdir, read_events(workdir)


def scalars(accumulator: ea.EventAccumulator, tag: str) -> list[tuple[int, float]]:
    """A TF2 scalar summary (stored as a tensor event): [(step, value)]."""
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in accumulator.Tensors(tag)]


def test_scalars_match_metrics_jsonl(run_events):
    workdir, accumulator = run_events
    tags = accumulator.Tags()["tensors"]
    assert {"train/loss", "train/accuracy", "validation/loss", "validation/accuracy"} <= set(tags)
    assert accumulator.SummaryMetadata("train/loss").plugin_data.plugin_name == "scalars"
    records = read_metrics(f"{workdir}/{METRICS}")
    for split, name in (("train", "loss"), ("validation", "accuracy")):
        expected = [(r["step"], r[name]) for r in records if r["split"] == split]
        got = scalars(accumulator, f"{split}/{name}")
        assert [s for s, _ in got] == [s for s, _ in expected] and got
        np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6)
    assert [s for s, _ in scalars(accumulator, "train/loss")] == [4, 8]


def test_config_text_is_the_run_config(run_events):
    workdir, accumulator = run_events
    assert accumulator.SummaryMetadata("config").plugin_data.plugin_name == "text"
    [event] = accumulator.Tensors("config")
    text = tf.make_ndarray(event.tensor_proto).item().decode()
    assert text.startswith("```") and text.endswith("```")
    with open(f"{workdir}/config.json") as f:
        assert json.loads(text.strip("`\n")) == json.load(f)


def test_write_image_round_trips(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    writer = MetricWriter(str(tmp_path))
    writer.write_image(5, "samples", image)
    writer.close()
    accumulator = read_events(str(tmp_path))
    assert accumulator.SummaryMetadata("samples").plugin_data.plugin_name == "images"
    [event] = accumulator.Tensors("samples")
    width, height, png = tf.make_ndarray(event.tensor_proto)  # TF2 images: [w, h, png...].
    assert (event.step, int(width), int(height)) == (5, 10, 12)
    np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), image)


def test_checksum_is_tfrecords_masked_crc32c():
    # CRC-32C's check value of b"123456789" is 0xE3069283; TFRecord masks it.
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert masked_crc32c(b"event") == tf_masked_crc32c(b"event")


def test_writing_events_and_curves_imports_no_tensorflow(tmp_path):
    # TensorFlow's import alone took half of a short run's wall time.
    code = (
        "import sys\n"
        "from flaxcnn.reporting.writers import MetricWriter, plot_curves\n"
        f"w = MetricWriter({str(tmp_path)!r})\n"
        "w.write(1, 'train', {'loss': 0.5}); w.write_hparams('{}'); w.close()\n"
        f"plot_curves({str(tmp_path / METRICS)!r}, {str(tmp_path / 'c.png')!r})\n"
        "assert not [m for m in sys.modules if m.startswith(('tensorflow', 'matplotlib'))]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
    assert [s for s, _ in scalars(read_events(str(tmp_path)), "train/loss")] == [1]
