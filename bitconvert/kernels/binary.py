"""Obvious torch implementations of the packed 1-bit products (BitNet and OneBit).

Like the ternary reference, these form the integer product of int8 activation codes and sign codes
first and apply the scales once afterwards, which is the order a fused kernel would use.
"""

from __future__ import annotations

import torch

from bitconvert.kernels.reference import codes_linear_reference
from bitconvert.quant import int8_absmax_quantize, unpack_binary


def binary_linear_reference(x: torch.Tensor, packed: torch.Tensor, inv_scale: torch.Tensor,
                            bias: torch.Tensor | None = None, *, granularity: str = "tensor",
                            group_size: int = 128) -> torch.Tensor:
    """``y = dequant(int8(x)) · (sign codes / weight_scale)ᵀ + b``; ``packed`` is uint8 (out, in / 8)."""
    return codes_linear_reference(x, unpack_binary(packed), inv_scale, bias, granularity=granularity,
                                  group_size=group_size)


def onebit_linear_reference(x: torch.Tensor, packed: torch.Tensor, input_scale: torch.Tensor,
                            output_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """OneBit: ``y = h ⊙ (int8(x ⊙ g) · signsᵀ) + b``, activations quantized after the input scale."""
    codes_x, x_inv = int8_absmax_quantize(x.float() * input_scale.float())
    signs = unpack_binary(packed, torch.float32)
    y = ((codes_x.float() @ signs.t()) / x_inv * output_scale.float()).to(x.dtype)
    return y if bias is None else y + bias
