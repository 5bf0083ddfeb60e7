"""Modules: thin wrappers around the math in :mod:`bitconvert.quant`."""

from bitconvert.layers.attention import fuse_rope_attention, unfuse_rope_attention
from bitconvert.layers.bitlinear import BitExperts, BitLinear, QuantStrength, RMSNorm
from bitconvert.layers.fused import FusedProjections, ProjectionView, fuse_projections
from bitconvert.layers.packed import PackedBitLinear, PackedExperts
from bitconvert.layers.decoder import QuantizingRMSNorm, fuse_decoder_layers, unfuse_decoder_layers  # noqa: I001 (after packed)

__all__ = ["BitExperts", "BitLinear", "FusedProjections", "PackedBitLinear", "PackedExperts", "ProjectionView",
           "QuantStrength", "QuantizingRMSNorm", "RMSNorm", "fuse_decoder_layers", "fuse_projections",
           "fuse_rope_attention", "unfuse_decoder_layers", "unfuse_rope_attention"]
