"""Tasks: what a model is trained to do, chosen by `config.task`.

Every task module provides the same contract, so one training loop serves them all:

    create_state(config, rng, input_shape, num_classes, total_steps) -> state
        A pytree (a flax struct) with an integer `step` field; checkpointed whole.
    train_step(state, batch, rng, **step_kwargs(config)) -> (state, metrics)
    eval_step(state, batch, rng) -> metrics
        Pure functions the loop compiles with `jax.jit`. `batch` holds "image" (B, H, W, C)
        float32 in [0, 1], "label" (B,) int32 and, in evaluation, "mask" (B,) bool. Metrics are
        sums over the (unmasked) examples plus their "count", averaged on the host.
    step_kwargs(config) -> dict
        Static keyword arguments of `train_step` taken from the config.
    write_pictures(state, images, rng, workdir, step, writer) -> None   (optional)
        Host-side pictures of a fixed batch of validation `images`, every epoch, main process.
    extra_results(state, config, workdir, test_split) -> dict   (optional)
        Results added to `results.json` after the final test evaluation.
"""

from types import ModuleType

from flaxcnn.tasks import autoencoder, classification, gan, vae

TASKS: dict[str, ModuleType] = {
    "classification": classification,
    "gan": gan,
    "autoencoder": autoencoder,
    "vae": vae,
}


def get_task(name: str) -> ModuleType:
    """The task module registered as `name`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[name]
