"""Every file of a run's workdir, named in one place, and the few ways they are written.

A workdir holds one run: its resolved config, what the model needs to know of its data,
checkpoints, metrics, pictures and results. Every module that reads or writes one of these
files takes its name from here.
"""

import dataclasses
import json
import os
from typing import Any

CONFIG = "config.json"  # The resolved config of the run.
DATASET_INFO = "dataset_info.json"  # Input shape and classes: the run loads without its data.
MODEL_SUMMARY = "model_summary.txt"  # The model's layers, shapes and parameter counts.
CHECKPOINTS = "checkpoints"  # The newest `keep_checkpoints` orbax checkpoints.
BEST_CHECKPOINTS = "checkpoints_best"  # With early stopping: the best validation checkpoint.
EARLY_STOPPING = "early_stopping.json"  # The early-stopping record.
METRICS = "metrics.jsonl"  # One JSON record per log.
# A run stopped by a signal between two logs: its steps' metrics since the last log, which
# the resumed run's next log includes, as an uninterrupted run's does.
PENDING_METRICS = "pending_metrics.json"
CURVES = "curves.png"  # Every metric against step.
PICTURES = "pictures"  # Reconstruction and sample grids.
RESULTS = "results.json"  # Test metrics of a finished run (written last, atomically).
LOCK = "run.lock"  # Held by the live run of this workdir.

CHECKPOINT_SLOTS = {"latest": CHECKPOINTS, "best": BEST_CHECKPOINTS}


def path(workdir: str, name: str) -> str:
    """The path of the workdir file `name` (one of this module's constants)."""
    return os.path.join(workdir, name)


def write_json_atomically(file_path: str, data: Any) -> None:
    """Writes `data` so that `file_path` holds either the old or the complete new content."""
    tmp = f"{file_path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, file_path)


def read_json(file_path: str) -> Any:
    """The JSON content of `file_path`; a file that is truncated or not JSON raises a
    ValueError naming it (never a silent default)."""
    try:
        with open(file_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file_path} is damaged (not JSON: {e}); move it away") from None


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a trained model needs to know of its data: input (H, W, C), the classes and the
    per-channel normalisation of its input (`flaxcnn.data.preprocess`; None: none)."""

    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def write_dataset_info(workdir: str, info: DatasetInfo) -> None:
    """Records `info` in the workdir, so that the run loads without its dataset."""
    write_json_atomically(path(workdir, DATASET_INFO), dataclasses.asdict(info))


def read_dataset_info(workdir: str) -> DatasetInfo | None:
    """The run's recorded `DatasetInfo`, or None when the run recorded none."""
    file_path = path(workdir, DATASET_INFO)
    if not os.path.isfile(file_path):
        return None
    saved = read_json(file_path)
    mean, std = (saved.get(key) for key in ("mean", "std"))  # Absent before normalisation.
    return DatasetInfo(
        tuple(saved["image_shape"]),
        saved["num_classes"],
        saved["class_names"],
        None if mean is None else tuple(mean),
        None if std is None else tuple(std),
    )
