"""Training state: parameters, optimizer and batch-norm statistics in one pytree."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax.training import train_state

OPTIMIZERS = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd}
SCHEDULES = {
    "constant": lambda lr, steps: optax.constant_schedule(lr),
    "cosine": lambda lr, steps: optax.cosine_decay_schedule(lr, steps),
}


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the model's `batch_stats` (empty for models without batch norm)."""

    batch_stats: Any = None

    def variables(self) -> dict:
        """The variables `apply_fn` takes: params, and batch stats when the model has them."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


def create_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """`config.optimizer` with `config.learning_rate` following `config.lr_schedule`."""
    schedule = _lookup(SCHEDULES, "schedule", config.lr_schedule)
    optimizer = _lookup(OPTIMIZERS, "optimizer", config.optimizer)
    return optimizer(schedule(config.learning_rate, total_steps))


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, input_shape: tuple
) -> TrainState:
    """Initialises the model on a dummy batch of `input_shape` (H, W, C)."""
    variables = model.init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
    )
