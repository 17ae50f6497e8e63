"""Training state and the optimisation recipe: parameters, optimizer, batch-norm statistics
and an optional moving average of the parameters in one pytree; the optimizer, learning-rate
schedule, gradient clipping and compute dtype built from the config."""

import fnmatch
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax import struct
from flax.training import train_state

from flaxcnn import cpu, resolver
from flaxcnn.models import argument_names, resolve_model
from flaxcnn.training.regularization import decay_mask

# The built-in optimizers; `config.optimizer` may also name any optax optimizer ("lion",
# "rmsprop", ...) or a function by import path, each called as
# fn(learning_rate=schedule, **config.optimizer_kwargs). Weight decay (config.weight_decay)
# goes to optimizers that take a `weight_decay` argument, with the kernels-only mask of
# flaxcnn.training.regularization when they take a `mask`; the others reject it.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
}
# Schedules that use `config.warmup_steps`, and the warm-up they take when it is 0.
DEFAULT_WARMUP_FRACTION = {"warmup_cosine": 0.05, "onecycle": 0.3}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _warmup(name: str, total_steps: int, warmup_steps: int) -> int:
    return warmup_steps or max(1, round(DEFAULT_WARMUP_FRACTION[name] * total_steps))


# Each schedule from (peak learning rate, total steps, warm-up steps).
SCHEDULES = {
    # The learning rate throughout.
    "constant": lambda lr, steps, warmup: optax.constant_schedule(lr),
    # From lr at step 0 down to 0 at the last step along half a cosine.
    "cosine": lambda lr, steps, warmup: optax.cosine_decay_schedule(lr, steps),
    # Linear from 0 to lr over the warm-up, then a cosine down to 0 at the last step.
    "warmup_cosine": lambda lr, steps, warmup: optax.warmup_cosine_decay_schedule(
        0.0, lr, _warmup("warmup_cosine", steps, warmup), steps
    ),
    # One cycle: cosine from lr/25 up to lr over the warm-up, then down to lr/25e4.
    "onecycle": lambda lr, steps, warmup: optax.cosine_onecycle_schedule(
        steps, lr, pct_start=_warmup("onecycle", steps, warmup) / steps
    ),
}


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the model's `batch_stats` (empty for models without batch norm)
    and an exponential moving average of the parameters, `ema_params` (empty when
    `ema_decay` is 0).

    `ema_decay` is static (not a leaf): it comes from the config, is not checkpointed, and a
    change recompiles the step. Each `apply_gradients` sets

        ema <- d * ema + (1 - d) * new_params,   d = min(ema_decay, (1 + step) / (10 + step))

    with `step` the count before the update. The warm-up in `d` (TensorFlow's
    ExponentialMovingAverage with `num_updates`) keeps the average from being dominated by
    the random initialisation early on: d is 0.1 at the first update, 0.9 at step 80 and
    0.99 at step 890, then `ema_decay`.
    """

    batch_stats: Any = None
    ema_params: Any = None
    ema_decay: float = struct.field(pytree_node=False, default=0.0)

    def apply_gradients(self, *, grads: Any, **kwargs) -> "TrainState":
        """One optimizer update, and the moving average of the parameters when it is on."""
        new = super().apply_gradients(grads=grads, **kwargs)
        if not self.ema_decay:
            return new
        step = jnp.asarray(self.step, jnp.float32)
        decay = jnp.minimum(self.ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(
            lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
            self.ema_params,
            new.params,
        )
        return new.replace(ema_params=ema)

    def variables(self) -> dict:
        """The variables `apply_fn` takes: params, and batch stats when the model has them."""
        return self._with_batch_stats(self.params)

    def eval_variables(self) -> dict:
        """`variables()` with the moving average in place of the parameters when it is on:
        what evaluation should use."""
        return self._with_batch_stats(self.ema_params if self.ema_decay else self.params)

    def _with_batch_stats(self, params: Any) -> dict:
        if self.batch_stats:
            return {"params": params, "batch_stats": self.batch_stats}
        return {"params": params}


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


def resolve_optimizer(name: str) -> Callable[..., optax.GradientTransformation]:
    """The optimizer function `name` names: built-in, optax's, or an import path."""
    fn = resolver.resolve("optimizer", name, OPTIMIZERS, namespace=optax)
    if not callable(fn):
        raise ValueError(f"optimizer {name!r} is not a function")
    return fn


def _arguments(fn: Callable) -> set[str] | None:
    """The keyword arguments `fn` takes (None: any)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def optimizer_arguments(config: ml_collections.ConfigDict) -> tuple[Callable, dict]:
    """(optimizer function, its keyword arguments but the learning rate), checked against
    its signature: `config.optimizer_kwargs`, plus the weight decay (and mask) if set."""
    fn = resolve_optimizer(config.optimizer)
    kwargs = dict(config.get("optimizer_kwargs", None) or {})
    accepted = _arguments(fn)
    for key, setting in (("learning_rate", "learning_rate"), ("weight_decay", "weight_decay")):
        if key in kwargs:
            raise ValueError(f"set config.{setting}, not config.optimizer_kwargs.{key}")
    if accepted is not None:
        if "learning_rate" not in accepted:
            raise ValueError(f"optimizer {config.optimizer!r} takes no learning_rate")
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            valid = ", ".join(sorted(accepted - {"learning_rate", "weight_decay", "mask"}))
            raise ValueError(
                f"config.optimizer_kwargs.{unknown[0]} is not an argument of optimizer "
                f"{config.optimizer!r}; it takes: {valid}"
            )
    takes_decay = accepted is not None and "weight_decay" in accepted
    if config.weight_decay and accepted is not None and not takes_decay:
        raise ValueError(
            f"config.weight_decay needs optimizer 'adamw' or another with a weight_decay "
            f"argument, e.g. 'lion' (got {config.optimizer!r}); use config.l2 for an L2 "
            "penalty with other optimizers"
        )
    # config.weight_decay rules, 0 included: optax's own defaults (adamw 1e-4) never apply.
    if takes_decay or (accepted is None and config.weight_decay):
        kwargs["weight_decay"] = config.weight_decay
        if accepted is None or "mask" in accepted:
            kwargs["mask"] = decay_mask
    return fn, kwargs


def build_optimizer(fn: Callable, learning_rate: Any, kwargs: dict, name: str):
    """`fn(learning_rate=learning_rate, **kwargs)`, or a one-line ValueError."""
    try:
        tx = fn(learning_rate=learning_rate, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"optimizer {name!r} with {kwargs}: {e}") from None
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise ValueError(f"optimizer {name!r} made a {type(tx).__name__}, not an optax optimizer")
    return tx


def validate_optimization(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first optimisation or precision setting that cannot work."""
    _lookup(SCHEDULES, "schedule", config.lr_schedule)
    _lookup(COMPUTE_DTYPES, "compute_dtype", config.compute_dtype)
    for key in ("l2", "weight_decay", "grad_clip_norm", "ema_decay", "warmup_steps"):
        if not config[key] >= 0:  # Also catches NaN.
            raise ValueError(f"config.{key} must be >= 0, got {config[key]}")
    if config.ema_decay >= 1:
        raise ValueError(f"config.ema_decay must be < 1 (0: off), got {config.ema_decay}")
    for item in config.get("lr_multipliers", ()):
        pair = isinstance(item, (tuple, list)) and len(item) == 2
        if not (pair and isinstance(item[0], str) and isinstance(item[1], (int, float))):
            raise ValueError(f"config.lr_multipliers holds (pattern, factor) pairs, got {item!r}")
        if not item[1] >= 0:
            raise ValueError(f"config.lr_multipliers factors must be >= 0, got {item!r}")
    fn, kwargs = optimizer_arguments(config)
    build_optimizer(fn, config.learning_rate, kwargs, config.optimizer)  # Cheap: no state.
    if config.warmup_steps and config.lr_schedule not in DEFAULT_WARMUP_FRACTION:
        raise ValueError(
            f"config.warmup_steps is used only by the schedules "
            f"{', '.join(sorted(DEFAULT_WARMUP_FRACTION))}, not {config.lr_schedule!r}"
        )


def create_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """`config.optimizer` with `config.optimizer_kwargs` and `config.learning_rate` following
    `config.lr_schedule` over `total_steps`, after clipping the gradients' global norm to
    `config.grad_clip_norm` (0: no clipping)."""
    validate_optimization(config)
    if config.warmup_steps >= total_steps:
        raise ValueError(
            f"config.warmup_steps={config.warmup_steps} must be less than the "
            f"{total_steps} training steps"
        )
    schedule = SCHEDULES[config.lr_schedule](config.learning_rate, total_steps, config.warmup_steps)
    fn, kwargs = optimizer_arguments(config)
    optimizer = build_optimizer(fn, schedule, kwargs, config.optimizer)
    if config.get("lr_multipliers"):
        optimizer = optax.chain(optimizer, scale_by_path(config.lr_multipliers))
    if config.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
    return optimizer


def parameter_path(path: tuple) -> str:
    """A pytree path as '/'-joined names: 'Conv_0/kernel'."""
    return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def scale_by_path(multipliers: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiplies each parameter's update by the factor of the first (pattern, factor) whose
    fnmatch pattern its `parameter_path` matches (1 where none does): per-group learning
    rates, as PyTorch's parameter groups; 0 freezes a group. Initialising on parameters that
    a pattern does not match raises ValueError."""
    multipliers = [(str(pattern), float(factor)) for pattern, factor in multipliers]

    def factor(path) -> float:
        name = parameter_path(path)
        return next((f for p, f in multipliers if fnmatch.fnmatchcase(name, p)), 1.0)

    def init(params):
        names = [parameter_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
        for pattern, _ in multipliers:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise ValueError(
                    f"config.lr_multipliers pattern {pattern!r} matches no parameter; they "
                    f"are named like {', '.join(names[:3])}"
                )
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(lambda path, u: u * factor(path), updates)
        return scaled, state

    return optax.GradientTransformation(init, update)


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    """The dtype `config.compute_dtype` names."""
    return _lookup(COMPUTE_DTYPES, "compute_dtype", config.compute_dtype)


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
    """`config.model_kwargs`, plus `dtype` when `config.compute_dtype` is not float32.

    Parameters stay float32 whatever the compute dtype (the models cast them on use)."""
    kwargs = dict(config.model_kwargs)
    dtype = compute_dtype(config)
    if dtype == jnp.float32:
        return kwargs
    if "dtype" in kwargs:
        raise ValueError("set config.compute_dtype or config.model_kwargs.dtype, not both")
    accepted = argument_names(resolve_model(config.model))
    if accepted is not None and "dtype" not in accepted:
        raise ValueError(
            f"config.compute_dtype={config.compute_dtype!r} needs a model with a dtype "
            f"setting; {config.model} has none"
        )
    return {**kwargs, "dtype": dtype}


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    input_shape: tuple,
    ema_decay: float = 0.0,
) -> TrainState:
    """Initialises the model on a dummy batch of `input_shape` (H, W, C); with `ema_decay`
    > 0 the moving average starts at the initial parameters."""
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1) (0: off), got {ema_decay}")
    variables = model.init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState.create(
        apply_fn=cpu.for_this_backend(model.apply),  # Standard layers fast on CPUs.
        params=params,
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        # A copy, so that donating the state never donates one buffer twice.
        ema_params=jax.tree.map(jnp.copy, params) if ema_decay else {},
        ema_decay=float(ema_decay),
    )
