"""1-bit weight quantizers as small pure functions: BitNet (2023) and OneBit (2024).

BitNet (Wang et al. 2023, "BitNet: Scaling 1-bit Transformers"): binarize around the mean and keep
one scale, ``w ≈ beta * sign(w - alpha)`` with ``alpha = mean(w)`` and ``beta = mean|w|``. The sign
maps values above the centre to +1 and everything else to -1. bitconvert computes ``alpha`` and
``beta`` per scale block, so ``tensor`` is the paper's quantizer and ``channel`` / ``group`` are the
same rule applied to a row or to ``group_size`` inputs of a row. Scales are returned as the INVERSE
(``1 / beta``), like the ternary quantizer, so that both share one dequantization and one kernel
layout.

OneBit (Xu et al. 2024, "OneBit: Towards Extremely Low-bit Large Language Models"): a sign matrix
plus two full-precision vectors, ``W ≈ diag(h) · sign(W) · diag(g)`` with ``g`` over the inputs and
``h`` over the outputs. Sign-Value-Independent Decomposition (SVID) initialises them from the best
rank-1 approximation of ``|W|``: ``|W| ≈ h gᵀ``. For a non-negative matrix the leading singular
vectors are non-negative (Perron-Frobenius), so the rank-1 SVD and the rank-1 non-negative
factorization coincide; :func:`rank1_nonnegative` finds them by power iteration, which needs only
matrix-vector products and so scales to large layers.
"""

from __future__ import annotations

import torch

from bitconvert.quant.ternary import (
    EPS,
    Granularity,
    _grouped,
    int8_fake_quantize,
    scale_shape,
    straight_through,
    ternary_dequantize,
)


def _signs(centred: torch.Tensor) -> torch.Tensor:
    """+1 where ``centred > 0``, else -1 (the BitNet paper's Sign), as int8."""
    return torch.where(centred > 0, 1, -1).to(torch.int8)


def binary_inv_scale(weight: torch.Tensor, granularity: Granularity = "tensor", group_size: int = 128) -> torch.Tensor:
    """``1 / mean|w|`` per scale block (BitNet's ``1 / beta``), float32, shaped as :func:`scale_shape` says."""
    grouped = _grouped(weight.float(), granularity, group_size)
    inv = 1.0 / grouped.abs().mean(dim=-1).clamp(min=EPS)
    return inv.reshape(scale_shape(tuple(weight.shape), granularity, group_size))


def binary_quantize(weight: torch.Tensor, granularity: Granularity = "tensor",
                    group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(codes, inv_scale)``: int8 codes in {-1, +1} (``sign(w - mean(w))`` per block) and
    the float32 inverse scale ``1 / mean|w|``."""
    grouped = _grouped(weight.float(), granularity, group_size)
    codes = _signs(grouped - grouped.mean(dim=-1, keepdim=True)).reshape(weight.shape)
    return codes, binary_inv_scale(weight, granularity, group_size)


def binary_dequantize(codes: torch.Tensor, inv_scale: torch.Tensor, granularity: Granularity = "tensor",
                      group_size: int = 128, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sign codes back to weights: the same arithmetic as for ternary codes."""
    return ternary_dequantize(codes, inv_scale, granularity, group_size, dtype)


def binary_fake_quantize(weight: torch.Tensor, granularity: Granularity = "tensor", group_size: int = 128) -> torch.Tensor:
    """Round-trip ``weight`` through BitNet's binary codes; same dtype, no gradient trick."""
    grouped = _grouped(weight.float(), granularity, group_size)
    signs = torch.where(grouped > grouped.mean(dim=-1, keepdim=True), 1.0, -1.0)
    fake = signs * grouped.abs().mean(dim=-1, keepdim=True).clamp(min=EPS)
    return fake.reshape(weight.shape).to(weight.dtype)


def sign_codes(weight: torch.Tensor) -> torch.Tensor:
    """OneBit's sign matrix: int8 {-1, +1}, +1 where ``w > 0``."""
    return _signs(weight)


def rank1_nonnegative(matrix: torch.Tensor, *, max_iters: int = 200, tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-1 approximation ``matrix ≈ outer(a, b)`` of a non-negative (out, in) matrix.

    Power iteration on ``matrix · matrixᵀ`` in float64, from the all-ones vector (which is never
    orthogonal to the non-negative leading singular vector). The singular value is split evenly,
    ``a = u·sqrt(s)``, ``b = v·sqrt(s)``, so that neither vector carries all the magnitude.
    Returns float32 ``(a, b)`` with shapes ``(out,)`` and ``(in,)``.
    """
    m = matrix.detach().to(torch.float64)
    v = torch.full((m.shape[1],), m.shape[1] ** -0.5, dtype=torch.float64, device=m.device)
    sigma = torch.zeros((), dtype=torch.float64, device=m.device)
    u = m @ v
    for _ in range(max_iters):
        u = m @ v
        u = u / u.norm().clamp(min=1e-300)
        w = m.t() @ u
        new_sigma = w.norm()
        v_next = w / new_sigma.clamp(min=1e-300)
        converged = (v_next - v).norm() <= tol
        v, sigma = v_next, new_sigma
        if converged:
            break
    root = sigma.sqrt()
    return (u * root).float(), (v * root).float()


def onebit_init(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVID: ``(codes, g, h)`` with ``codes = sign(W)`` and ``|W| ≈ outer(h, g)`` (rank 1).

    ``g`` has one entry per input, ``h`` one per output; both float32.
    """
    h, g = rank1_nonnegative(weight.float().abs())
    return sign_codes(weight), g, h


def onebit_dequantize(codes: torch.Tensor, input_scale: torch.Tensor, output_scale: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``diag(h) · codes · diag(g)``."""
    return (output_scale.float().unsqueeze(-1) * codes.float() * input_scale.float()).to(dtype)


# --------------------------------------------------------------------------- straight-through forms for training

def onebit_weight_ste(weight: torch.Tensor, input_scale: torch.Tensor, output_scale: torch.Tensor,
                      strength: torch.Tensor | float) -> torch.Tensor:
    """``diag(h) · sign(W) · diag(g)`` blended with ``W`` by ``strength``.

    The sign passes gradients straight through to ``W``; ``g`` and ``h`` get their true gradients,
    which is how OneBit trains its value vectors. The blend is not detached (unlike
    ``straight_through``) because ``g`` and ``h`` appear only in the quantized branch.
    """
    signs = straight_through(weight, torch.where(weight > 0, 1.0, -1.0).to(weight.dtype))
    quantized = output_scale.to(weight.dtype).unsqueeze(-1) * signs * input_scale.to(weight.dtype)
    s = strength.to(weight.dtype) if torch.is_tensor(strength) else strength
    return weight + s * (quantized - weight)


def onebit_activation_ste(x: torch.Tensor, input_scale: torch.Tensor, strength: torch.Tensor | float) -> torch.Tensor:
    """Activations as OneBit's packed kernel sees them, expressed before the input scale.

    The kernel quantizes ``x ⊙ g`` to int8; the weight returned by :func:`onebit_weight_ste` already
    contains ``g``, so the forward value here is ``int8(x ⊙ g) / g`` and the product of the two is the
    kernel's product. The gradient is the identity (straight through). ``g`` is kept away from 0
    in the division only; a zero entry of ``g`` zeroes that input either way.
    """
    g = input_scale.float()
    g_safe = torch.where(g.abs() < EPS, torch.where(g < 0, -EPS, EPS), g)
    quantized = (int8_fake_quantize(x.float() * g) / g_safe).to(x.dtype)
    s = strength.to(x.dtype) if torch.is_tensor(strength) else strength
    return x + (s * (quantized - x)).detach()
