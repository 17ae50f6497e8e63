"""The one resolver of what a config names: a model, task or optimizer given as

    a built-in name          "SeedCNN", "classification", "adam"
    package.module:Name      "mypkg.nets:ResNetTiny" (a task may name a module: "mypkg.task")
    path/to/file.py:Name     "my_nets.py:LeNet5" (a task may name a file: "my_task.py")

Paths are stored absolute (`absolute_spec`), so `config.json` names the same object from any
directory and every later command (evaluate, predict, export, resume) rebuilds it. A model
given as an object (the Python API) is described by its import path and fields
(`describe_model`).

This module imports no other part of flaxcnn: models, tasks, optimizers and the config all
use it.
"""

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import ml_collections

_FILE_MODULE_PREFIX = "flaxcnn_user_"
IMPORT_PATH_HELP = "or an import path: package.module:Name or path/to/file.py:Name"


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
