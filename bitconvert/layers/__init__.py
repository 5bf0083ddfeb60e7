"""Modules: thin wrappers around the math in :mod:`bitconvert.quant`."""

from bitconvert.layers.bitlinear import BitExperts, BitLinear, QuantStrength, RMSNorm
from bitconvert.layers.fused import FusedProjections, ProjectionView, fuse_projections
from bitconvert.layers.packed import PackedBitLinear, PackedExperts

__all__ = ["BitExperts", "BitLinear", "FusedProjections", "PackedBitLinear", "PackedExperts", "ProjectionView",
           "QuantStrength", "RMSNorm", "fuse_projections"]
