"""oneDNN's convolutions inside XLA:CPU programs: `rewrite`'s rule for `nn.Conv`.

XLA:CPU's own 2-D convolution kernels run a training step's convolutions (forward, input
gradient, kernel gradient) 1.3-2.5x slower than oneDNN's on the same shapes, the kernels
TensorFlow and PyTorch call on CPUs. In bfloat16 (`compute_dtype="bfloat16"`) on a CPU with
bfloat16 instructions (AMX, AVX-512 BF16), oneDNN's make a small ResNet's training step 1.9x
faster than in float32 (docs/cifar10.md). `onednn_conv.cc` wraps oneDNN's primitives as XLA FFI
handlers; on x86-64 Linux they are compiled when the package is built (setup.py, against
jaxlib's FFI headers and oneDNN's), so nothing is compiled where it runs. On first use the
library of the `onednn-cpu-gomp` package and the handlers are loaded and registered with
XLA. Where the handlers were not built (an install without a C++ compiler) or cannot load,
`available()` is False, one warning says why, and convolutions stay XLA's. Elsewhere (no
oneDNN package exists there) convolutions are XLA's, silently.
"""

import ctypes
import functools
import importlib.metadata
import importlib.util
import logging
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HANDLERS = ("forward", "backward_data", "backward_weights")  # flaxcnn_conv_<name> in the .cc.
LAYOUT = ("NHWC", "HWIO", "NHWC")  # flax.linen's, and the only one the handlers take.
LIBRARY_MODULE = "flaxcnn.cpu._onednn_conv"  # setup.py's name for the built handlers.


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


def library_path() -> Path:
    """The handlers' shared library built with the package."""
    spec = importlib.util.find_spec(LIBRARY_MODULE)
    if spec is None or spec.origin is None:
        raise Unavailable(
            "this install of flaxcnn has no oneDNN handlers (its build had no C++ compiler: "
            "reinstall it where g++ exists, e.g. pip install --force-reinstall --no-deps flaxcnn)"
        )
    return Path(spec.origin)


def load_handlers() -> ctypes.CDLL:
    """The handlers' library, after oneDNN's, which it finds by its soname."""
    path = library_path()  # First: without handlers, oneDNN's library is not needed.
    onednn = _package_file("onednn-cpu-gomp", "libdnnl.so.3")
    ctypes.CDLL(str(onednn), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(str(path))


@functools.cache
def available() -> bool:
    """Whether the handlers are loaded and registered with XLA:CPU (once per process). False
    without a word where no oneDNN package exists (only x86-64 Linux has one)."""
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        return False
    try:
        library = load_handlers()
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


# CPU flags (Linux's /proc/cpuinfo names) of the instructions oneDNN's bfloat16 kernels run on.
BFLOAT16_FLAGS = {"amx_bf16", "avx512_bf16"}


@functools.cache
def bfloat16_native() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX or AVX-512 BF16), which oneDNN's
    bfloat16 convolutions need to pay; elsewhere they would be emulated, and XLA keeps them."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return False
    return not BFLOAT16_FLAGS.isdisjoint(flags.split())


def dtypes() -> tuple:
    """The element types the handlers take here: float32, and bfloat16 where native."""
    return (jnp.float32, jnp.bfloat16) if bfloat16_native() else (jnp.float32,)


def _like(shape: tuple[int, ...], like: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, like.dtype)


# The convolution y = conv(x, w) is bilinear, so each of its three operations (forward,
# input gradient, kernel gradient) is differentiated by the other two: oneDNN computes
# gradients of every order (a gradient penalty, a Hessian-vector product).


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x: jax.Array, w: jax.Array, geometry: Geometry) -> jax.Array:
    """`reference(x, w, geometry)` by oneDNN: x (N, H, W, C) and w (KH, KW, C, O) both float32
    or both bfloat16; `geometry` is (strides, ((lo, hi), (lo, hi)) padding, kernel dilation)."""
    out = jax.eval_shape(functools.partial(reference, geometry=geometry), x, w)
    return _call("forward", out, x, w, geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def input_gradient(dy: jax.Array, w: jax.Array, x_shape: tuple, geometry: Geometry):
    """The gradient `conv(x, w, geometry)` sends its input x (of `x_shape`) from dy: also
    the transposed convolution of dy."""
    return _call("backward_data", _like(x_shape, dy), dy, w, geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def kernel_gradient(x: jax.Array, dy: jax.Array, w_shape: tuple, geometry: Geometry):
    """The gradient `conv(x, w, geometry)` sends its kernel w (of `w_shape`) from dy."""
    return _call("backward_weights", _like(w_shape, dy), x, dy, geometry)


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
    flax.linen's layout, a type of `dtypes()`, no feature groups; an input dilation
    only as `nn.ConvTranspose` has it, with stride 1), else None. Where it applies is
    `rewrite.convolutions_by_onednn`'s to say."""
    padding = tuple(map(tuple, padding))
    transposed = any(s != 1 for s in lhs_dilation)
    supported = (
        dimension_numbers == _LAYOUT_NUMBERS
        and lhs.dtype == rhs.dtype
        and lhs.dtype in dtypes()
        and preferred_element_type in (None, lhs.dtype)
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
