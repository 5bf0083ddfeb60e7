"""The math of quantization: pure functions, no modules, no state."""

from bitconvert.quant.binary import (
    binary_dequantize,
    binary_fake_quantize,
    binary_inv_scale,
    binary_quantize,
    onebit_dequantize,
    onebit_init,
    rank1_nonnegative,
    sign_codes,
)
from bitconvert.quant.packing import (
    is_binary,
    pack_binary,
    pack_ternary,
    pack_weight,
    packed_weight_shape,
    unpack_binary,
    unpack_ternary,
    unpack_weight,
)
from bitconvert.quant.spec import VARIANTS, QuantSpec
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
from bitconvert.quant.weight import dequantize_weight, fake_quantize_weight, quantize_weight

__all__ = [
    "GRANULARITIES",
    "QuantSpec",
    "VARIANTS",
    "binary_dequantize",
    "binary_fake_quantize",
    "binary_inv_scale",
    "binary_quantize",
    "dequantize_weight",
    "fake_quantize_weight",
    "is_binary",
    "onebit_dequantize",
    "onebit_init",
    "pack_weight",
    "packed_weight_shape",
    "quantize_weight",
    "rank1_nonnegative",
    "sign_codes",
    "unpack_weight",
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
