"""Builds oneDNN's convolution handlers (flaxcnn/cpu/onednn_conv.cc) into the package on
x86-64 Linux, against jaxlib's XLA FFI headers and oneDNN's (the build requirements in
pyproject.toml), so that nothing is compiled where the package runs. Elsewhere the package
is pure Python. The extension is optional: where it cannot be built the package installs
with XLA's own convolutions, and says so when it runs."""

import importlib.metadata
import platform
from pathlib import Path

from setuptools import Extension, setup


def _installed_file(distribution: str, suffix: str) -> Path:
    for file in importlib.metadata.distribution(distribution).files or []:
        if str(file).endswith(suffix):
            return Path(file.locate()).resolve()
    raise FileNotFoundError(f"the package {distribution} has no {suffix}")


def onednn_handlers() -> list[Extension]:
    """The handlers' shared library (loaded with ctypes, not imported), on x86-64 Linux."""
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        return []
    import jaxlib

    header = _installed_file("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")
    library = _installed_file("onednn-cpu-gomp", "libdnnl.so.3")
    return [
        Extension(
            "flaxcnn.cpu._onednn_conv",
            sources=["flaxcnn/cpu/onednn_conv.cc"],
            include_dirs=[str(Path(jaxlib.__file__).parent / "include"), str(header.parents[2])],
            library_dirs=[str(library.parent)],
            # oneDNN is found by its soname at run time: onednn_conv loads the user's first.
            extra_link_args=["-l:libdnnl.so.3", "-s"],
            extra_compile_args=["-O2", "-std=c++17"],
            language="c++",
            optional=True,
        )
    ]


setup(ext_modules=onednn_handlers())
