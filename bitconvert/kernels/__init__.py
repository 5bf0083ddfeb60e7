"""Matrix products with packed ternary weights.

``ternary_linear`` is the one entry point: it quantizes activations to int8 per token and
multiplies them with 2-bit packed weights. CUDA tensors run Triton kernels (imported on first use,
so CPU-only installs need no triton); CPU tensors run torch, optionally keeping the unpacked weight
(``TernaryCache``). The decode step's attention has its own entry point,
:func:`bitconvert.kernels.attention.decode_attention`. See docs/kernels.md.
"""

from bitconvert.kernels.binary import binary_linear_reference, onebit_linear_reference
from bitconvert.kernels.reference import swiglu_reference, ternary_linear_reference
from bitconvert.kernels.ternary import (
    CPU_CACHES,
    TernaryCache,
    quantize_for_kernels,
    reference_kernels,
    rms_norm_quantize,
    rms_norm_quantize_op,
    rms_norm_quantize_reference,
    ternary_linear,
    ternary_linear_op,
    ternary_linear_quantized,
    ternary_linear_quantized_op,
    triton_available,
)


def binary_linear(x, packed, inv_scale, bias=None, *, granularity="tensor", group_size=128):
    """BitNet 1-bit weights packed 8 to a byte (see :mod:`bitconvert.quant.packing`)."""
    return binary_linear_reference(x, packed, inv_scale, bias, granularity=granularity, group_size=group_size)


def onebit_linear(x, packed, input_scale, output_scale, bias=None):
    """OneBit: sign matrix packed 8 to a byte plus the input and output scale vectors."""
    return onebit_linear_reference(x, packed, input_scale, output_scale, bias)


__all__ = ["CPU_CACHES", "TernaryCache", "binary_linear", "binary_linear_reference", "onebit_linear",
           "onebit_linear_reference", "quantize_for_kernels", "reference_kernels", "rms_norm_quantize", "rms_norm_quantize_op",
           "rms_norm_quantize_reference", "swiglu_reference",
           "ternary_linear", "ternary_linear_op", "ternary_linear_quantized", "ternary_linear_quantized_op",
           "ternary_linear_reference", "triton_available"]
