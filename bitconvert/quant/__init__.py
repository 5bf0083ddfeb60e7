"""The math of quantization: pure functions, no modules, no state."""

from bitconvert.quant.packing import pack_binary, pack_ternary, unpack_binary, unpack_ternary
from bitconvert.quant.spec import QuantSpec
from bitconvert.quant.ternary import (
    GRANULARITIES,
    int8_absmax_quantize,
    int8_fake_quantize,
    scale_shape,
    straight_through,
    ternary_dequantize,
    ternary_fake_quantize,
    ternary_inv_scale,
    ternary_quantize,
)

__all__ = [
    "GRANULARITIES",
    "QuantSpec",
    "int8_absmax_quantize",
    "int8_fake_quantize",
    "pack_binary",
    "pack_ternary",
    "scale_shape",
    "straight_through",
    "ternary_dequantize",
    "ternary_fake_quantize",
    "ternary_inv_scale",
    "ternary_quantize",
    "unpack_binary",
    "unpack_ternary",
]
