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
import inspect
import os
import sys
import tempfile
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


def _is_saved_class(where: str) -> bool:
    return where.endswith(SAVED_CLASS_SUFFIX)


def _import_target(spec: str, kind: str) -> Any:
    where, name = _split(spec)
    if _is_saved_class(where):
        return load_saved_class(where)
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
        "import again: train it with flaxcnn.fit, which saves the class with the run, or "
        "move it into a file of its own, e.g. my_nets.py, and import it from there, or pass "
        f"model='my_nets.py:{cls.__name__}'"
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


def describe_model(model: Any, save_dir: str | None = None) -> tuple[str, dict]:
    """(import path, keyword arguments) that rebuild `model`, a Flax module instance or class:
    the fields that differ from their defaults. A class that cannot be imported again
    (defined in `__main__`, a notebook or a function) is saved by value in `save_dir` (the
    run's workdir; see `save_model_class`), or raises ValueError without one; so does a field
    that JSON cannot hold."""
    cls = model if isinstance(model, type) else type(model)
    try:
        where = _where_defined(cls)
    except ValueError:
        if save_dir is None:
            raise
        where = os.path.join(os.path.abspath(os.path.expanduser(save_dir)), SAVED_CLASS_FILE)
        _defined_here[where] = cls
    spec = f"{where}:{cls.__qualname__}"
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


# --- A model class saved with its run --------------------------------------------------------

# A class defined in `__main__` or a notebook, pickled by value (cloudpickle) into its run's
# workdir beside its source, so that every later command in a new process rebuilds it.
SAVED_CLASS_SUFFIX = ".pkl"
SAVED_CLASS_FILE = "model_class" + SAVED_CLASS_SUFFIX
# By the file they are saved in: classes this process defines and saves (`describe_model`),
# and classes it loaded or was given (`load_saved_class`, `provide_saved_class`).
_defined_here: dict[str, type] = {}
_loaded: dict[str, type] = {}


def _source(cls: type) -> str | None:
    """The source text of `cls` (a script's or a notebook cell's), or None where it is lost."""
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return None


def _source_path(where: str) -> str:
    return where[: -len(SAVED_CLASS_SUFFIX)] + ".py"


def load_saved_class(where: str) -> type:
    """The model class saved at `where` (this process's own, or unpickled). Raises ValueError
    (one line) saying how to load the run where the class cannot be unpickled."""
    if where in _defined_here or where in _loaded:
        return _defined_here.get(where) or _loaded[where]
    import cloudpickle

    try:
        with open(where, "rb") as f:
            cls = cloudpickle.load(f)
    except FileNotFoundError:
        raise ValueError(f"the model class file {where} is missing") from None
    except Exception as e:  # noqa: BLE001  (unpickling runs the class's own code)
        raise ValueError(
            f"cannot load the model class saved in {where} ({type(e).__name__}: {e}): load "
            "the run with flaxcnn.load_run(workdir, model=YourClass) in a program that "
            "defines the class"
        ) from None
    _loaded[where] = cls
    return cls


def provide_saved_class(spec: str, model: Any) -> None:
    """Makes `model` (a class or instance) the class that `spec`, a class saved with its run,
    names in this process: a run loaded where its pickled class cannot be."""
    where, _ = _split(spec)
    if not _is_saved_class(where):
        raise ValueError(f"model= is for a run whose class was saved with it; this run's is {spec}")
    _loaded[where] = model if isinstance(model, type) else type(model)


def saved_class_changed(spec: str) -> bool:
    """Whether `spec` names a class of this process to be saved where a class of another
    source is saved already (a run trained with another definition)."""
    where, _ = _split(spec) if isinstance(spec, str) else ("", None)
    cls = _defined_here.get(where)
    if cls is None or not os.path.isfile(where):
        return False
    try:
        with open(_source_path(where)) as f:
            saved = f.read()
    except OSError:
        return False
    source = _source(cls)
    return source is not None and source != saved


def save_model_class(spec: str) -> None:
    """Writes the class `spec` names, if it is one of this process's to save (see
    `describe_model`), by value to its file and its source beside it, atomically."""
    where, _ = _split(spec) if isinstance(spec, str) else ("", None)
    cls = _defined_here.get(where)
    if cls is None:
        return
    import cloudpickle

    source = _source(cls) or "# The source of this class was not found.\n"
    for path, data in ((where, cloudpickle.dumps(cls)), (_source_path(where), source.encode())):
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as f:
            f.write(data)
        os.replace(f.name, path)
