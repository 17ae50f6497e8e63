"""Configs: loading a config file with `--config.key=value` overrides, checking every setting
in one place (`validate`), and the one resolver of what a config names (`resolve`).

A model, task or optimizer is named by one of:

    a built-in name          "SeedCNN", "classification", "adam"
    package.module:Name      "mypkg.nets:ResNetTiny" (a task may name a module: "mypkg.task")
    path/to/file.py:Name     "my_nets.py:LeNet5" (a task may name a file: "my_task.py")

Paths are stored absolute (`absolute_spec`), so `config.json` names the same object from any
directory and every later command (evaluate, predict, export, resume) rebuilds it. Optimizers
also take any optax optimizer by name ("lion"). `config.imports` lists modules (import paths
or .py files) imported before the run, e.g. a user's tfds dataset builder.

This module imports no other part of flaxcnn at import time: every layer may use it.
"""

import ast
import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import ml_collections

# Config dicts whose keys the user defines: an override may add a key under them.
OPEN_DICTS = ("model_kwargs", "optimizer_kwargs")
# Settings that name something to resolve, and so are stored with absolute paths.
SPEC_KEYS = ("model", "task", "optimizer")
_FILE_MODULE_PREFIX = "flaxcnn_user_"
IMPORT_PATH_HELP = "or an import path: package.module:Name or path/to/file.py:Name"


class ConfigError(ValueError):
    """A config that cannot be loaded or overridden; the message is one line."""


# --- Resolving names ---------------------------------------------------------------------


def is_import_path(spec: str) -> bool:
    """Whether `spec` is an import path rather than a built-in name."""
    return ":" in spec or spec.endswith(".py") or "." in spec or os.sep in spec


def _split(spec: str) -> tuple[str, str | None]:
    """("module or file", "Name" or None)."""
    where, _, name = spec.rpartition(":") if ":" in spec else (spec, "", "")
    return where, name or None


def _is_file(where: str) -> bool:
    return where.endswith(".py") or os.sep in where


def absolute_spec(spec: str) -> str:
    """`spec` with a relative `file.py` made absolute (relative to the working directory)."""
    if not isinstance(spec, str):
        return spec
    where, name = _split(spec)
    if not _is_file(where):
        return spec
    where = os.path.abspath(os.path.expanduser(where))
    return f"{where}:{name}" if name else where


def import_file(path: str) -> ModuleType:
    """The module of the Python file `path`, imported once per absolute path (so classes keep
    their identity across calls) under a name derived from the path."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ValueError(f"file {path} not found")
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    module_name = f"{_FILE_MODULE_PREFIX}{stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # Before running it: dataclasses look their module up.
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    module.__flaxcnn_spec__ = path
    return module


def import_module(where: str) -> ModuleType:
    """The module `where` names: a dotted import path or a .py file."""
    return import_file(where) if _is_file(where) else importlib.import_module(where)


def _import_target(spec: str, kind: str) -> Any:
    where, name = _split(spec)
    try:
        target = import_module(where)
    except ValueError as e:
        raise ValueError(f"{kind} {spec!r}: {e}") from None
    except Exception as e:  # noqa: BLE001  (the user's module may raise anything)
        raise ValueError(f"cannot import {kind} {spec!r}: {type(e).__name__}: {e}") from None
    for part in (name or "").split(".") if name else []:
        if not hasattr(target, part):
            raise ValueError(f"{kind} {spec!r}: {where} has no {part!r}")
        target = getattr(target, part)
    return target


def resolve(
    kind: str,
    spec: str,
    builtins: Mapping[str, Any],
    namespace: ModuleType | None = None,
) -> Any:
    """The object `spec` names: a key of `builtins` (whose value may itself be an import
    path, imported lazily), an attribute of `namespace` (optax for optimizers), or an import
    path. Raises ValueError (one line) naming the valid built-ins."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{kind} must be a name or an import path, got {spec!r}")
    if spec in builtins:
        target = builtins[spec]
        return _import_target(target, kind) if isinstance(target, str) else target
    if namespace is not None and not is_import_path(spec) and hasattr(namespace, spec):
        return getattr(namespace, spec)
    if is_import_path(spec):
        return _import_target(spec, kind)
    extra = f", any {namespace.__name__} {kind} by name" if namespace is not None else ""
    raise ValueError(
        f"unknown {kind} {spec!r}; valid: {', '.join(sorted(builtins))}{extra}, {IMPORT_PATH_HELP}"
    )


def import_user_modules(config: ml_collections.ConfigDict) -> None:
    """Imports `config.imports` (import paths or .py files), e.g. a tfds builder to register."""
    for where in config.get("imports", None) or ():
        try:
            import_module(where)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"config.imports: cannot import {where!r}: {type(e).__name__}: {e}"
            ) from None


# --- A model given as an object (the Python API) -----------------------------------------


def _where_defined(cls: type) -> str:
    """The import path of the module that defines `cls`, or raises saying how to fix it."""
    module = sys.modules.get(cls.__module__)
    fix = (
        f"model {cls.__qualname__} is defined in {cls.__module__!r} (a script run directly or "
        "a notebook cell), which later commands (evaluate, predict, export, resume) cannot "
        "import again: move it into a file of its own, e.g. my_nets.py, and import it from "
        f"there, or pass model='my_nets.py:{cls.__name__}'"
    )
    if cls.__module__ == "__main__" or module is None or "<locals>" in cls.__qualname__:
        raise ValueError(
            fix.replace(f"in {cls.__module__!r}", "inside a function", 1)
            if "<locals>" in cls.__qualname__
            else fix
        )
    if getattr(module, "__flaxcnn_spec__", None):
        return module.__flaxcnn_spec__
    if not getattr(module, "__file__", None):
        raise ValueError(fix)
    if "." not in cls.__module__ and not module.__file__.endswith("__init__.py"):
        # A single-file module found on sys.path (often the working directory): its path
        # finds it again from anywhere.
        return os.path.abspath(module.__file__)
    return cls.__module__


def _json_value(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_json_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_value(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def describe_model(model: Any) -> tuple[str, dict]:
    """(import path, keyword arguments) that rebuild `model`, a Flax module instance or class:
    the fields that differ from their defaults. Raises ValueError for a module that cannot be
    imported again (defined in `__main__` or a notebook) or a field that JSON cannot hold."""
    cls = model if isinstance(model, type) else type(model)
    spec = f"{_where_defined(cls)}:{cls.__qualname__}"
    if isinstance(model, type) or not dataclasses.is_dataclass(model):
        return spec, {}
    kwargs = {}
    for field in dataclasses.fields(model):
        # The dataset decides num_classes and image_shape (flaxcnn.models.DATA_ARGUMENTS).
        if field.name in ("parent", "name", "num_classes", "image_shape") or not field.init:
            continue
        value = getattr(model, field.name)
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        if default is not dataclasses.MISSING and value == default:
            continue
        if not _json_value(value):
            raise ValueError(
                f"model field {cls.__name__}.{field.name}={value!r} cannot be recorded in "
                "config.json: give it as a number, string, bool or tuple of them, or make it "
                "the field's default in the class"
            )
        kwargs[field.name] = value
    return spec, kwargs


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


def set_model(config: ml_collections.ConfigDict, model: Any) -> None:
    """Points `config.model` at `model`: an import path, or a Flax module instance or class
    (recorded by import path and fields, see `describe_model`)."""
    if isinstance(model, str):
        config.model = absolute_spec(model)
        return
    spec, kwargs = describe_model(model)
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
    from flaxcnn.data import preprocess
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


def eval_batch_size(config: ml_collections.ConfigDict, device_count: int | None = None) -> int:
    """`config.eval_batch_size`, with -1 (the default) derived: 100 rounded up to a multiple
    of the device count, so the default works on any number of devices (evaluation pads and
    masks its last batch, so the size changes no metric)."""
    if config.eval_batch_size != -1:
        return config.eval_batch_size
    if device_count is None:
        import jax

        device_count = jax.device_count()
    return -(-DEFAULT_EVAL_BATCH_SIZE // device_count) * device_count


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
