"""The scorer of a dataset's generative models, in one place: where it is kept, its recipe,
training it and loading it.

The scorer is an ordinary classification run (`scorer_config`) kept in
`scorer_dir/<dataset>` (default ~/.cache/flaxcnn/scorers). The train command and
`flaxcnn.fit` call `prepare_scorer` before a run whose task has a generator and whose
`config.score_samples` > 0: the scorer is trained then, before the run, never from inside it,
and the loaded scorer is handed to the runner, which scores the samples at the end
(flaxcnn.reporting.generative_metrics computes the scores).
"""

import logging
import os
import re

import jax
import ml_collections

from flaxcnn import default_config, inference, run_files, tasks
from flaxcnn.reporting.generative_metrics import Scorer
from flaxcnn.runner import loop

DEFAULT_SCORER_DIR = "~/.cache/flaxcnn/scorers"


def scorer_workdir(
    scorer_dir: str, dataset: str, image_size=None, color_mode: str | None = None
) -> str:
    """The workdir of `dataset`'s scorer under `scorer_dir`: one per dataset and image
    settings (a scorer reads images as the generator's data were read)."""
    name = dataset
    if image_size is not None:
        name += "_{}x{}".format(*image_size)
    if color_mode is not None:
        name += f"_{color_mode}"
    return os.path.join(os.path.expanduser(scorer_dir), re.sub(r"[^\w.-]+", "_", name))


def has_scorer(workdir: str) -> bool:
    """Whether `workdir` holds a finished scorer run (its results are written last)."""
    return os.path.isfile(run_files.path(workdir, run_files.RESULTS))


def scorer_config(
    dataset: str, data_dir: str | None, image_size=None, color_mode: str | None = None
) -> ml_collections.ConfigDict:
    """The scorer's recipe: a small `CNN` (widths 16, 32, 64: 576 penultimate features on
    28x28 images, few enough for fast covariance square roots), 3 epochs of Adam 1e-3 on a cosine
    schedule, batch 128, on the whole train split (99% on MNIST's test set)."""
    config = default_config.get_config()
    config.task = "classification"
    config.dataset = dataset
    config.data_dir = data_dir
    config.image_size = image_size
    config.color_mode = color_mode
    config.model = "CNN"
    config.model_kwargs = ml_collections.ConfigDict({"widths": (16, 32, 64), "dropout_rate": 0.3})
    config.train_split = "train[:95%]"
    config.validation_split = "train[95%:]"
    config.batch_size = 128
    config.num_epochs = 3
    config.lr_schedule = "cosine"
    config.keep_checkpoints = 1
    config.checkpoint_every_epochs = config.num_epochs
    return config


def load_scorer(workdir: str, batch_size: int = 500) -> Scorer:
    """The scorer trained in `workdir`, loaded like any run (`flaxcnn.inference.load_run`),
    with the variables evaluation uses and its test accuracy."""
    if not has_scorer(workdir):
        raise ValueError(f"no finished scorer run in {workdir}")
    run = inference.load_run(workdir)
    accuracy = run_files.read_json(run_files.path(workdir, run_files.RESULTS)).get("test_accuracy")
    return Scorer(run.apply_fn, jax.device_get(run.variables), batch_size, accuracy)


def needs_scorer(config: ml_collections.ConfigDict) -> bool:
    """Whether the run of `config` scores its samples at the end: a task with a generator
    (flaxcnn.tasks.base.GeneratorHook) and `score_samples` > 0."""
    if config.get("score_samples", 0) <= 0:
        return False
    return hasattr(tasks.get_task(config.get("task", "classification")), "generator")


def train_scorer(
    dataset: str,
    data_dir: str | None = None,
    scorer_dir: str = DEFAULT_SCORER_DIR,
    image_size=None,
    color_mode: str | None = None,
    overrides: dict | None = None,
) -> str:
    """Trains the scorer of `dataset` (with `scorer_config` updated by `overrides`) into its
    workdir under `scorer_dir`, unless a finished one is there; returns that workdir."""
    workdir = scorer_workdir(scorer_dir, dataset, image_size, color_mode)
    if has_scorer(workdir):
        return workdir
    config = scorer_config(dataset, data_dir, image_size, color_mode)
    config.update(overrides or {})
    logging.info("Training the scorer of %s into %s.", dataset, workdir)
    loop.train_and_evaluate(config, workdir)
    return workdir


def config_scorer_workdir(config: ml_collections.ConfigDict) -> str:
    """The workdir of the scorer the run of `config` loads."""
    return scorer_workdir(
        config.get("scorer_dir") or DEFAULT_SCORER_DIR,
        config.dataset,
        config.get("image_size"),
        config.get("color_mode"),
    )


def prepare_scorer(config: ml_collections.ConfigDict) -> Scorer | None:
    """The scorer the run of `config` scores its samples with, trained first when missing;
    None when the run scores nothing."""
    if not needs_scorer(config):
        return None
    workdir = config_scorer_workdir(config)
    train_scorer(
        config.dataset,
        config.data_dir,
        config.get("scorer_dir") or DEFAULT_SCORER_DIR,
        config.get("image_size"),
        config.get("color_mode"),
    )
    return load_scorer(workdir)
