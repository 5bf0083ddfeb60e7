"""Obvious torch implementation of the packed ternary product: correct everywhere, fast nowhere."""

from __future__ import annotations

import torch

from bitconvert.quant import int8_absmax_quantize, ternary_dequantize, unpack_ternary


def ternary_linear_reference(x: torch.Tensor, packed: torch.Tensor, inv_scale: torch.Tensor,
                             bias: torch.Tensor | None = None, *, granularity: str = "tensor",
                             group_size: int = 128) -> torch.Tensor:
    """``y = dequant(int8(x)) · dequant(W)ᵀ + b`` with W packed as in :mod:`bitconvert.quant.packing`.

    For one scale per tensor or per row the integer product is formed first and scaled once,
    which is the order transformers' BitLinear uses; per-group scales dequantize the weight first.
    """
    codes_x, x_inv = int8_absmax_quantize(x)
    if granularity == "group":
        weight = ternary_dequantize(unpack_ternary(packed), inv_scale, "group", group_size)
        y = (codes_x.float() @ weight.t()) / x_inv
    else:
        weight = unpack_ternary(packed, torch.float32)
        y = (codes_x.float() @ weight.t()) / (x_inv * inv_scale.float().reshape(-1))
    y = y.to(x.dtype)
    return y if bias is None else y + bias
