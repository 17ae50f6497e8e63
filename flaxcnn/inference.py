"""A trained classifier outside the training loop: `load_run(workdir)` rebuilds the state the
loop checkpointed (same config, same `create_state`) and restores the latest or best
checkpoint into it; `Run.predict` and `Run.predict_proba` run the model on images,
`Run.evaluate` on a split. `prepare_image` reads a file or PIL image as the model's input
the way evaluation does (the run's `config.input_crop`), for this model or its export.

The model's input shape, class count and class names come from `workdir/dataset_info.json`
when the loop wrote one (`flaxcnn.run_files.write_dataset_info`), else from the run's dataset
(its tfds info, or the class folders of an image folder), which must then be reachable.
"""

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from flaxcnn import config as config_lib
from flaxcnn import resolver, run_files
from flaxcnn.data import batching, crops, image_folder, input_pipeline, preprocess
from flaxcnn.reporting import reports
from flaxcnn.run_files import DatasetInfo
from flaxcnn.runner import evaluation
from flaxcnn.training.checkpointing import Checkpointer

PREDICT_BATCH_SIZE = 256


def dataset_info(
    name: str, data_dir: str | None = None, image_size=None, color_mode: str | None = None
) -> DatasetInfo:
    """The image shape and classes of dataset `name` (tfds or `folder:`), after the resizing
    and colour conversion `image_size` and `color_mode` ask for, without reading its images."""
    if image_folder.is_folder_dataset(name):
        try:
            shape, names = image_folder.folder_info(name, image_size, color_mode)
        except image_folder.FolderError as e:
            raise input_pipeline.DataError(str(e)) from None
        return DatasetInfo(tuple(shape), len(names), names)
    builder = input_pipeline.get_builder(name, data_dir)
    image_key, label_key = builder.info.supervised_keys
    height, width, num_channels = builder.info.features[image_key].shape
    if image_size is not None:
        height, width = image_folder.check_image_size(image_size)
    if color_mode is not None:
        num_channels = image_folder.channels(color_mode)
    if None in (height, width, num_channels):
        raise input_pipeline.DataError(f"{name!r} has images of varying size")
    labels = builder.info.features[label_key]
    return DatasetInfo((height, width, num_channels), labels.num_classes, list(labels.names))


def prepare_image(
    image: str | os.PathLike | Image.Image,
    image_shape: tuple[int, int, int],
    input_crop: str = "resize",
) -> np.ndarray:
    """A file path or PIL image as the model's uint8 input (H, W, C) of `image_shape`, read
    as evaluation reads it under the run's `config.input_crop` (export.json's "input_crop"):
    "resize" the whole image, "random_resized" its centre crop (`crops.evaluation_view`).
    ValueError naming the file when it is not a readable image."""
    if not isinstance(image, Image.Image):
        image = image_folder.open_image(image)
    return crops.evaluation_view(input_crop)(image, tuple(image_shape))


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the config had (Flax modules must stay hashable)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config of the run in `workdir`, with defaults for keys added since."""
    path = os.path.join(workdir, run_files.CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{workdir} holds no training run: {run_files.CONFIG} is missing")
    try:
        with open(path) as f:
            loaded = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    from flaxcnn import config as config_lib

    config = ml_collections.ConfigDict(_tuples(loaded))
    config_lib.add_defaults(config)
    config_lib.import_user_modules(config)  # E.g. the run's own tfds builder.
    return config


def checkpoint_dir(workdir: str, which: str) -> tuple[str, str]:
    """(directory, which) of the checkpoints to restore: `best` falls back to `latest` when
    the run has no best checkpoint."""
    if which not in run_files.CHECKPOINT_SLOTS:
        raise ValueError(
            f"which must be one of {', '.join(run_files.CHECKPOINT_SLOTS)}, not {which!r}"
        )
    if which == "best":
        best = os.path.join(workdir, run_files.BEST_CHECKPOINTS)
        if _has_checkpoint(best):
            return best, "best"
        logging.info("No best checkpoint in %s; using the latest.", workdir)
    return os.path.join(workdir, run_files.CHECKPOINTS), "latest"


def _has_checkpoint(directory: str) -> bool:
    return os.path.isdir(directory) and any(
        entry.isdigit() and os.path.isdir(os.path.join(directory, entry))
        for entry in os.listdir(directory)
    )


def _restore(workdir: str, which: str, abstract_state: Any, keep: int) -> Any:
    """The newest usable checkpoint of the `which` slot, restored as the loop restores it,
    into a state laid out like `abstract_state` (shapes and dtypes) on the default device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state
    )
    checkpointer = Checkpointer(workdir, keep, run_files.CHECKPOINT_SLOTS[which])
    try:
        return checkpointer.restore_or(abstract)
    finally:
        checkpointer.close()


def eval_variables(state: Any) -> dict:
    """The variables evaluation uses: the moving average of the parameters when the state
    keeps one, else the parameters (and batch statistics)."""
    if hasattr(state, "eval_variables"):
        return state.eval_variables()
    return state.variables()


def checked_model_input(images, mean=None, std=None) -> np.ndarray:
    """uint8 images (0..255) or float images in [0, 1] -> float32 in [0, 1], standardised by
    the per-channel `mean` and `std` when given: exactly what the model is trained on
    (`preprocess.to_model_input`), after checking the images' type and range."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return preprocess.to_model_input(images, mean, std)
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 (0..255) or float in [0, 1], not {images.dtype}")
    if images.size and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"float images must be in [0, 1] (got {images.min():.3g}..{images.max():.3g}); "
            "pass uint8 for 0..255"
        )
    return preprocess.to_model_input(images, mean, std)


@dataclasses.dataclass(frozen=True)
class Predictions:
    """`Run.predict`'s answer for N images: the predicted class of each (`labels`, indices
    into `class_names`), its name (`names`) and every class's probability
    (`probabilities`, (N, num_classes))."""

    labels: np.ndarray
    names: list[str]
    probabilities: np.ndarray


@dataclasses.dataclass(repr=False)
class Run:
    """A trained classifier restored from a workdir (`load_run`): `predict` images (files,
    PIL images or arrays), `evaluate` a split, read its `summary()`."""

    workdir: str
    config: ml_collections.ConfigDict
    state: Any  # The restored training state, as the loop checkpointed it.
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str]
    step: int
    which: str  # The checkpoint restored: "latest" or "best".
    # The per-channel normalisation of the model's input (None: inputs in [0, 1]).
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        if not hasattr(self.state, "apply_fn"):  # A GAN's state: nothing to classify with.
            return
        apply_fn = self.state.apply_fn
        self._probabilities = jax.jit(
            lambda variables, x: jax.nn.softmax(apply_fn(variables, x, train=False), axis=-1)
        )

    @property
    def apply_fn(self):
        """The model's `apply(variables, images, train=False)`: logits."""
        return self.state.apply_fn

    @property
    def normalization(self) -> preprocess.Normalization | None:
        """The per-channel normalisation of the model's input (None: inputs in [0, 1])."""
        return None if self.mean is None else preprocess.Normalization(self.mean, self.std)

    @property
    def variables(self) -> dict:
        return eval_variables(self.state)

    @property
    def input_crop(self) -> str:
        """The run's `config.input_crop`: how its evaluation, `predict` and export read
        files and PIL images (`prepare_image`)."""
        return self.config.get("input_crop", "resize")

    def __repr__(self) -> str:
        model = self.config.model.rpartition(":")[2] or self.config.model
        return (
            f"Run({self.workdir!r}: {model} on {self.config.dataset}, {self.which} checkpoint "
            f"at step {self.step}, input {tuple(self.image_shape)}, {self.num_classes} classes)"
        )

    def summary(self) -> str:
        """What the run is and what it scored: model, dataset, checkpoint, the model summary's
        layers and parameter counts, and the test results when the run finished."""
        lines = [repr(self), f"classes: {', '.join(self.class_names)}"]
        results = run_files.path(self.workdir, run_files.RESULTS)
        if os.path.isfile(results):
            scores = run_files.read_json(results)
            keys = [k for k in scores if k.startswith("test_") and isinstance(scores[k], float)]
            lines.append("results: " + ", ".join(f"{k} {scores[k]:.4f}" for k in keys))
        summary = run_files.path(self.workdir, run_files.MODEL_SUMMARY)
        if os.path.isfile(summary):
            with open(summary) as f:
                lines.append(f.read().rstrip())
        return "\n".join(lines)

    def predict(self, images: Any) -> Predictions:
        """The classes of `images`: image file paths (one or a list), PIL images (one or a
        list), or an array (N, H, W, C) / one image (H, W, C), uint8 or float in [0, 1]. Files
        and PIL images are read as evaluation reads them (`prepare_image`: colour mode, size,
        the centre crop of a run with `input_crop="random_resized"`); arrays must already
        have the model's shape."""
        probabilities = self.predict_proba(self._as_array(images))
        labels = probabilities.argmax(-1)
        return Predictions(labels, [self.class_names[i] for i in labels], probabilities)

    def _as_array(self, images: Any) -> np.ndarray:
        """`predict`'s images as one (N, H, W, C) array."""
        files_or_pil = (str, os.PathLike, Image.Image)
        if isinstance(images, files_or_pil):
            images = [images]
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], files_or_pil):
            return np.stack([self._read(image) for image in images])
        array = np.asarray(images)
        return array[None] if array.shape == tuple(self.image_shape) else array

    def _read(self, image: Any) -> np.ndarray:
        """A file or PIL image, read as evaluation reads it."""
        return prepare_image(image, self.image_shape, self.input_crop)

    def evaluate(
        self,
        split: str = "test",
        dataset: str | None = None,
        data_dir: str | None = None,
        batch_size: int | None = None,
    ) -> dict:
        """Loss, accuracy, example count, per-class accuracy and confusion matrix over every
        example of `split` (tfds slicing syntax) of the run's dataset (or `dataset` /
        `data_dir`), evaluated as the training loop evaluates: streamed when the run's
        `config.input` streams it (`evaluation.read_split`), each image read as `predict`
        reads files."""
        config = self.config
        dataset = dataset or config.dataset
        data = evaluation.read_split(config, dataset, split, data_dir or config.data_dir)
        if tuple(data.image_shape) != tuple(self.image_shape):
            raise ValueError(
                f"split {split!r} of {dataset!r} has images of shape {data.image_shape}; "
                f"the model takes {self.image_shape}"
            )
        if data.num_classes != self.num_classes:
            raise ValueError(
                f"{dataset!r} has {data.num_classes} classes; the model has {self.num_classes}"
            )
        batch_size = batch_size or config_lib.eval_batch_size(config)
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if isinstance(data, input_pipeline.Split):
            metrics = evaluation.evaluate_state(self.state, data, batch_size, self.normalization)
        else:
            metrics = evaluation.evaluate_stream(
                self.state, data, batch_size, config, self.normalization
            )
        report = reports.report_from_confusion(metrics["confusion"], self.class_names)
        return {
            "dataset": dataset,
            "split": split,
            "which": self.which,
            "step": self.step,
            "loss": metrics["loss"],
            "accuracy": metrics["accuracy"],
            "count": metrics["count"],
            **{k: report[k] for k in ("class_names", "per_class_accuracy", "confusion_matrix")},
        }

    def predict_proba(self, images, batch_size: int = PREDICT_BATCH_SIZE) -> np.ndarray:
        """Class probabilities (N, num_classes) of images (N, H, W, C), uint8 or float in
        [0, 1] ((N, H, W) for one channel), in padded batches of at most `batch_size`
        (`batching.map_padded`), so few shapes are ever compiled."""
        images = checked_model_input(images, self.mean, self.std)
        if images.ndim == 3 and self.image_shape[2] == 1:
            images = images[..., None]
        if images.shape[1:] != tuple(self.image_shape):
            raise ValueError(
                f"images of shape {images.shape[1:]} given; the model takes "
                f"{tuple(self.image_shape)} (H, W, C)"
            )
        if len(images) == 0:
            return np.zeros((0, self.num_classes), np.float32)
        variables = self.variables
        return batching.map_padded(
            lambda batch: self._probabilities(variables, batch), images, batch_size
        )


def load_run(
    workdir: str,
    which: str = "latest",
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    task_names: tuple[str, ...] = ("classification",),
    model: Any = None,
) -> Run:
    """The classifier trained in `workdir`, restored from its latest checkpoint or its best
    (`which="best"`, falling back to the latest when there is none). Without
    `workdir/dataset_info.json`, the input shape and classes come from the run's dataset, or
    from `dataset` / `data_dir` when given (a dataset moved since training). `task_names`:
    the tasks whose runs may be loaded (a generative run's state has no `predict_proba`).
    `model`: the class (or an instance of it) of a run whose class was saved with it, for a
    program where the saved class cannot be unpickled (another Python version)."""
    from flaxcnn import tasks

    config = load_config(workdir)
    if model is not None:
        resolver.provide_saved_class(config.model, model)
    task = config.get("task", "classification")
    if task not in task_names:
        raise ValueError(
            f"{workdir} holds a {task!r} run; only {', '.join(task_names)} runs load here"
        )
    directory, which = checkpoint_dir(workdir, which)
    if not _has_checkpoint(directory):
        raise ValueError(f"{workdir} has no checkpoint in {directory}")
    info = run_files.read_dataset_info(workdir)
    if info is None:
        info = dataset_info(
            dataset or config.dataset,
            data_dir or config.data_dir,
            config.get("image_size"),
            config.get("color_mode"),
        )
    # The schedule's length does not change the state's structure; any valid one will do.
    steps = max(
        config.num_train_steps,
        max(int(s) for s in os.listdir(directory) if s.isdigit()),
        config.get("warmup_steps", 0) + 1,
        1,
    )
    # Only the state's structure is needed: traced, not run (an eager init compiles op by op).
    abstract_state = jax.eval_shape(
        lambda rng: tasks.get_task(task).create_state(
            config, rng, info.image_shape, info.num_classes, steps
        ),
        jax.random.key(config.seed),
    )
    state = _restore(workdir, which, abstract_state, config.keep_checkpoints)
    normalization = run_normalization(info, config)
    return Run(
        workdir=workdir,
        config=config,
        state=state,
        image_shape=tuple(info.image_shape),
        num_classes=info.num_classes,
        class_names=list(info.class_names),
        step=int(state.step),
        which=which,
        mean=None if normalization is None else normalization.mean,
        std=None if normalization is None else normalization.std,
    )


def run_normalization(
    info: DatasetInfo, config: ml_collections.ConfigDict
) -> preprocess.Normalization | None:
    """The normalisation the run trained with: recorded in its dataset info, else in its
    config (a run whose dataset info does not hold it)."""
    if info.mean is not None:
        return preprocess.Normalization(tuple(info.mean), tuple(info.std))
    return preprocess.from_config(config)


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities) of the k most probable classes of each row, most probable
    first (ties: lower index first)."""
    k = min(k, probabilities.shape[-1])
    order = np.argsort(-probabilities, axis=-1, kind="stable")[..., :k]
    return order, np.take_along_axis(probabilities, order, axis=-1)
