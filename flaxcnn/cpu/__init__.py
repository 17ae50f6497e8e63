"""The CPU backend, in one package: oneDNN's convolutions as XLA FFI handlers
(`onednn_conv`, + `.cc`), the rewrite that runs standard layers on them and the compiler
options (`rewrite`), the fused layers' custom-gradient kernels (`kernels`, which
flaxcnn/models/layers.py wraps as Flax modules), and the heuristics that choose by backend.
Besides `kernels`, the rest of flaxcnn calls only this interface:

    for_this_backend(apply_fn)          the model's apply, fast on CPUs (unchanged elsewhere)
    compile_for_this_backend(lowered)   a lowered step compiled with the CPU's options
    standard_layers()                   a context without the rewrite (exports run anywhere)
    onednn_here(), convolutions_by_onednn()   what runs the convolutions here
    classifier_microbatch_size()        a classifier's microbatch on this backend
"""

from flaxcnn.cpu.rewrite import (
    compile_for_this_backend,
    convolutions_by_onednn,
    for_this_backend,
    onednn_here,
    standard_layers,
)

__all__ = [
    "classifier_microbatch_size",
    "compile_for_this_backend",
    "convolutions_by_onednn",
    "for_this_backend",
    "onednn_here",
    "standard_layers",
]

# Without oneDNN's convolutions, microbatches of 32 keep XLA's own convolutions' working set
# in cache; oneDNN's train faster on whole batches (batch 128: 1.05-1.22x the examples/s of
# microbatches of 32, on four models).
XLA_CONV_MICROBATCH = 32


def classifier_microbatch_size() -> int:
    """The microbatch a classifier's step takes on a CPU when the config says -1: 0 (the
    whole batch) with oneDNN's convolutions, XLA_CONV_MICROBATCH without. The choice does not
    depend on the device count, so a model with batch norm trains alike on 1 device or 8."""
    return 0 if onednn_here() else XLA_CONV_MICROBATCH
