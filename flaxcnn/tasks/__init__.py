"""Tasks: what a model is trained to do, chosen by `config.task`: a built-in name below or
an import path of a module (or object) that follows the `flaxcnn.tasks.base.Task` protocol
(`package.module`, `path/to/my_task.py`, `...:Name`). Tasks are imported on first use.

Every task provides the same contract, so one training loop serves them all (see
flaxcnn/tasks/base.py for the documented Protocol):

    create_state(config, rng, input_shape, num_classes, total_steps) -> state
    train_step(state, batch, rng, **step_kwargs(config)) -> (state, metrics)
    eval_step(state, batch, rng) -> metrics
    step_kwargs(config) -> dict
    write_pictures(state, images, rng, workdir, step, writer) -> None   (optional)
    extra_results(state, config, workdir, test_split) -> dict   (optional)
    fit_to_data(state, config, train_split) -> state   (optional)
"""

from typing import Any

from flaxcnn import resolver
from flaxcnn.tasks import base

# Built-in tasks by import path: imported only when named.
TASKS: dict[str, str] = {
    "classification": "flaxcnn.tasks.classification",
    "gan": "flaxcnn.tasks.gan",
    "autoencoder": "flaxcnn.tasks.autoencoder",
    "vae": "flaxcnn.tasks.vae",
}


def get_task(name: str) -> Any:
    """The task `name` names (a built-in or an import path), checked against the protocol."""
    task = resolver.resolve("task", name, TASKS)
    base.check_task(task, name)
    return task
