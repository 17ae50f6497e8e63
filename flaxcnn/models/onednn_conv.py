"""oneDNN's convolutions inside XLA:CPU programs: `fast_cpu`'s rule for `nn.Conv`.

XLA:CPU's own 2-D convolution kernels run a training step's convolutions (forward, input
gradient, kernel gradient) 1.3-2.5x slower than oneDNN's on the same shapes, the kernels
TensorFlow and PyTorch call on CPUs. `onednn_conv.cc` wraps oneDNN's primitives as XLA FFI
handlers. On first use it is compiled with the machine's C++ compiler ($CXX, else g++)
against jaxlib's FFI headers and the oneDNN of the `onednn-devel-cpu-gomp` package (a
dependency on x86-64 Linux), kept under FLAXCNN_CACHE_DIR (default ~/.cache/flaxcnn) for
later runs, and registered with XLA. Where any of that fails, `available()` is False, one
warning says why, and convolutions stay XLA's; a failed build is remembered beside it and
not tried again. Elsewhere (no oneDNN package exists there) convolutions are XLA's, silently.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

SOURCE = Path(__file__).with_suffix(".cc")
HANDLERS = ("forward", "backward_data", "backward_weights")  # flaxcnn_conv_<name> in SOURCE.
LAYOUT = ("NHWC", "HWIO", "NHWC")  # flax.linen's, and the only one the handlers take.
BUILD_TIMEOUT_S = 300


class Unavailable(RuntimeError):
    """Why the oneDNN convolutions cannot be used on this machine."""


def _package_file(distribution: str, suffix: str) -> Path:
    """The installed file of `distribution` whose path ends with `suffix`."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise Unavailable(f"the package {distribution} is not installed") from None
    for file in files:
        if str(file).endswith(suffix):
            return Path(file.locate()).resolve()
    raise Unavailable(f"the package {distribution} has no {suffix}")


def cache_dir() -> Path:
    """Where built handlers are kept: FLAXCNN_CACHE_DIR, else the user's cache."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flaxcnn"
    return Path(os.environ.get("FLAXCNN_CACHE_DIR", default))


def build() -> Path:
    """The compiled handlers for this source, jaxlib and oneDNN: built once, then reused."""
    header = _package_file("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")
    library = _package_file("onednn-cpu-gomp", "libdnnl.so.3")
    includes, lib_dir = [jax.ffi.include_dir(), str(header.parents[2])], str(library.parent)
    compiler = os.environ.get("CXX", "g++")
    flags = ["-O2", "-std=c++17", "-shared", "-fPIC", *(f"-I{d}" for d in includes)]
    links = [f"-L{lib_dir}", "-l:libdnnl.so.3", f"-Wl,-rpath,{lib_dir}"]
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), jaxlib.__version__, compiler, *flags, *links]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"onednn_conv-{key}.so"
    failed = target.with_suffix(".failed")  # Why this build failed: not tried again.
    if target.exists():
        return target
    if failed.exists():
        raise Unavailable(f"{failed.read_text().strip()} (remembered in {failed})")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, *flags, str(SOURCE), "-o", str(built), *links]
        try:
            _compile(command, compiler)
        except Unavailable as e:
            failed.write_text(str(e))
            raise
        os.replace(built, target)  # Atomic: a concurrent run sees no half-written library.
    return target


def _compile(command: list[str], compiler: str) -> None:
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f"cannot run {compiler}: {e}") from None
    if run.returncode != 0:
        errors = [line for line in run.stderr.splitlines() if "error" in line]
        raise Unavailable(f"{compiler} failed: {(errors or [run.stderr.strip()])[0]}")


@functools.cache
def available() -> bool:
    """Whether the handlers are built and registered with XLA:CPU (once per process). False
    without a word where no oneDNN package exists (only x86-64 Linux has one)."""
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        return False
    try:
        library = ctypes.CDLL(str(build()))
    except (Unavailable, OSError) as e:
        logging.warning("oneDNN convolutions unavailable, XLA's are used: %s", e)
        return False
    for name in HANDLERS:
        handler = jax.ffi.pycapsule(getattr(library, f"flaxcnn_conv_{name}"))
        jax.ffi.register_ffi_target(f"flaxcnn_conv_{name}", handler, platform="cpu")
    return True


Geometry = tuple[tuple[int, ...], tuple[tuple[int, int], ...], tuple[int, ...]]


def _call(name: str, out: jax.ShapeDtypeStruct, a, b, geometry: Geometry) -> jax.Array:
    if not available():
        raise Unavailable("oneDNN's convolutions are not available here: see the warning")
    strides, padding, dilation = geometry
    return jax.ffi.ffi_call(f"flaxcnn_conv_{name}", out, vmap_method="sequential")(
        a,
        b,
        strides=np.array(strides, np.int64),
        dilation=np.array(dilation, np.int64),
        padding=np.array(padding, np.int64).reshape(-1),
    )


def reference(x: jax.Array, w: jax.Array, geometry: Geometry) -> jax.Array:
    """The same convolution as XLA computes it."""
    strides, padding, dilation = geometry
    return lax.conv_general_dilated(
        x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=LAYOUT
    )


def _like(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


# The convolution y = conv(x, w) is bilinear, so each of its three operations (forward,
# input gradient, kernel gradient) is differentiated by the other two: oneDNN computes
# gradients of every order (a gradient penalty, a Hessian-vector product).


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x: jax.Array, w: jax.Array, geometry: Geometry) -> jax.Array:
    """`reference(x, w, geometry)` by oneDNN: x (N, H, W, C) and w (KH, KW, C, O) float32;
    `geometry` is (strides, ((lo, hi), (lo, hi)) padding, kernel dilation)."""
    out = jax.eval_shape(functools.partial(reference, geometry=geometry), x, w)
    return _call("forward", out, x, w, geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def input_gradient(dy: jax.Array, w: jax.Array, x_shape: tuple, geometry: Geometry):
    """The gradient `conv(x, w, geometry)` sends its input x (of `x_shape`) from dy: also
    the transposed convolution of dy."""
    return _call("backward_data", _like(x_shape), dy, w, geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def kernel_gradient(x: jax.Array, dy: jax.Array, w_shape: tuple, geometry: Geometry):
    """The gradient `conv(x, w, geometry)` sends its kernel w (of `w_shape`) from dy."""
    return _call("backward_weights", _like(w_shape), x, dy, geometry)


def _conv_bwd(geometry, residuals, dy):
    x, w = residuals
    return input_gradient(dy, w, x.shape, geometry), kernel_gradient(x, dy, w.shape, geometry)


def _input_gradient_bwd(x_shape, geometry, residuals, dx):
    dy, w = residuals
    return conv(dx, w, geometry), kernel_gradient(dx, dy, w.shape, geometry)


def _kernel_gradient_bwd(w_shape, geometry, residuals, dw):
    x, dy = residuals
    return input_gradient(dy, dw, x.shape, geometry), conv(x, dw, geometry)


def _saving_inputs(fn):
    def fwd(*args):
        return fn(*args), args[:2]

    return fwd


conv.defvjp(_saving_inputs(conv), _conv_bwd)
input_gradient.defvjp(_saving_inputs(input_gradient), _input_gradient_bwd)
kernel_gradient.defvjp(_saving_inputs(kernel_gradient), _kernel_gradient_bwd)


def _transposed(u, k, padding, dilation, lhs_dilation) -> jax.Array | None:
    """The input-dilated convolution `nn.ConvTranspose` computes (u (N, h, w, C), kernel k
    (KH, KW, C, O), stride 1, input dilation s) as the input gradient of a stride-s
    convolution with the flipped kernel from (N, H, W, O), or None where its padding has no
    such form (more than the dilated kernel's extent less one on a side)."""
    extents = [(size - 1) * d + 1 for size, d in zip(k.shape[:2], dilation)]
    if not all(0 <= p <= e - 1 for pair, e in zip(padding, extents) for p in pair):
        return None
    geometry = (
        tuple(lhs_dilation),
        tuple((e - 1 - lo, e - 1 - hi) for (lo, hi), e in zip(padding, extents)),
        tuple(dilation),
    )
    x_shape = jax.eval_shape(
        lambda u, k: lax.conv_general_dilated(
            u, k, (1, 1), padding, lhs_dilation, dilation, dimension_numbers=LAYOUT
        ),
        u,
        k,
    ).shape
    if 0 in x_shape:
        return None
    flipped = jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)
    return input_gradient(u, flipped, x_shape, geometry)


_LAYOUT_NUMBERS = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, LAYOUT)


def conv_rule(
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
    preferred_element_type,
    **_,
):
    """oneDNN's computation of a `lax.conv_general_dilated` that its handlers take (2-D,
    flax.linen's layout, float32, no feature groups; an input dilation only as
    `nn.ConvTranspose` has it, with stride 1), else None. Where it applies is
    `fast_cpu.convolutions_by_onednn`'s to say."""
    padding = tuple(map(tuple, padding))
    transposed = any(s != 1 for s in lhs_dilation)
    supported = (
        dimension_numbers == _LAYOUT_NUMBERS
        and lhs.dtype == rhs.dtype == jnp.float32
        and preferred_element_type in (None, jnp.float32)
        and feature_group_count == batch_group_count == 1
        and not (transposed and any(s != 1 for s in window_strides))
        and 0 not in (*lhs.shape, *rhs.shape)
    )
    if not supported:
        return None
    if transposed:
        return _transposed(lhs, rhs, padding, rhs_dilation, lhs_dilation)
    geometry = (tuple(window_strides), padding, tuple(rhs_dilation))
    out = jax.eval_shape(functools.partial(reference, geometry=geometry), lhs, rhs)
    if any(p < 0 for pair in padding for p in pair) or 0 in out.shape:
        return None
    return conv(lhs, rhs, geometry)
