"""Standard layers made fast on XLA:CPU without changing the user's module.

Two changes, both on CPUs only (`wins_here`) and both turned off by setting the environment
variable FLAXCNN_FAST_CPU_LAYERS=0:

- `rewrite(apply_fn)` traces `apply_fn` to a jaxpr and evaluates it with RULES:
  - `lax.conv_general_dilated` (`nn.Conv`: 2-D, float32, or bfloat16 on CPUs with bfloat16
    instructions) runs oneDNN's convolution kernels, forward and both gradients
    (`onednn_conv`), where XLA:CPU's run 1.3-2.5x slower;
  - `reduce_window_max` over non-overlapping windows (`nn.max_pool` with strides equal to
    its window, 'VALID') is a reshape and a max, with the gradient of `lax.reduce_window`
    (to the first maximum of each window) written out, where XLA:CPU's select-and-scatter
    is many times slower.
  Everything else runs as traced; no parameter and no random draw changes.
- `compile_for_this_backend(lowered)` compiles with XLA:CPU's own (Eigen) convolution
  kernels instead of YNNPACK's, its default, for the convolutions oneDNN does not take
  (dots and reductions stay with YNNPACK): a 3x3 convolution of 16 to 32 channels at batch
  32 runs its forward pass 2.1x and its kernel gradient 1.4x faster.

Outputs and gradients equal the standard layers' up to float32 summation order.
"""

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from flaxcnn.cpu import onednn_conv

ENV_SWITCH = "FLAXCNN_FAST_CPU_LAYERS"
ONEDNN_SWITCH = "FLAXCNN_ONEDNN"  # =0: XLA's own convolutions, the rest of the rewrite kept.
# XLA:CPU's default library fusions less the convolutions (see the module docstring).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    )
}
MEMORY_OPTIMIZED = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
# Temporaries above which the memory-optimised schedule is tried (`compile_for_this_backend`).
# A fixed size, not the reported L3: virtual machines report the host's (300 MB on one).
# Below it the two schedules were measured to hold about the same (the seed CNN's steps and
# evaluations, 17 MB either way), and a second compilation would only cost time.
LARGE_TEMPS_BYTES = 32 * 2**20
LEAN_ENOUGH = 0.75


def wins_here() -> bool:
    """Whether these changes pay on this backend: XLA:CPU, unless turned off by ENV_SWITCH=0."""
    return jax.default_backend() == "cpu" and os.environ.get(ENV_SWITCH, "1") != "0"


def onednn_here() -> bool:
    """Whether oneDNN's convolutions (`onednn_conv`) are built for this CPU backend and not
    turned off by ONEDNN_SWITCH=0."""
    return wins_here() and os.environ.get(ONEDNN_SWITCH, "1") != "0" and onednn_conv.available()


def convolutions_by_onednn() -> bool:
    """Whether the rewrite runs `nn.Conv`'s convolutions with oneDNN here: on one device
    only, as on several XLA would run a custom call on the whole batch on every device."""
    return onednn_here() and jax.device_count() == 1


def compile_for_this_backend(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
    """`lowered.compile()`, with CPU_COMPILER_OPTIONS where they win (`wins_here`).

    A function with more than LARGE_TEMPS_BYTES of temporaries is compiled a second time
    with XLA's memory-optimised schedule, and that one is kept if it needs at most
    LEAN_ENOUGH of the default's: the default concurrency-optimised schedule keeps every
    microbatch of a large batch live at once, a working set that no longer stays in the
    cores' caches (a plain `flax.linen` CNN at batch 128 in 4 microbatches: 38 MB of
    temporaries against 24 MB, 3,050 examples/s against 3,340). Where the schedules hold
    about the same (a GAN, an RNN, one large batch), the default one stays."""
    if not wins_here():
        return lowered.compile()
    compiled = lowered.compile(compiler_options=CPU_COMPILER_OPTIONS)
    temps = compiled.memory_analysis().temp_size_in_bytes
    if temps <= LARGE_TEMPS_BYTES:
        return compiled
    lean = lowered.compile(compiler_options={**CPU_COMPILER_OPTIONS, **MEMORY_OPTIMIZED})
    return lean if lean.memory_analysis().temp_size_in_bytes <= LEAN_ENOUGH * temps else compiled


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_blocks(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
    """Max over non-overlapping `window` blocks of `x` (one window size per dimension; a
    remainder is dropped, as 'VALID' pooling drops it), as a reshape and a max. The gradient
    goes to the first maximum of each block in row-major order, as `lax.reduce_window`'s."""
    return _max_pool_fwd(x, window)[0]


def _block_positions(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
    """`x` cropped to whole blocks, as (d0 // w0, d1 // w1, ..., w0 * w1 * ...): each
    block's values last, in row-major order."""
    x = x[tuple(slice(0, d // w * w) for d, w in zip(x.shape, window))]
    blocks = x.reshape([n for d, w in zip(x.shape, window) for n in (d // w, w)])
    blocks = blocks.transpose(*range(0, blocks.ndim, 2), *range(1, blocks.ndim, 2))
    return blocks.reshape(*blocks.shape[: x.ndim], -1)


def _max_pool_fwd(x, window):
    # The maximum and the position of its first occurrence, from one read of each value:
    # a gradient that compared values against a recomputed maximum could miss it by a
    # rounding when XLA computes the two in different fusions.
    positions = _block_positions(x, window)
    best, first = positions[..., 0], jnp.zeros(positions.shape[:-1], jnp.int32)
    for i in range(1, positions.shape[-1]):
        better = positions[..., i] > best
        best, first = jnp.where(better, positions[..., i], best), jnp.where(better, i, first)
    return best, (x.shape, first)


def _max_pool_bwd(window, residuals, grad):
    shape, first = residuals
    size = math.prod(window)
    per_position = [jnp.where(first == i, grad, 0).astype(grad.dtype) for i in range(size)]
    blocks = jnp.stack(per_position, axis=-1).reshape(*grad.shape, *window)
    # (n0, n1, ..., w0, w1, ...) -> (n0, w0, n1, w1, ...) -> the cropped input's shape.
    order = [axis for i in range(grad.ndim) for axis in (i, grad.ndim + i)]
    grad_x = blocks.transpose(order).reshape([n * w for n, w in zip(grad.shape, window)])
    return (jnp.pad(grad_x, [(0, d - g) for d, g in zip(shape, grad_x.shape)]),)


max_pool_blocks.defvjp(_max_pool_fwd, _max_pool_bwd)


def _max_pool_rule(
    x, *, window_dimensions, window_strides, padding, base_dilation, window_dilation
):
    """`max_pool_blocks` for non-overlapping, unpadded, undilated windows, else None."""
    if (
        tuple(window_dimensions) != tuple(window_strides)
        or any(p != (0, 0) for p in padding)
        or any(d != 1 for d in (*base_dilation, *window_dilation))
        or math.prod(window_dimensions) == 1
    ):
        return None
    return max_pool_blocks(x, tuple(window_dimensions))


def _conv_rule(lhs, rhs, **params):
    """`onednn_conv.conv_rule` where oneDNN convolves (`convolutions_by_onednn`), else None."""
    return onednn_conv.conv_rule(lhs, rhs, **params) if convolutions_by_onednn() else None


RULES: dict[str, Callable] = {
    "reduce_window_max": _max_pool_rule,
    "conv_general_dilated": _conv_rule,
}


def _eval(jaxpr: jex_core.Jaxpr, consts: Sequence, args: Sequence, rules: dict) -> list:
    """`jax.core.eval_jaxpr` with RULES applied, inlining nested `jit`s so that the layers
    inside them (Flax and jax.numpy wrap many functions in one) are rewritten too."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        rule, out = rules.get(eqn.primitive.name), None
        if rule is not None:
            out = rule(*invals, **eqn.params)
        elif eqn.primitive.name in ("jit", "pjit"):
            inner = eqn.params["jaxpr"]
            out = _eval(inner.jaxpr, inner.consts, invals, rules)
        if out is None:
            out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        if not eqn.primitive.multiple_results:
            out = [out]
        env.update(zip(eqn.outvars, out))
    return [read(v) for v in jaxpr.outvars]


_STANDARD_LAYERS = contextvars.ContextVar("standard_layers", default=False)


@contextlib.contextmanager
def standard_layers():
    """Within it, every `Rewritten` computes as its `fn` does: for programs that run on
    other machines (an export), which the custom calls into this one's libraries cannot."""
    token = _STANDARD_LAYERS.set(True)
    try:
        yield
    finally:
        _STANDARD_LAYERS.reset(token)


class Rewritten:
    """`fn` (e.g. a Flax `model.apply`) computed with `rules`: same signature and results.
    Array arguments (keyword ones too: rngs) become inputs of the traced jaxpr; anything
    else (train=True, mutable=[...], a method) stays static. Equal to another `Rewritten`
    of an equal `fn`, as `fn`s are, so that caches keyed on a TrainState's `apply_fn` (its
    tree structure) still hit."""

    def __init__(self, fn: Callable, rules: dict[str, Callable]):
        self.fn, self.rules = fn, rules
        functools.update_wrapper(self, fn)

    @property
    def __self__(self) -> Any:
        """The module whose `apply` this is, as the bound method `fn` has it."""
        return self.fn.__self__

    def __eq__(self, other) -> bool:
        return isinstance(other, Rewritten) and (self.fn, self.rules) == (other.fn, other.rules)

    def __hash__(self) -> int:
        return hash(self.fn)

    def __call__(self, *args, **kwargs):
        if _STANDARD_LAYERS.get():
            return self.fn(*args, **kwargs)
        leaves, treedef = jax.tree.flatten((args, kwargs))
        is_array = [hasattr(leaf, "shape") and hasattr(leaf, "dtype") for leaf in leaves]
        arrays = [leaf for leaf, array in zip(leaves, is_array) if array]

        def traced(*arrays):
            it = iter(arrays)
            full = [next(it) if array else leaf for leaf, array in zip(leaves, is_array)]
            call_args, call_kwargs = jax.tree.unflatten(treedef, full)
            return self.fn(*call_args, **call_kwargs)

        closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(*arrays)
        out = _eval(closed.jaxpr, closed.consts, arrays, self.rules)
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)


def rewrite(fn: Callable, rules: dict[str, Callable] | None = None) -> Callable:
    """`fn` computed with `rules` (default RULES): see `Rewritten`."""
    return Rewritten(fn, RULES if rules is None else rules)


def for_this_backend(fn: Callable) -> Callable:
    """`rewrite(fn)` where it wins (`wins_here`), else `fn` itself."""
    return rewrite(fn) if wins_here() else fn
