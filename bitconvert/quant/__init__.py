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

__all__ = [
    "GRANULARITIES",
    "QuantSpec",
    "VARIANTS",
    "binary_dequantize",
    "binary_fake_quantize",
    "binary_inv_scale",
    "binary_quantize",
    "is_binary",
    "onebit_dequantize",
    "onebit_init",
    "pack_weight",
    "packed_weight_shape",
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
