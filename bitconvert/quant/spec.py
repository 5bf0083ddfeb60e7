"""What a converted layer computes: the one description shared by layers, export and recipes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Variant = Literal["b1.58", "bitnet1", "onebit"]
VARIANTS: tuple[str, ...] = ("b1.58", "bitnet1", "onebit")
# Bits that one quantized weight takes in the packed export.
BITS_PER_WEIGHT = {"b1.58": 2, "bitnet1": 1, "onebit": 1}


class QuantSpec(BaseModel):
    """How weights and activations of a BitLinear are quantized.

    ``variant`` picks the weight quantizer: ``b1.58`` (BitNet b1.58: ternary absmean codes),
    ``bitnet1`` (BitNet 2023: binary codes ``sign(w - mean w)`` with scale ``mean|w|``) or
    ``onebit`` (OneBit 2024: ``diag(h) · sign(W) · diag(g)``, ``g`` and ``h`` full-precision vectors
    initialised by SVID). Activations are int8 absmax per token in every variant; for ``onebit``
    they are quantized after the input scale ``g`` is applied, right before the sign matrix.
    ``weight_scale`` picks how many absmean scales a weight matrix gets: one (``tensor``, the
    BitNet b1.58 paper and transformers' layout), one per output row (``channel``) or one per
    ``group_size`` inputs of a row (``group``). ``ternary_fit`` picks how ``b1.58`` fits codes and
    scale to each block: ``absmean`` (the paper's), ``twn`` (zero below 0.7 mean|w|, least-squares
    scale) or ``learned`` (TWN's step to start with, then trained by LSQ's gradient as a parameter of the
    layer); the same codes-and-scale layout in every export format. ``subln`` adds an RMSNorm before the quantized
    projections: ``all`` before every converted linear (transformers' ``use_rms_norm``), ``output``
    only before the attention output and MLP down projections (BitDistill's SubLN).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Variant = Field(
        default="b1.58", description="weight quantizer: b1.58 = absmean ternary, bitnet1 = binary sign(w - mean) x "
                                     "mean abs(w), onebit = sign matrix between two trained scale vectors (docs/variants.md)")
    weight_scale: Literal["tensor", "channel", "group"] = Field(
        default="tensor", description="one absmean scale per tensor, per output row, or per group of inputs")
    group_size: int = Field(default=128, gt=0, description="inputs per scale when weight_scale is group")
    ternary_fit: Literal["absmean", "twn", "learned"] = Field(
        default="absmean", description="b1.58 codes and scale per block: absmean = BitNet's (scale mean abs(w), "
                                       "round), twn = Ternary Weight Networks' (0 below 0.7 mean abs(w), scale the "
                                       "mean abs of the rest), learned = twn's scale to start, then trained (LSQ)")
    activation_bits: Literal[8] = Field(default=8, description="per-token absmax activation bits")
    subln: Literal["none", "all", "output"] = Field(
        default="none", description="extra RMSNorm before quantized projections: all, or only o_proj/down_proj")
    rms_norm_eps: float = Field(default=1e-6, gt=0, description="epsilon of the SubLN norms")

    @model_validator(mode="after")
    def _group_size_is_packable(self) -> "QuantSpec":
        if self.weight_scale == "group" and self.group_size % 8:
            raise ValueError("group_size must be a multiple of 8 so that groups stay byte-aligned when packed")
        if self.variant == "onebit" and self.weight_scale != "tensor":
            raise ValueError(f"weight_scale={self.weight_scale!r} does not apply to variant 'onebit': its scales are "
                             "the per-input vector g and the per-output vector h; leave weight_scale at 'tensor' "
                             "(weight_scale chooses the absmean blocks of 'b1.58' and 'bitnet1')")
        if self.ternary_fit != "absmean" and self.variant != "b1.58":
            raise ValueError(f"ternary_fit={self.ternary_fit!r} applies to variant 'b1.58' only (this is "
                             f"{self.variant!r}); leave ternary_fit at 'absmean'")
        return self

    @property
    def bits_per_weight(self) -> int:
        return BITS_PER_WEIGHT[self.variant]
