"""oneDNN's convolutions inside XLA:CPU programs: `fast_cpu`'s rule for `nn.Conv`.

XLA:CPU's own 2-D convolution kernels run a training step's convolutions (forward, input
gradient, kernel gradient) 1.3-2.5x slower than oneDNN's on the same shapes, the kernels
TensorFlow and PyTorch call on CPUs. `onednn_conv.cc` wraps oneDNN's primitives as XLA FFI
handlers. On first use it is compiled with the machine's C++ compiler ($CXX, else g++)
against jaxlib's FFI headers and the oneDNN of the `onednn-devel-cpu-gomp` package (a
dependency on x86-64 Linux), kept under FLAXCNN_CACHE_DIR (default ~/.cache/flaxcnn) for
later runs, and registered with XLA. Where any of that fails, `available()` is False, one
warning says why, and convolutions stay XLA's.
"""

import functools
import hashlib
import importlib.metadata
import logging
import os
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
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, *flags, str(SOURCE), "-o", str(built), *links]
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Unavailable(f"cannot run {compiler}: {e}") from None
        if run.returncode != 0:
            errors = [line for line in run.stderr.splitlines() if "error" in line]
            raise Unavailable(f"{compiler} failed: {(errors or [run.stderr.strip()])[0]}")
        os.replace(built, target)  # Atomic: a concurrent run sees no half-written library.
    return target


@functools.cache
def available() -> bool:
    """Whether the handlers are built and registered with XLA:CPU (once per process)."""
    import ctypes

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
    strides, padding, dilation = geometry
    return jax.ffi.ffi_call(f"flaxcnn_conv_{name}", out, vmap_method="sequential")(
        a,
        b,
        strides=np.array(strides, np.int64),
        dilation=np.array(dilation, np.int64),
        padding=np.array(padding, np.int64).reshape(-1),
    )


def _out_shape(x, w, geometry: Geometry) -> jax.ShapeDtypeStruct:
    return jax.eval_shape(functools.partial(reference, geometry=geometry), x, w)


def reference(x: jax.Array, w: jax.Array, geometry: Geometry) -> jax.Array:
    """The same convolution as XLA computes it."""
    strides, padding, dilation = geometry
    return lax.conv_general_dilated(
        x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=LAYOUT
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x: jax.Array, w: jax.Array, geometry: Geometry) -> jax.Array:
    """`reference(x, w, geometry)` by oneDNN: x (N, H, W, C) and w (KH, KW, C, O) float32;
    `geometry` is (strides, ((lo, hi), (lo, hi)) padding, kernel dilation)."""
    return _call("forward", _out_shape(x, w, geometry), x, w, geometry)


def _conv_fwd(x, w, geometry):
    return conv(x, w, geometry), (x, w)


def _conv_bwd(geometry, residuals, dy):
    x, w = residuals
    return _gradients(x, w, dy, geometry)


conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gradients(x, w, dy, geometry):
    """The input's and the kernel's gradients by oneDNN; differentiated (a gradient
    penalty, a Hessian-vector product) as XLA's reference is."""
    dx = _call("backward_data", jax.ShapeDtypeStruct(x.shape, x.dtype), dy, w, geometry)
    dw = _call("backward_weights", jax.ShapeDtypeStruct(w.shape, w.dtype), x, dy, geometry)
    return dx, dw


def _reference_gradients(x, w, dy, geometry):
    return jax.vjp(lambda x, w: reference(x, w, geometry), x, w)[1](dy)


def _gradients_fwd(x, w, dy, geometry):
    return _gradients(x, w, dy, geometry), (x, w, dy)


def _gradients_bwd(geometry, residuals, cotangents):
    return jax.vjp(functools.partial(_reference_gradients, geometry=geometry), *residuals)[1](
        cotangents
    )


_gradients.defvjp(_gradients_fwd, _gradients_bwd)

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
    """`conv` for a `lax.conv_general_dilated` that oneDNN's handlers compute as it is (2-D,
    flax.linen's layout, float32, no input dilation or feature groups), else None. Only on
    one device: XLA would run a custom call on the whole batch on every device."""
    supported = (
        jax.device_count() == 1
        and dimension_numbers == _LAYOUT_NUMBERS
        and lhs.dtype == rhs.dtype == jnp.float32
        and preferred_element_type in (None, jnp.float32)
        and all(d == 1 for d in lhs_dilation)
        and feature_group_count == batch_group_count == 1
        and all(lo >= 0 and hi >= 0 for lo, hi in padding)
        and 0 not in (*lhs.shape, *rhs.shape)
    )
    geometry = (tuple(window_strides), tuple(map(tuple, padding)), tuple(rhs_dilation))
    if not supported or 0 in _out_shape(lhs, rhs, geometry).shape:
        return None
    return conv(lhs, rhs, geometry) if available() else None
