"""The Python API: train any Flax module, then load the trained run.

    import flaxcnn
    from my_nets import LeNet5            # a module in a file of its own

    results = flaxcnn.fit(LeNet5(), dataset="mnist", workdir="runs/lenet", num_epochs=3)
    run = flaxcnn.load_run("runs/lenet")  # run.predict_proba(images)

`fit` runs the same loop as `python -m flaxcnn.main` (checkpoints, resume, writers, early
stopping, results.json): calling it again with the same workdir resumes or, when the run is
finished, returns its results.
"""

from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from flaxcnn import config as config_lib
from flaxcnn.inference import Run, load_run

__all__ = ["Run", "fit", "load_run", "make_config"]


def _apply(config: ml_collections.ConfigDict, settings: dict[str, Any]) -> None:
    """Sets each setting (a config key; a dict sets keys below it, e.g. augment={...})."""
    for key, value in settings.items():
        items = _flatten(key, value, config)
        for dotted, leaf in items:
            config_lib.override(config, dotted, leaf, parse=False)


def _flatten(key: str, value: Any, config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
    node = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if isinstance(value, dict) and (isinstance(node, ml_collections.ConfigDict) or node is None):
        pairs = [_flatten(f"{key}.{k}", v, config) for k, v in value.items()]
        return [pair for group in pairs for pair in group]
    if isinstance(value, list):
        value = tuple(value)  # Flax modules keep their fields hashable.
    return [(key, value)]


def make_config(
    model: Any = None,
    dataset: str | None = None,
    config: ml_collections.ConfigDict | str | None = None,
    *,
    workdir: str | None = None,
    **settings: Any,
) -> ml_collections.ConfigDict:
    """The config of a run: `config` (a ConfigDict, a config file path, or None for the
    default config) with `model` (a Flax module instance or class, or an import path),
    `dataset` and any config keys as `settings` (nested dicts for `augment`,
    `early_stopping`, `model_kwargs`, `optimizer_kwargs`). A model class defined in
    `__main__` or a notebook is saved by value in `workdir` (the run's; `fit` passes it),
    and refused without one. Raises ValueError."""
    if isinstance(config, ml_collections.ConfigDict):
        base = ml_collections.ConfigDict(config.to_dict())
        config_lib.add_defaults(base)
        base.lock()
    else:
        base = config_lib.load(config)
    if model is not None:
        config_lib.set_model(base, model, save_dir=workdir)
    if dataset is not None:
        base.dataset = dataset
    _apply(base, settings)
    config_lib.normalize(base)
    return base


def fit(
    model: Any = None,
    dataset: str | None = None,
    workdir: str | None = None,
    *,
    config: ml_collections.ConfigDict | str | None = None,
    force: bool = False,
    hooks: Sequence[Callable[[Any, Any], None]] = (),
    **settings: Any,
) -> dict:
    """Trains `model` on `dataset` into `workdir` and returns the test results (what
    `results.json` holds), resuming the run already in `workdir`.

    `model`: a Flax module instance or class (one defined in `__main__` or a notebook is
    saved by value with the run, its source beside it, for later commands), or an import path
    (`"my_nets.py:LeNet5"`, `"mypkg.nets:ResNet"`), or None for the config's model. A module
    instance's fields are recorded in config.json. `settings` are config keys, e.g.
    `num_epochs=3, optimizer="lion", optimizer_kwargs={"b1": 0.95}, task="my_task.py"`.
    `force` moves a run of another task, model or dataset in `workdir` aside. `hooks`:
    callables `hook(run, state)` run after every epoch, after the built-in ones (validation,
    pictures, early stopping, checkpoint; see flaxcnn.runner.loop.Hook). Bad settings raise
    ValueError before anything is written."""
    if not workdir:
        raise ValueError("fit needs a workdir: where checkpoints, logs and results go")
    cfg = make_config(model, dataset, config, workdir=workdir, **settings)
    config_lib.validate(cfg)
    # Imported here: `import flaxcnn` stays cheap (the scorer's module imports scipy).
    from flaxcnn import scoring
    from flaxcnn import workdir as workdir_lib
    from flaxcnn.runner import loop

    workdir_lib.prepare_workdir(workdir, cfg, force)
    scorer = scoring.prepare_scorer(cfg)
    return loop.train_and_evaluate(cfg, workdir, hooks, scorer)
