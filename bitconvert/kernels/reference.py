"""Obvious torch implementation of the packed ternary product: correct everywhere, fast nowhere."""

from __future__ import annotations

import torch

from bitconvert.quant import int8_absmax_quantize, ternary_dequantize, unpack_ternary


def codes_linear_reference(x: torch.Tensor, codes: torch.Tensor, inv_scale: torch.Tensor,
                           bias: torch.Tensor | None = None, *, granularity: str = "tensor",
                           group_size: int = 128) -> torch.Tensor:
    """``y = dequant(int8(x)) · (codes / weight_scale)ᵀ + b`` for unpacked weight codes (ternary or binary).

    For one scale per tensor or per row the integer product is formed first and scaled once,
    which is the order transformers' BitLinear uses; per-group scales dequantize the weight first.
    """
    codes_x, x_inv = int8_absmax_quantize(x)
    return quantized_linear_reference(codes_x, x_inv, codes, inv_scale, bias, granularity=granularity,
                                      group_size=group_size, dtype=x.dtype)


def quantized_linear_reference(codes_x: torch.Tensor, x_inv: torch.Tensor, codes: torch.Tensor,
                               inv_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                               granularity: str = "tensor", group_size: int = 128,
                               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same product from activations quantized already: int8 ``codes_x`` and ``x_inv`` = 127 / absmax
    per token (shape ``(..., 1)``), as :func:`int8_absmax_quantize` returns them."""
    if granularity == "group":
        weight = ternary_dequantize(codes, inv_scale, "group", group_size)
        y = (codes_x.float() @ weight.t()) / x_inv
    else:
        y = (codes_x.float() @ codes.float().t()) / (x_inv * inv_scale.float().reshape(-1))
    y = y.to(dtype)
    return y if bias is None else y + bias


def ternary_linear_reference(x: torch.Tensor, packed: torch.Tensor, inv_scale: torch.Tensor,
                             bias: torch.Tensor | None = None, *, granularity: str = "tensor",
                             group_size: int = 128, swiglu: bool = False) -> torch.Tensor:
    """The product with 2-bit packed ternary weights (layout in :mod:`bitconvert.quant.packing`); with
    ``swiglu`` its rows are gate and up stacked and the result is :func:`swiglu_reference` of it."""
    y = codes_linear_reference(x, unpack_ternary(packed), inv_scale, bias, granularity=granularity,
                               group_size=group_size)
    return swiglu_reference(y) if swiglu else y


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the two halves of the last dimension, as a SwiGLU MLP computes it."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
