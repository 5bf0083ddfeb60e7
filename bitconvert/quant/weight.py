"""The weight quantizer that a QuantSpec names, so that callers pass the spec instead of unpacking it.

Each function picks the math of ``spec.variant`` (ternary.py for ``b1.58``, binary.py for ``bitnet1``)
and hands it ``weight_scale``, ``group_size`` and ``ternary_fit``. ``onebit`` is left out: its scales are
trained vectors of the layer, not a function of the weight (binary.py's ``onebit_*``).
"""

from __future__ import annotations

import torch

from bitconvert.quant.binary import binary_dequantize, binary_fake_quantize, binary_quantize
from bitconvert.quant.spec import QuantSpec
from bitconvert.quant.ternary import ternary_dequantize, ternary_fake_quantize, ternary_quantize


def _no_onebit(spec: QuantSpec) -> None:
    if spec.variant == "onebit":
        raise ValueError("variant 'onebit' has no weight_scale: its scales are the layer's input_scale and "
                         "output_scale (see bitconvert.quant.binary's onebit_* functions)")


def _fitted(spec: QuantSpec) -> None:
    if spec.ternary_fit == "learned":
        raise ValueError("ternary_fit 'learned' has no closed form: its step is a trained parameter of the layer; "
                         "ask the layer (BitLinear.quantized_codes) or pass the step to ternary_codes_at")


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, inv_scale)``: int8 codes and the float32 inverse scale, shaped as ``scale_shape`` says."""
    _no_onebit(spec)
    _fitted(spec)
    if spec.variant == "bitnet1":
        return binary_quantize(weight, spec.weight_scale, spec.group_size)
    return ternary_quantize(weight, spec.weight_scale, spec.group_size, spec.ternary_fit)


def fake_quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``weight`` round-tripped through its codes; same dtype, no gradient trick."""
    _no_onebit(spec)
    _fitted(spec)
    if spec.variant == "bitnet1":
        return binary_fake_quantize(weight, spec.weight_scale, spec.group_size)
    return ternary_fake_quantize(weight, spec.weight_scale, spec.group_size, spec.ternary_fit)


def dequantize_weight(codes: torch.Tensor, inv_scale: torch.Tensor, spec: QuantSpec,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes (unpacked, int8) and their inverse scale back to weights."""
    _no_onebit(spec)
    if spec.variant == "bitnet1":
        return binary_dequantize(codes, inv_scale, spec.weight_scale, spec.group_size, dtype)
    return ternary_dequantize(codes, inv_scale, spec.weight_scale, spec.group_size, dtype)
