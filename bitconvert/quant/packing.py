"""Bit packing of quantized weight codes.

Ternary codes use the layout of transformers' bitnet integration, so that the same bytes load in
plain transformers and in bitconvert's kernels: codes are stored as ``code + 1`` (0, 1, 2) in two
bits, packed along the OUTPUT dimension in four row blocks. With ``R = out / 4``, packed row ``r``
holds original rows ``r, r + R, r + 2R, r + 3R`` at bit offsets 0, 2, 4, 6. Leading dimensions
(experts) are kept as they are.

Binary codes (the 1-bit variants) are stored as bits, eight consecutive inputs per byte, least
significant bit first, with 1 meaning +1 and 0 meaning -1.
"""

from __future__ import annotations

import torch

TERNARY_PER_BYTE = 4
BINARY_PER_BYTE = 8


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack int codes in {-1, 0, 1} of shape ``(..., out, in)`` into uint8 ``(..., out / 4, in)``."""
    *lead, out_features, in_features = codes.shape
    if out_features % TERNARY_PER_BYTE:
        raise ValueError(f"ternary packing needs out_features divisible by 4, got {out_features}")
    rows = out_features // TERNARY_PER_BYTE
    shifted = (codes.to(torch.int16) + 1).to(torch.uint8).reshape(*lead, TERNARY_PER_BYTE, rows, in_features)
    packed = torch.zeros((*lead, rows, in_features), dtype=torch.uint8, device=codes.device)
    for block in range(TERNARY_PER_BYTE):
        packed |= shifted[..., block, :, :] << (2 * block)
    return packed


def unpack_ternary(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: uint8 ``(..., out / 4, in)`` to codes ``(..., out, in)``."""
    *lead, rows, in_features = packed.shape
    blocks = [((packed >> (2 * block)) & 0b11) for block in range(TERNARY_PER_BYTE)]
    codes = torch.stack(blocks, dim=-3).reshape(*lead, rows * TERNARY_PER_BYTE, in_features)
    return codes.to(dtype) - 1


def pack_binary(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes in {-1, +1} of shape ``(..., out, in)`` into uint8 ``(..., out, in / 8)``."""
    *lead, out_features, in_features = codes.shape
    if in_features % BINARY_PER_BYTE:
        raise ValueError(f"binary packing needs in_features divisible by 8, got {in_features}")
    bits = (codes > 0).to(torch.uint8).reshape(*lead, out_features, in_features // BINARY_PER_BYTE, BINARY_PER_BYTE)
    weights = (1 << torch.arange(BINARY_PER_BYTE, dtype=torch.uint8, device=codes.device))
    return (bits * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_binary(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_binary`."""
    *lead, out_features, packed_in = packed.shape
    shifts = torch.arange(BINARY_PER_BYTE, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return (bits.reshape(*lead, out_features, packed_in * BINARY_PER_BYTE).to(dtype) * 2 - 1)


def is_binary(variant: str) -> bool:
    """True for the 1-bit variants (codes in {-1, +1}, packed 8 to a byte along the input dim)."""
    return variant in ("bitnet1", "onebit")


def packed_weight_shape(out_features: int, in_features: int, variant: str) -> tuple[int, int]:
    """Shape of the uint8 tensor that holds an (out, in) weight of ``variant``."""
    if is_binary(variant):
        return out_features, in_features // BINARY_PER_BYTE
    return out_features // TERNARY_PER_BYTE, in_features


def pack_weight(codes: torch.Tensor, variant: str) -> torch.Tensor:
    """Pack codes with the layout of ``variant``: ternary for b1.58, binary for the 1-bit variants."""
    return pack_binary(codes) if is_binary(variant) else pack_ternary(codes)


def unpack_weight(packed: torch.Tensor, variant: str, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    return unpack_binary(packed, dtype) if is_binary(variant) else unpack_ternary(packed, dtype)
