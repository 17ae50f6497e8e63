"""Weight penalties: which parameters are regularised, and the L2 term.

Only kernels (parameters with ndim > 1: convolution and dense weights) are penalised or
decayed. Biases and batch-norm scales and offsets (ndim 1) are left alone: they are few,
do not set the model's capacity, and shrinking a norm's scale towards 0 only fights the
normalisation.

L2 regularisation versus decoupled weight decay:

- L2 (`config.l2 = lambda`) adds `lambda * l2_penalty(params)` to the loss, so `lambda * w`
  joins each kernel's gradient. Adam then divides the whole gradient by its running RMS, so
  the effective pull towards zero differs per parameter: weights with large gradients are
  barely decayed, weights with small ones strongly.
- Weight decay (`config.optimizer = "adamw"`, `config.weight_decay = wd`) leaves the gradient
  alone and shrinks every kernel directly by `lr * wd * w` each step, independent of the
  gradient's scale (Loshchilov and Hutter, "Decoupled Weight Decay Regularization").
For plain SGD the two coincide (with wd = lambda); for Adam they do not.
"""

from typing import Any

import jax
import jax.numpy as jnp

Params = Any


def decay_mask(params: Params) -> Params:
    """A pytree of bools like `params`: True for kernels (ndim > 1), False for biases and
    batch-norm parameters. Used as `optax.adamw`'s `mask`."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def l2_penalty(params: Params) -> jax.Array:
    """0.5 * the sum of squares of every kernel (ndim > 1) weight, in float32."""
    squares = [
        jnp.sum(jnp.square(p.astype(jnp.float32))) for p in jax.tree.leaves(params) if p.ndim > 1
    ]
    return 0.5 * sum(squares, jnp.zeros((), jnp.float32))


def add_l2_gradient(grads: Params, params: Params, coefficient: float) -> Params:
    """`grads` plus the gradient of `coefficient * l2_penalty(params)`: `coefficient * w` on
    kernels, nothing on the rest. A Python 0 returns `grads` unchanged."""
    if isinstance(coefficient, (int, float)) and coefficient == 0:
        return grads
    return jax.tree.map(
        lambda g, p: g + coefficient * p.astype(g.dtype) if p.ndim > 1 else g, grads, params
    )
