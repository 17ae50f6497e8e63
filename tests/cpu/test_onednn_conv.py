"""flaxcnn.cpu.onednn_conv: oneDNN's convolutions equal XLA's (values, both gradients,
second derivatives, under vmap), reach a plain `nn.Conv`, and step aside where they cannot."""

import functools
import logging
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from flaxcnn.cpu import onednn_conv
from flaxcnn.cpu import rewrite as cpu_rewrite


@pytest.fixture(autouse=True)
def onednn_applies_here(platform_skip):
    if (platform.system(), platform.machine()) != ("Linux", "x86_64") or jax.device_count() > 1:
        pytest.skip(
            platform_skip + "oneDNN's convolutions are a dependency on x86-64 Linux only, used "
            "on one device"
        )


# (x shape, kernel shape, strides, padding, dilation): 'SAME' and 'VALID' 3x3 layers, one
# input channel, strides with uneven padding, a dilated rectangular kernel, batch 1.
GEOMETRIES = [
    ((4, 12, 12, 3), (3, 3, 3, 8), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((3, 13, 11, 1), (3, 3, 1, 5), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    ((2, 15, 16, 4), (3, 3, 4, 6), (2, 2), ((1, 0), (1, 2)), (1, 1)),
    ((1, 20, 17, 5), (5, 3, 5, 7), (2, 1), ((2, 2), (0, 1)), (2, 1)),
]


def random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def close(got, want):
    """Equal up to float32 summation order, relative to the largest value."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=2e-5 * float(jnp.max(jnp.abs(w))), rtol=0)


def test_built_and_registered_here():
    assert onednn_conv.available()


@pytest.mark.parametrize("x_shape, w_shape, strides, padding, dilation", GEOMETRIES)
def test_values_and_gradients_equal_xlas(x_shape, w_shape, strides, padding, dilation):
    geometry = (strides, padding, dilation)
    x, w = random(x_shape, 0), random(w_shape, 1)
    target = random(
        jax.eval_shape(functools.partial(onednn_conv.reference, geometry=geometry), x, w).shape, 2
    )

    def loss(conv):
        return jax.jit(
            jax.value_and_grad(lambda x, w: jnp.sum(conv(x, w, geometry) * target), (0, 1))
        )

    close(loss(onednn_conv.conv)(x, w), loss(onednn_conv.reference)(x, w))
    assert "flaxcnn_conv_backward_weights" in loss(onednn_conv.conv).lower(x, w).as_text()


def test_bfloat16_values_and_gradients_equal_xlas_up_to_its_rounding(platform_skip):
    # Both read bfloat16, accumulate in float32 and round each result to bfloat16.
    if not onednn_conv.bfloat16_native():
        pytest.skip(platform_skip + "a CPU without bfloat16 instructions keeps XLA's")
    geometry = ((1, 1), ((1, 1), (1, 1)), (1, 1))
    x = random((4, 12, 12, 24), 0).astype(jnp.bfloat16)
    w = (0.1 * random((3, 3, 24, 40), 1)).astype(jnp.bfloat16)
    target = random((4, 12, 12, 40), 2)

    def loss(conv):
        def weighted(x, w):
            return jnp.sum(conv(x, w, geometry).astype(jnp.float32) * target)

        return jax.jit(jax.value_and_grad(weighted, (0, 1)))

    ours, xlas = loss(onednn_conv.conv), loss(onednn_conv.reference)
    for got, want in zip(jax.tree.leaves(ours(x, w)), jax.tree.leaves(xlas(x, w)), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, atol=1e-2 * np.max(np.abs(want)), rtol=0)
    text = ours.lower(x, w).as_text()
    assert "flaxcnn_conv_backward_weights" in text and "convolution(" not in text


def test_the_handlers_refuse_mixed_or_other_types():
    geometry = ((1, 1), ((1, 1), (1, 1)), (1, 1))
    x, w = random((1, 5, 5, 2), 0), random((3, 3, 2, 3), 1)
    out = jax.ShapeDtypeStruct((1, 5, 5, 3), jnp.float32)
    for x_, w_ in ((x, w.astype(jnp.bfloat16)), (x.astype(jnp.float16), w.astype(jnp.float16))):
        with pytest.raises(jax.errors.JaxRuntimeError, match="all be float32 or all bfloat16"):
            jax.block_until_ready(onednn_conv._call("forward", out, x_, w_, geometry))


def test_second_derivatives_and_vmap_equal_xlas():
    geometry = ((2, 1), ((1, 2), (1, 1)), (1, 1))
    x, w = random((3, 9, 8, 2), 3), random((3, 3, 2, 4), 4)

    def penalty(conv):  # A gradient penalty: the norm of the input gradient, differentiated.
        def norm(x, w):
            dx = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, w, geometry))))(x)
            return jnp.sum(dx**2)

        return jax.jit(jax.grad(norm, (0, 1)))

    ours, xlas = penalty(onednn_conv.conv), penalty(onednn_conv.reference)
    close(ours(x, w), xlas(x, w))
    assert "convolution" in xlas.lower(x, w).as_text()
    assert "convolution" not in ours.lower(x, w).as_text()  # Every order by oneDNN.
    xs = random((2, 3, 9, 8, 2), 5)
    vmapped = [
        jax.vmap(functools.partial(f, w=w, geometry=geometry))(xs)
        for f in (onednn_conv.conv, onednn_conv.reference)
    ]
    close(*vmapped)


def test_threads_running_convolutions_at_once_get_their_own_results():
    # XLA runs independent custom calls on several threads; oneDNN's scratch memory must
    # not be shared between them.
    geometry = ((1, 1), ((1, 1), (1, 1)), (1, 1))
    xs = [random((8, 16, 16, c), c) for c in (3, 4, 5, 6)]
    ws = [random((3, 3, c, 16), 10 + c) for c in (3, 4, 5, 6)]

    def all_of(conv):
        return jax.jit(lambda xs, ws: [conv(x, w, geometry) for x, w in zip(xs, ws)])

    want = all_of(onednn_conv.reference)(xs, ws)
    for _ in range(10):
        close(all_of(onednn_conv.conv)(xs, ws), want)


def compiled_text(module: nn.Module, x) -> str:
    variables = module.init(jax.random.key(0), x)
    return jax.jit(cpu_rewrite.rewrite(module.apply)).lower(variables, x).compile().as_text()


def test_a_plain_conv_layer_runs_on_onednn_and_others_stay_xlas(monkeypatch):
    x = random((2, 10, 10, 3), 6)
    assert "flaxcnn_conv_forward" in compiled_text(nn.Conv(8, (3, 3)), x)
    bfloat16 = nn.Conv(8, (3, 3), dtype=jnp.bfloat16)
    if onednn_conv.bfloat16_native():
        assert "flaxcnn_conv_forward" in compiled_text(bfloat16, x)
    with monkeypatch.context() as no_bfloat16_instructions:
        no_bfloat16_instructions.setattr(onednn_conv, "bfloat16_native", lambda: False)
        assert "flaxcnn_conv" not in compiled_text(bfloat16, x)
    with monkeypatch.context() as switched_off:
        switched_off.setenv(cpu_rewrite.ONEDNN_SWITCH, "0")
        assert "flaxcnn_conv" not in compiled_text(nn.Conv(8, (3, 3)), x)
    unsupported = {
        "feature groups": (nn.Conv(6, (3, 3), feature_group_count=3), x),
        "float16": (nn.Conv(8, (3, 3), dtype=jnp.float16), x),
        "1-D": (nn.Conv(8, (3,)), x[:, 0]),
    }
    for name, (module, inputs) in unsupported.items():
        text = compiled_text(module, inputs)
        assert "flaxcnn_conv" not in text and "convolution" in text, name


@pytest.mark.parametrize(
    "kernel, strides, padding",
    [
        ((4, 4), (2, 2), "SAME"),
        ((3, 3), (2, 2), "SAME"),
        ((3, 2), (3, 2), "VALID"),
        ((5, 5), (2, 2), ((1, 2), (2, 1))),
    ],
)
def test_transposed_convolutions_equal_the_standard_layer(kernel, strides, padding):
    module = nn.ConvTranspose(5, kernel, strides=strides, padding=padding)
    x = random((3, 7, 6, 4), 7)
    variables = module.init(jax.random.key(0), x)
    target = random(module.apply(variables, x).shape, 8)

    def grads(apply):
        def loss(variables, x):
            return jnp.sum(apply(variables, x) * target)

        return jax.jit(jax.value_and_grad(loss, (0, 1)))

    close(grads(cpu_rewrite.rewrite(module.apply))(variables, x), grads(module.apply)(variables, x))
    text = grads(cpu_rewrite.rewrite(module.apply)).lower(variables, x).compile().as_text()
    assert "flaxcnn_conv_backward_data" in text and "convolution(" not in text


def test_an_install_without_handlers_keeps_xlas_convolutions_and_a_warning_says_why(
    monkeypatch, caplog
):
    monkeypatch.setattr(onednn_conv, "LIBRARY_MODULE", "flaxcnn.models._no_such_handlers")
    with pytest.raises(onednn_conv.Unavailable, match="has no oneDNN handlers .*reinstall"):
        onednn_conv.load_handlers()
    with caplog.at_level(logging.WARNING):
        assert not onednn_conv.available.__wrapped__()
    assert "oneDNN convolutions unavailable, XLA's are used: this install" in caplog.text


def test_the_handlers_run_where_no_compiler_is_on_the_path(tmp_path):
    # Built with the package, not where it runs: a process whose PATH has no g++ uses them.
    code = (
        "import shutil, jax, numpy as np\n"
        "from flaxcnn.cpu import onednn_conv\n"
        "assert shutil.which('g++') is None and onednn_conv.available()\n"
        "x, w = np.ones((2, 6, 6, 3), np.float32), np.ones((3, 3, 3, 4), np.float32)\n"
        "g = ((1, 1), ((1, 1), (1, 1)), (1, 1))\n"
        "np.testing.assert_array_equal(onednn_conv.conv(x, w, g), onednn_conv.reference(x, w, g))\n"
    )
    env = {**os.environ, "PATH": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_where_no_onednn_exists_convolutions_are_xlas_without_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(onednn_conv.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(onednn_conv.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(onednn_conv, "load_handlers", lambda: pytest.fail("tried to load"))
    with caplog.at_level(logging.DEBUG):
        assert not onednn_conv.available.__wrapped__()
    assert caplog.text == ""
