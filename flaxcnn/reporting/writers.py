"""Where a run's numbers go: `metrics.jsonl`, TensorBoard events, `curves.png`, and the
console (a progress bar on a terminal, plain log lines elsewhere). Each output is a `Writer`
(clu's MetricWriter shape: write_scalars, write_images, write_hparams, flush, close):
`JsonlWriter`, `TensorBoardWriter` and `Progress`, which the loop writes through one
`MetricWriter`.

TensorBoard events are written without TensorFlow (whose import alone costs about 3 s, half
of a short run): the same `Event` protos `tf.summary` writes (TF2 tensor summaries with the
scalars, images and text plugins' metadata), framed as TFRecords by `_EventFile`. Curves are
drawn with PIL, not matplotlib (about 1 s of import and layout per run)."""

import io
import json
import math
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping
from typing import Any, Protocol

from absl import logging

from flaxcnn import run_files


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C (Castagnoli), rotated and offset as TFRecord masks it."""
    crc, table = 0xFFFFFFFF, _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class _EventFile:
    """An `events.out.tfevents.*` file: TFRecords of serialized `Event` protos."""

    def __init__(self, logdir: str):
        from tensorboard.compat.proto import event_pb2

        self._event_pb2 = event_pb2
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        self.path = os.path.join(logdir, f"{name}.{os.getpid()}.{id(self)}.v2")
        os.makedirs(logdir, exist_ok=True)
        self._file = open(self.path, "wb")  # noqa: SIM115  (open for the run)
        self.add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)))
        self._file.write(data + struct.pack("<I", masked_crc32c(data)))

    def add_summary(self, step: int, tag: str, plugin: str, tensor) -> None:
        """One TF2-style summary value: `tensor` (a TensorProto) under `plugin`'s metadata."""
        from tensorboard.compat.proto import summary_pb2

        data_class = {
            "scalars": summary_pb2.DATA_CLASS_SCALAR,
            "images": summary_pb2.DATA_CLASS_BLOB_SEQUENCE,
        }.get(plugin, summary_pb2.DATA_CLASS_TENSOR)
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin),
            data_class=data_class,
        )
        value = summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata)
        summary = summary_pb2.Summary(value=[value])
        self.add(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _float_tensor(value: float):
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2

    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        tensor_content=struct.pack("<f", value),
    )


def _string_tensor(values: list[bytes], shape: tuple[int, ...] = ()):
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2

    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape]
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims),
        string_val=values,
    )


def encode_png(image) -> bytes:
    """An (H, W, C) uint8 image (C in 1, 3, 4) as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


class Writer(Protocol):
    """One output of a run's metrics, in the shape of clu.metric_writers.MetricWriter:
    scalars are named "split/metric" (e.g. "train/loss"), images by their tag."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def write_images(self, step: int, images: Mapping[str, Any]) -> None: ...

    def write_hparams(self, hparams: str) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _by_split(scalars: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """{"train/loss": v, ...} -> {"train": {"loss": v, ...}}, in the order given."""
    splits: dict[str, dict[str, float]] = {}
    for key, value in scalars.items():
        split, name = key.split("/", 1)
        splits.setdefault(split, {})[name] = value
    return splits


class JsonlWriter:
    """Appends a `{"step", "split", "time" (Unix seconds), metrics...}` record per split to
    `metrics.jsonl`."""

    def __init__(self, workdir: str):
        self.path = run_files.path(workdir, run_files.METRICS)

    def truncate_after(self, step: int) -> None:
        """Drops records past `step`: those of a run interrupted after its last checkpoint."""
        if not os.path.exists(self.path):
            return
        records = read_metrics(self.path, torn_tail_ok=True)
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records if r["step"] <= step)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        with open(self.path, "a") as f:
            for split, metrics in _by_split(scalars).items():
                record = {"step": step, "split": split, "time": time.time(), **metrics}
                f.write(json.dumps(record) + "\n")

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        pass  # Pictures are PNG files of their own (workdir/pictures/).

    def write_hparams(self, hparams: str) -> None:
        pass  # config.json holds them.

    def flush(self) -> None:
        pass  # Each write closes the file.

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """Scalars, images and the config as TensorBoard events under the workdir."""

    def __init__(self, workdir: str):
        self.events = _EventFile(workdir)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.events.add_summary(step, tag, "scalars", _float_tensor(value))
        self.events.flush()

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """(H, W, C) uint8 images, as tf.summary.image writes them: [w, h, png]."""
        for tag, image in images.items():
            height, width = image.shape[:2]
            tensor = _string_tensor(
                [str(width).encode(), str(height).encode(), encode_png(image)], (3,)
            )
            self.events.add_summary(step, tag, "images", tensor)
        self.events.flush()

    def write_hparams(self, hparams: str) -> None:
        text = f"```\n{hparams}\n```".encode()
        self.events.add_summary(0, "config", "text", _string_tensor([text]))
        self.events.flush()

    def flush(self) -> None:
        self.events.flush()

    def close(self) -> None:
        self.events.close()


class MetricWriter:
    """A run's writers behind one `Writer`: JSONL and TensorBoard (where `enabled`: the main
    process) and those `add`ed (the progress display), each written in turn. `write` and
    `write_image` are the loop's and the tasks' short forms of `write_scalars` and
    `write_images`."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.jsonl = JsonlWriter(workdir) if enabled else None
        self.writers: list[Writer] = [self.jsonl, TensorBoardWriter(workdir)] if enabled else []

    def add(self, writer: Writer) -> None:
        """One more output, written after the others."""
        self.writers.append(writer)

    def truncate_after(self, step: int) -> None:
        if self.jsonl is not None:
            self.jsonl.truncate_after(step)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for writer in self.writers:
            writer.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        for writer in self.writers:
            writer.write_images(step, images)

    def write_hparams(self, hparams: str) -> None:
        for writer in self.writers:
            writer.write_hparams(hparams)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        self.write_scalars(step, {f"{split}/{name}": value for name, value in metrics.items()})

    def write_image(self, step: int, name: str, image) -> None:
        self.write_images(step, {name: image})


def read_metrics(path: str, torn_tail_ok: bool = False) -> list[dict]:
    """The records of `path`. A line that is not a JSON record raises a ValueError naming the
    file and line, except, with `torn_tail_ok`, a last line cut short (a run killed while
    appending it), which is dropped with a warning."""
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a step")
        except ValueError as e:
            if torn_tail_ok and not any(rest.strip() for rest in lines[number:]):
                logging.warning("Dropped the torn last line of %s: %s", path, line[:80])
                break
            raise ValueError(f"{path} is damaged (line {number}: {e}); move it away") from None
        records.append(record)
    return records


PANEL = (500, 400)  # Pixels of one metric's panel.
PLOT_BOX = (70, 40, 480, 350)  # Its axes: left, top, right, bottom.
SPLIT_COLORS = {"train": (31, 119, 180), "validation": (255, 127, 14)}


def plot_curves(metrics_path: str, out_path: str) -> None:
    """Every metric of every split against step, one panel each (train a line, validation
    a line with dots), as a PNG."""
    from PIL import Image, ImageDraw

    records = read_metrics(metrics_path)
    ignored = ("step", "split", "time")
    names = list(dict.fromkeys(k for r in records for k in r if k not in ignored))
    image = Image.new("RGB", (PANEL[0] * max(len(names), 1), PANEL[1]), "white")
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(names):
        series = {
            split: [(r["step"], r[name]) for r in records if r["split"] == split and name in r]
            for split in SPLIT_COLORS
        }
        _draw_panel(draw, i * PANEL[0], name, {k: v for k, v in series.items() if v})
    image.save(out_path)


def _draw_panel(draw, x0: int, title: str, series: dict[str, list[tuple[float, float]]]) -> None:
    """One panel: axes with their ranges, a line per split, a legend."""
    from PIL import ImageFont

    font = ImageFont.load_default(size=14)
    left, top, right, bottom = x0 + PLOT_BOX[0], PLOT_BOX[1], x0 + PLOT_BOX[2], PLOT_BOX[3]
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text(((left + right) / 2, 20), title, fill="black", font=font, anchor="mm")
    draw.text(((left + right) / 2, bottom + 4), "step", fill="black", font=font, anchor="mt")
    points = [p for values in series.values() for p in values]
    finite = [(x, y) for x, y in points if math.isfinite(y)]
    if not finite:
        return
    xs, ys = [x for x, _ in finite], [y for _, y in finite]
    x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
    x_span, y_span = (x_hi - x_lo) or 1, (y_hi - y_lo) or 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x_lo) / x_span * (right - left),
            bottom - (y - y_lo) / y_span * (bottom - top),
        )

    for y, anchor in ((y_lo, "rs"), (y_hi, "rt")):
        draw.text((left - 4, at(x_lo, y)[1]), f"{y:.4g}", fill="black", font=font, anchor=anchor)
    for x, anchor in ((x_lo, "lt"), (x_hi, "rt")):
        draw.text((at(x, y_lo)[0], bottom + 4), f"{x:g}", fill="black", font=font, anchor=anchor)
    for split, values in series.items():
        color = SPLIT_COLORS[split]
        xy = [at(x, y) for x, y in values if math.isfinite(y)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        if split == "validation" or len(xy) == 1:
            for px, py in xy:
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
    for row, split in enumerate(series):  # The legend, below the axes where no curve is.
        x, y = right - 190 + 100 * row, bottom + 36
        draw.line((x, y, x + 20, y), fill=SPLIT_COLORS[split], width=2)
        draw.text((x + 24, y), split, fill="black", font=font, anchor="lm")


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

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """The training metrics ("train/..."), shown; the other splits are logged apart."""
        train = _by_split(scalars).get("train")
        if train:
            self.update(step, train)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        pass

    def write_hparams(self, hparams: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
