"""Configs: loading a config file with `--config.key=value` overrides, checking every setting
in one place (`validate`). What a config names (model, task, optimizer) is resolved by
`flaxcnn.resolver`, whose paths `load` stores absolute. Optimizers also take any optax
optimizer by name ("lion"). `config.imports` lists modules (import paths or .py files)
imported before the run, e.g. a user's tfds dataset builder.
`validate` imports the models, tasks and optimizers it checks, so none of them imports this
module (tests/product/test_imports.py keeps the import graph acyclic).
"""

import ast
import difflib
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import ml_collections

from flaxcnn.resolver import (  # noqa: F401  (re-exported: the config's names resolve there)
    absolute_spec,
    describe_model,
    import_user_modules,
    is_import_path,
    resolve,
)

# Config dicts whose keys the user defines: an override may add a key under them.
OPEN_DICTS = ("model_kwargs", "optimizer_kwargs")
# Settings that name something to resolve, and so are stored with absolute paths.
SPEC_KEYS = ("model", "task", "optimizer")


class ConfigError(ValueError):
    """A config that cannot be loaded or overridden; the message is one line."""


# --- Loading and overriding -----------------------------------------------------------------


def load_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file `path` (`path:arg` calls `get_config("arg")`)."""
    path, _, arg = path.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    try:
        module = _exec_config_file(path)
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001  (a config file's own code may raise anything)
        raise ConfigError(
            f"cannot load config file {path!r}: {type(e).__name__}: {_first_line(e)}"
        ) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path!r}: get_config() must return a ConfigDict")
    return config


def _exec_config_file(path: str) -> ModuleType:
    """A fresh module of the config file `path` (run again at each load, so edits show)."""
    _exec_config_file.count = getattr(_exec_config_file, "count", 0) + 1
    name = f"flaxcnn_config_{_exec_config_file.count}"
    spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # A config file may define modules (dataclasses need it).
    spec.loader.exec_module(module)
    return module


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _unknown_key(parent: ml_collections.ConfigDict, key: str, dotted: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(parent.keys()), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = f" in --config.{dotted}" if dotted != key else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint}")


def parse_value(text: str, field_type: type | None, dotted: str) -> Any:
    """`text` as a value of `field_type` (None: a Python literal, else the string itself)."""
    if field_type is str:
        return text
    if field_type is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{dotted}: {text!r} is not a bool (true or false)")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if field_type in (None, object):
            return text  # A new or any-type key's bare word: a string (normalize=dataset).
        raise ConfigError(
            f"--config.{dotted}: cannot parse {text!r} as {field_type.__name__}"
        ) from None
    if field_type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if field_type is tuple and isinstance(value, list):
        return tuple(value)
    if field_type is not None and value is not None and not isinstance(value, field_type):
        raise ConfigError(f"--config.{dotted}: {text!r} is not a {field_type.__name__}")
    return value


def _field_type(parent: ml_collections.ConfigDict, key: str) -> type | None:
    if key not in parent:
        return None
    field_type = parent.get_type(key)
    # None or object: any value (a Python literal, else the string itself).
    return None if field_type in (type(None), object) else field_type


def override(config: ml_collections.ConfigDict, dotted: str, value: Any, parse: bool) -> None:
    """Sets `config.<dotted>` to `value` (a string to parse when `parse`). A key may be new
    only under the user-defined dicts (`OPEN_DICTS`); others raise ConfigError with the
    closest existing key."""
    *parents, key = dotted.split(".")
    node, opened = config, False
    for i, part in enumerate(parents):
        if part not in node:
            if not opened:
                raise _unknown_key(node, part, dotted)
            with node.unlocked():
                node[part] = ml_collections.ConfigDict()
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{'.'.join(parents[: i + 1])} is not a dict of settings")
        opened = opened or (i == 0 and part in OPEN_DICTS)
    if key not in node and not opened:
        raise _unknown_key(node, key, dotted)
    if parse:
        value = parse_value(value, _field_type(node, key), dotted)
    try:
        if key in node:
            node[key] = value
        else:
            with node.unlocked():
                node[key] = value
    except TypeError as e:
        shown = f"{value!r}" if not isinstance(value, str) else f"'{value}'"
        raise ConfigError(f"--config.{dotted}: {shown} does not fit: {_first_line(e)}") from None


def load(
    config_file: str | None = None, overrides: Sequence[tuple[str, Any]] = (), parse: bool = True
) -> ml_collections.ConfigDict:
    """The config of `config_file` (default: flaxcnn/default_config.py) with `overrides`
    ((dotted key, value) pairs, values parsed from strings when `parse`) applied in order,
    then its import paths made absolute and missing default keys added. Raises ConfigError."""
    if config_file is None:
        from flaxcnn import default_config

        config = default_config.get_config()
    else:
        config = load_file(config_file)
    add_defaults(config)
    config.lock()
    for dotted, value in overrides:
        override(config, dotted, value, parse)
    normalize(config)
    return config


def add_defaults(config: ml_collections.ConfigDict) -> None:
    """Adds the default config's keys that `config` lacks (config files older than a key)."""
    from flaxcnn import default_config

    with config.unlocked():
        for key, value in default_config.get_config().items():
            if key not in config:
                config[key] = value


def normalize(config: ml_collections.ConfigDict) -> None:
    """Makes the file paths of `config`'s import paths absolute, in place."""
    with config.unlocked():
        for key in SPEC_KEYS:
            if isinstance(config.get(key), str):
                config[key] = absolute_spec(config[key])
        if config.get("imports"):
            config.imports = tuple(absolute_spec(x) for x in config.imports)


def set_model(config: ml_collections.ConfigDict, model: Any, save_dir: str | None = None) -> None:
    """Points `config.model` at `model`: an import path, or a Flax module instance or class
    (recorded by import path and fields, see `describe_model`; a class defined in `__main__`
    is saved by value in `save_dir`)."""
    if isinstance(model, str):
        config.model = absolute_spec(model)
        return
    spec, kwargs = describe_model(model, save_dir)
    config.model = spec
    with config.unlocked():
        config.model_kwargs = ml_collections.ConfigDict({**config.model_kwargs, **kwargs})


# --- Validation ---------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first setting that cannot work: unknown task, model,
    optimizer, schedule or dtype, an optimizer argument it does not take, a number out of
    range. Imports `config.imports` first. Needs no data; run it before anything is traced
    so that the message stays one line."""
    from flaxcnn import models, tasks
    from flaxcnn.data import preprocess, streaming
    from flaxcnn.training.state import validate_optimization

    import_user_modules(config)
    task = tasks.get_task(config.task)
    if callable(getattr(task, "validate", None)):
        task.validate(config)  # Training settings the task cannot honour.
    models.model_arguments(config.model, dict(config.model_kwargs))
    if config.task in tasks.TASKS:  # A user's task may call its model as it likes.
        models.check_call(config.model)
    validate_optimization(config)
    preprocess.validate(config)  # config.normalize, and the tasks that take none.
    streaming.validate(config)  # config.input and its settings.
    views = config.test_time_augment
    if views.shift < 0:  # The ConfigDict keeps it an int.
        raise ValueError(f"config.test_time_augment.shift must be >= 0, got {views.shift}")
    if (views.flip or views.shift) and config.task != "classification":
        raise ValueError(
            f"config.test_time_augment applies to classification, not the {config.task} task"
        )
    for key in ("train_split", "test_split"):
        if not config[key]:
            raise ValueError(f"config.{key} must name a split, got {config[key]!r}")
    if not config.validation_split and config.early_stopping.patience:
        raise ValueError(
            "config.early_stopping needs a validation split: set config.validation_split"
        )
    if config.label_smoothing and config.task != "classification":
        raise ValueError(
            f"config.label_smoothing applies to classification, not the {config.task} task"
        )
    for key in ("learning_rate", "batch_size", "eval_batch_size"):
        if not (config[key] > 0 or (key == "eval_batch_size" and config[key] == -1)):
            raise ValueError(f"config.{key} must be positive, got {config[key]}")
    if not (config.steps_per_dispatch > 0 or config.steps_per_dispatch == -1):
        raise ValueError(
            f"config.steps_per_dispatch must be positive or -1, got {config.steps_per_dispatch}"
        )
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ValueError(f"config.num_epochs must be positive, got {config.num_epochs}")
    # A batch size the devices cannot split runs whole on each (device_data.index_sharding);
    # the command line refuses one the user set there (check_divisible).


DEFAULT_EVAL_BATCH_SIZE = 100  # Keeps a batch's activations in CPU caches (see default_config).


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
    """`config.eval_batch_size`, with -1 (the default) meaning 100 on any number of devices:
    where the devices cannot split it, every device evaluates the whole batch
    (`device_data.index_sharding`). The batches, and so the random draws of a task's
    evaluation (a VAE's posterior samples, a GAN's latents), are the same on 1 device or 8."""
    if config.eval_batch_size != -1:
        return config.eval_batch_size
    return DEFAULT_EVAL_BATCH_SIZE


def check_divisible(key: str, value: int, device_count: int) -> None:
    """Raises ValueError, naming the nearest values that work, when `value` (a batch size
    the user set; -1 is derived) cannot be split evenly over the devices."""
    if value == -1 or value % device_count == 0:
        return
    below = value // device_count * device_count
    options = [str(x) for x in (below, below + device_count) if x > 0]
    raise ValueError(
        f"config.{key}={value} is not divisible by the {device_count} devices: use a "
        f"multiple of {device_count}, e.g. {' or '.join(options)}"
    )


def check_dataset_name(config: ml_collections.ConfigDict) -> None:
    """Raises DataError for a tfds dataset name that no builder has (folders and the
    embedded dataset pass)."""
    import tensorflow_datasets as tfds

    from flaxcnn.data import image_folder, input_pipeline

    if image_folder.is_folder_dataset(config.dataset) or config.dataset == input_pipeline.EMBEDDED:
        return
    name = config.dataset.split("/")[0].split(":")[0]
    try:
        tfds.builder_cls(name)
    except tfds.core.registered.DatasetNotFoundError as e:
        first = str(e).splitlines()[0]
        raise input_pipeline.DataError(f"unknown tfds dataset {name!r}: {first}") from None
