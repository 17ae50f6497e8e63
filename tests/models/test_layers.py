import unittest.mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from flaxcnn.cpu import kernels
from flaxcnn.cpu import rewrite as cpu_rewrite
from flaxcnn.cpu.kernels import conv_relu_max_pool, fused_layers_win, max_pool_2x2
from flaxcnn.models.cnn import SeedCNN
from flaxcnn.models.layers import Conv, ConvReluMaxPool, ConvTranspose2x, FlattenDense

# Gradients are taken under jit throughout: eagerly, every operation of a backward pass
# compiles on its own, several times slower than the whole jitted function.


def normal(shape, seed: int = 0) -> jax.Array:
    """Standard normal test inputs, drawn by NumPy: each new shape of `jax.random.normal`
    compiles a program of its own."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _sin_sum(module, params, x):
    return jnp.sum(jnp.sin(module.apply(params, x)))


_sin_sum_grad = jax.jit(jax.grad(_sin_sum, argnums=(1, 2)), static_argnums=0)


def assert_same_values_and_gradients(ours, reference, params, x) -> None:
    """`ours` and `reference` give the same outputs, and the same gradients of a scalar of
    them with respect to the parameters and the input."""
    np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), atol=1e-5)
    grads, expected = _sin_sum_grad(ours, params, x), _sin_sum_grad(reference, params, x)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels", [1, 3, 8])  # 1 and 3 take the patch path, 8 lax.conv.
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_conv_matches_flax_conv_and_its_gradients(channels, padding):
    x = normal((4, 11, 10, channels))
    ours, reference = Conv(5, padding=padding), nn.Conv(5, (3, 3), padding=padding)
    params = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, reference.init(jax.random.key(1), x)
    )

    assert_same_values_and_gradients(ours, reference, params, x)


@pytest.mark.parametrize("shape", [(2, 26, 26, 3), (2, 7, 9, 4)])
def test_max_pool_matches_flax_max_pool(shape):
    x = normal(shape)
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))
    grads = jax.jit(jax.grad(lambda x: jnp.sum(max_pool_2x2(x) ** 2)))(x)
    expected = jax.jit(jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), (2, 2)) ** 2)))(x)
    np.testing.assert_allclose(grads, expected, atol=1e-6)


def test_conv_rejects_unknown_padding():
    with pytest.raises(ValueError, match="padding"):
        Conv(2, padding="FULL").init(jax.random.key(0), jnp.zeros((1, 5, 5, 1)))


def conv_relu_pool_reference(x, kernel, bias, padding):
    y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return nn.max_pool(nn.relu(y + bias), (2, 2), (2, 2))


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape, padding, features, kernel_size",
    [
        ((3, 28, 28, 1), "VALID", 32, (3, 3)),
        ((2, 11, 10, 3), "VALID", 5, (3, 3)),
        ((2, 9, 12, 2), "SAME", 4, (3, 3)),
        ((2, 8, 11, 1), "VALID", 3, (2, 4)),  # Even sizes: windows of 3 and 5 taps.
    ],
)
def test_conv_relu_max_pool_matches_lax_conv_and_max_pool(shape, padding, features, kernel_size):
    x = normal(shape, seed=0)
    kernel = normal((*kernel_size, shape[-1], features), seed=1)
    bias = 0.5 * normal((features,), seed=2)
    layer = ConvReluMaxPool(features, kernel_size, padding=padding)
    params = {"params": {"kernel": kernel, "bias": bias}}
    want = conv_relu_pool_reference(x, kernel, bias, padding)
    np.testing.assert_allclose(layer.apply(params, x), want, atol=1e-5)
    np.testing.assert_allclose(jax.jit(layer.apply)(params, x), want, atol=1e-5)

    weights = normal(want.shape, seed=3)
    grads = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) * weights), argnums=(0, 1)))(
        params, x
    )
    expected = jax.jit(
        jax.grad(
            lambda p, x: jnp.sum(
                conv_relu_pool_reference(x, **p["params"], padding=padding) * weights
            ),
            argnums=(0, 1),
        )
    )(params, x)
    for got, wanted in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, wanted, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_conv_relu_max_pool_gradient_goes_to_the_first_of_tied_maxima():
    # Blank regions (MNIST's background) tie all four conv outputs of a window at the bias.
    x = (
        jnp.zeros((2, 12, 12, 1))
        .at[:, 6:, 3:9]
        .set(jax.random.uniform(jax.random.key(0), (2, 6, 6, 1)))
    )
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 4))
    bias = jnp.array([0.1, -0.1, 0.2, 0.0])
    loss = lambda f: lambda x, k, b: jnp.sum(f(x, k, b) ** 2)  # noqa: E731
    got = jax.jit(jax.grad(loss(conv_relu_max_pool), argnums=(0, 1, 2)))(x, kernel, bias)
    want = jax.jit(
        jax.grad(
            loss(lambda x, k, b: conv_relu_pool_reference(x, k, b, "VALID")), argnums=(0, 1, 2)
        )
    )(x, kernel, bias)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)  # Bias sums differ in order.


@pytest.mark.parametrize("shape", [(4, 13, 13, 32), (3, 2, 5, 7)])
def test_flatten_dense_matches_flatten_then_dense_and_its_gradients(shape):
    x = normal(shape)
    ours, reference = FlattenDense(10), nn.Dense(10)
    params = ours.init(jax.random.key(1), x)
    flat = x.reshape(shape[0], -1)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, reference.init(jax.random.key(1), flat)
    )
    params = jax.tree.map(lambda p: p + 0.1, params)  # A nonzero bias.
    weights = normal((shape[0], 10), seed=2)

    def loss(params, x, module=ours):
        return jnp.sum(module.apply(params, x) * weights)

    want = reference.apply(params, flat)
    np.testing.assert_allclose(ours.apply(params, x), want, atol=1e-4)
    np.testing.assert_allclose(jax.jit(ours.apply)(params, x), want, atol=1e-4)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    expected = jax.jit(
        jax.grad(lambda p, x: loss(p, x.reshape(shape[0], -1), reference), argnums=(0, 1))
    )(params, x)
    for got, wanted in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, wanted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "layer",
    [
        pytest.param(ConvReluMaxPool(6, (3, 3), padding="VALID"), marks=pytest.mark.slow),
        FlattenDense(7),
    ],
)
def test_fused_layers_and_their_fallback_share_parameters_outputs_and_gradients(layer):
    x = normal((3, 9, 8, 2))
    fused, plain = layer.clone(fused=True), layer.clone(fused=False)
    params = fused.init(jax.random.key(1), x)
    # Identical trees and values: a checkpoint written by one restores into the other.
    jax.tree.map(np.testing.assert_array_equal, params, plain.init(jax.random.key(1), x))
    params = jax.tree.map(lambda p: p + 0.1, params)  # A nonzero bias.

    assert_same_values_and_gradients(fused, plain, params, x)


def test_fused_layers_run_on_cpu_by_default():
    assert fused_layers_win() == (jax.default_backend() == "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False])
def test_seed_cnn_computes_in_its_dtype_with_float32_parameters(fused):
    x = jnp.asarray(np.random.default_rng(0).random((2, 28, 28, 1), np.float32))
    model = SeedCNN(dtype=jnp.bfloat16)
    params = jax.jit(model.init)(jax.random.key(1), x)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    with unittest.mock.patch.object(kernels, "fused_layers_win", lambda: fused):
        # A function of its own, traced under this patch (no trace cached from the other).
        apply = jax.jit(lambda params, x: model.apply(params, x))
        logits = apply(params, x)
        hlo = apply.lower(params, x).as_text()
    assert logits.dtype == jnp.float32  # Cast back for the loss.
    assert "bf16" in hlo
    want = jax.jit(SeedCNN().apply)(params, x)
    np.testing.assert_allclose(logits, want, atol=0.05, rtol=0.05)
    for layer in (ConvReluMaxPool(3), FlattenDense(4)):  # Each layer computes in bfloat16.
        layer = layer.clone(dtype=jnp.bfloat16, fused=fused)
        out, _ = layer.init_with_output(jax.random.key(0), jnp.ones((2, 6, 6, 1)))
        assert out.dtype == jnp.bfloat16, layer


@pytest.mark.parametrize(
    "kernel_size, use_bias, channels, features",
    [
        (2, True, 3, 4),
        pytest.param(3, True, 3, 4, marks=pytest.mark.slow),
        (4, False, 3, 4),
        pytest.param(5, True, 3, 4, marks=pytest.mark.slow),
        # Wider windows than MAX_SUBPIXEL_PATCH: convolution routes.
        (4, True, 30, 4),  # One convolution to the four phases.
        pytest.param(3, True, 70, 16, marks=pytest.mark.slow),  # One per phase.
        pytest.param(5, False, 30, 16, marks=pytest.mark.slow),
    ],
)
def test_conv_transpose_2x_is_flax_conv_transpose_with_its_gradients(
    kernel_size, use_bias, channels, features, monkeypatch
):
    # Its own routes, which run wherever oneDNN does not convolve.
    monkeypatch.setattr(cpu_rewrite, "convolutions_by_onednn", lambda: False)
    x = normal((2, 5, 6, channels), seed=1)
    reference = nn.ConvTranspose(features, (kernel_size,) * 2, (2, 2), use_bias=use_bias)
    ours = ConvTranspose2x(features, kernel_size, use_bias=use_bias)
    variables = jax.tree.map(lambda v: v + 0.1, reference.init(jax.random.key(0), x))
    jax.tree.map(  # The same parameters from the same key.
        np.testing.assert_array_equal,
        ours.init(jax.random.key(0), x),
        reference.init(jax.random.key(0), x),
    )

    def loss(module, variables, x):
        return jnp.sum(jnp.sin(module.apply(variables, x)))

    want = reference.apply(variables, x)
    assert want.shape == (2, 10, 12, features)
    np.testing.assert_allclose(ours.apply(variables, x), want, atol=1e-5)
    grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    grads, expected = grad(ours, variables, x), grad(reference, variables, x)
    for got, wanted in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, wanted, atol=1e-4, rtol=1e-4)
