"""A model summary at the start of every run, like Keras's `model.summary()`: each layer's
module, input and output shapes and parameters (flax's `nn.tabulate`), the totals, and the
forward pass's floating-point operations per image (XLA's cost analysis)."""

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

TABLE_WIDTH = 160  # Characters: wide enough that rich does not cut shapes short.


def _module_of(state: Any) -> nn.Module | None:
    """The Flax module whose `apply` the state holds (a TrainState's `apply_fn`), if any."""
    module = getattr(getattr(state, "apply_fn", None), "__self__", None)
    return module if isinstance(module, nn.Module) else None


def module_table(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """`nn.tabulate`'s table of `model` on one zero image of `input_shape`, as plain text
    (traced abstractly: nothing is computed)."""
    tabulate = nn.tabulate(
        model,
        jax.random.key(0),
        console_kwargs={"force_terminal": False, "color_system": None, "width": TABLE_WIDTH},
    )
    return tabulate(jnp.zeros((1, *input_shape), jnp.float32), train=False)


def flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> float | None:
    """Floating-point operations (a multiply-add counts 2) of one image's forward pass in
    evaluation mode, as XLA counts them for this backend; None where it cannot tell."""
    image = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
    cost = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, image)
    analysis = cost.cost_analysis()
    if isinstance(analysis, list):  # Older jax: one dict per computation.
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def parameter_table(params: Any) -> str:
    """One line per parameter array (path, shape, count) and the total: for states whose
    module takes no image (a GAN's generator) or that hold no module at all."""
    flat = traverse_util.flatten_dict(params, sep="/") if isinstance(params, dict) else {}
    width = max((len(path) for path in flat), default=4)
    lines = [f"{'path':<{width}}  {'shape':<18} {'parameters':>12}"]
    for path, value in flat.items():
        shape = "x".join(str(d) for d in getattr(value, "shape", ())) or "scalar"
        lines.append(f"{path:<{width}}  {shape:<18} {math.prod(value.shape):>12,}")
    return "\n".join(lines)


def parameter_count(params: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def model_summary(state: Any, input_shape: tuple[int, ...], name: str = "") -> str:
    """The summary of the model in `state` (a layer table when its module takes images of
    `input_shape`, else a parameter table) and its total parameter count."""
    params = getattr(state, "params", {})
    module = _module_of(state)
    table = None
    if module is not None:
        try:
            table = module_table(module, tuple(input_shape))
        except Exception:  # noqa: BLE001  (a module that takes no image: list its parameters)
            table = None
    flops = None
    if table is not None:
        try:
            flops = flops_per_image(module, tuple(input_shape))
        except Exception:  # noqa: BLE001  (a summary line, never a reason to stop the run)
            flops = None
    if table is None:
        table = parameter_table(params)
    table = table.rstrip()
    if flops:
        table += f"\nForward FLOPs per image: {flops / 1e6:,.1f} M"
    name = name or (type(module).__name__ if module is not None else type(state).__name__)
    title = f"Model {name}, input {tuple(input_shape)}"
    if "Total Parameters" in table:  # nn.tabulate's own total.
        return f"{title}\n{table}\n"
    return f"{title}\n{table}\nTotal parameters: {parameter_count(params):,}\n"
