"""Standard layers made fast on XLA:CPU without changing the user's module.

`rewrite(apply_fn)` traces `apply_fn` to a jaxpr and evaluates it with two primitives
replaced by formulations XLA:CPU runs several times faster in training, the ones
`flaxcnn.models.layers` proved on the seed CNN:

- `conv_general_dilated` (what `nn.Conv` and `lax.conv` emit) of stride 1, undilated, one
  feature group, 2 spatial dimensions: as matmuls of shifted input windows by the kernel's
  taps. XLA:CPU computes a convolution's kernel gradient (and on few input channels the
  convolution itself) many times slower than matmuls of the same size, and convolutions
  inside loops slower still;
- `reduce_window_max` over non-overlapping windows (`nn.max_pool` with strides equal to its
  window, 'VALID'): a reshape and a max, with the gradient of `lax.reduce_window`
  (to the first maximum of each window) written out, where XLA:CPU's select-and-scatter is
  many times slower.

Everything else (dense layers, batch norm, dropout, the loss) runs as traced. The rewrite
changes no parameter and no random draw: outputs and gradients equal the standard layers'
up to float32 summation order. It is applied on CPUs only (`wins_here`), and turned off by
setting the environment variable FLAXCNN_FAST_CPU_LAYERS=0.
"""

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

ENV_SWITCH = "FLAXCNN_FAST_CPU_LAYERS"


def wins_here() -> bool:
    """Whether `rewrite` pays on this backend: XLA:CPU, unless turned off by ENV_SWITCH=0."""
    return jax.default_backend() == "cpu" and os.environ.get(ENV_SWITCH, "1") != "0"


def shifted_windows(x: jax.Array, kernel_shape: Sequence[int]) -> list[jax.Array]:
    """The kh * kw slices x[:, i : i + H', j : j + W', :] of an already padded NHWC `x`, one
    per kernel tap (i, j), row-major."""
    kh, kw = kernel_shape
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return [x[:, i : i + out_h, j : j + out_w, :] for i in range(kh) for j in range(kw)]


def conv_as_matmuls(x: jax.Array, kernel: jax.Array, padding: Sequence[tuple[int, int]]):
    """A stride-1 NHWC x HWIO convolution with explicit `padding` ((lo, hi) per spatial
    dimension), as one matmul of the concatenated shifted windows (the patches) by the
    flattened kernel. Its autodiff gradients are matmuls too."""
    (top, bottom), (left, right) = padding
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw, channels, features = kernel.shape
    patches = jnp.concatenate(shifted_windows(x, (kh, kw)), axis=-1)
    return patches @ kernel.reshape(kh * kw * channels, features)


def _convolution_rule(
    lhs,
    rhs,
    *,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
    **params,
):
    """`conv_as_matmuls` for the convolutions it covers, else None (keep the primitive)."""
    spatial = len(window_strides)
    if (
        spatial != 2
        or any(s != 1 for s in (*window_strides, *lhs_dilation, *rhs_dilation))
        or feature_group_count != 1
        or batch_group_count != 1
        or any(lo < 0 or hi < 0 for lo, hi in padding)
    ):
        return None
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    # To NHWC / HWIO and back: no-ops for Flax's layouts.
    x = lhs.transpose(lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
    kernel = rhs.transpose(*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
    dtype = params.get("preferred_element_type") or jnp.result_type(lhs, rhs)
    y = conv_as_matmuls(x, kernel, padding).astype(dtype)
    nhwc_position = [0, spatial + 1, *range(1, spatial + 1)]  # Of out_spec's N, C, H, W.
    order = [0] * (spatial + 2)
    for dim, axis in zip(out_spec, nhwc_position):
        order[dim] = axis
    return y.transpose(order)


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


RULES: dict[str, Callable] = {"reduce_window_max": _max_pool_rule}


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
