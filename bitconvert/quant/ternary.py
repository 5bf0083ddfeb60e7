"""BitNet b1.58 quantizers as small pure functions.

Weights: ternary, ``w ≈ codes * step`` with codes in {-1, 0, +1} and one ``step`` per tensor, output
channel (row) or group of ``group_size`` inputs. Two fits of codes and step to a block:
``absmean`` (BitNet b1.58): ``step = mean|w|``, ``codes = round(w / step)``, so weights under half the
mean magnitude become 0. ``twn`` (Ternary Weight Networks, Li et al. 2016): weights under
``0.7 * mean|w|`` become 0 and ``step`` is the mean magnitude of the rest, the least-squares step for
those codes; on SmolLM2-135M's weights (group 64) it leaves 28% less squared error than absmean.
A third fit, ``learned``, starts from TWN's step and then trains it (:func:`learned_step_ste`); its step is a
parameter of the layer, so the functions here that fit a step from the weight alone do not take it.
Activations: symmetric int8 absmax per token. ``x ≈ codes / inv_scale`` with
``inv_scale = 127 / max|x|`` over the last dimension.

The arithmetic mirrors transformers' bitnet integration (multiply by an inverse scale, clamp the
divisor at 1e-5), so that an exported model reproduces bitconvert's logits inside plain transformers.

Weight tensors may carry leading dimensions (experts stored as ``(experts, out, in)``); the
granularity always refers to the last two dimensions.
"""

from __future__ import annotations

from typing import Literal

import torch

Granularity = Literal["tensor", "channel", "group"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
Fit = Literal["absmean", "twn"]
FITS: tuple[str, ...] = ("absmean", "twn")
# TWN's threshold: for Gaussian weights the squared-error-optimal one is about 0.6-0.7 mean|w|
TWN_THRESHOLD = 0.7
EPS = 1e-5
INT8_MAX = 127


def _grouped(weight: torch.Tensor, granularity: Granularity, group_size: int) -> torch.Tensor:
    """View ``weight`` so that one scale covers exactly the last dimension of the view."""
    *lead, out_features, in_features = weight.shape
    if granularity == "tensor":
        return weight.reshape(*lead, 1, out_features * in_features)
    if granularity == "channel":
        return weight
    if granularity == "group":
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
        return weight.reshape(*lead, out_features, in_features // group_size, group_size)
    raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")


def scale_shape(weight_shape: tuple[int, ...], granularity: Granularity, group_size: int) -> tuple[int, ...]:
    """Shape of the scale tensor that :func:`ternary_quantize` returns for ``weight_shape``."""
    *lead, out_features, in_features = weight_shape
    return {
        "tensor": (*lead, 1),
        "channel": (*lead, out_features),
        "group": (*lead, out_features, in_features // group_size),
    }[granularity]


def _fit_blocks(grouped: torch.Tensor, fit: Fit) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and inverse step (keepdim) of blocks that lie along the last dimension of ``grouped`` (float32)."""
    magnitude = grouped.abs()
    mean = magnitude.mean(dim=-1, keepdim=True)
    if fit == "absmean":
        inv = 1.0 / mean.clamp(min=EPS)
        return (grouped * inv).round().clamp(-1, 1), inv
    if fit == "twn":
        kept = magnitude > TWN_THRESHOLD * mean
        count = kept.sum(dim=-1, keepdim=True)
        # the mean magnitude of the kept weights; an all-zero block keeps the absmean step's clamp
        step = torch.where(count > 0, (magnitude * kept).sum(dim=-1, keepdim=True) / count.clamp(min=1), mean)
        return torch.sign(grouped) * kept, 1.0 / step.clamp(min=EPS)
    raise ValueError(f"unknown ternary fit {fit!r}; expected one of {FITS}")


def ternary_inv_scale(weight: torch.Tensor, granularity: Granularity = "tensor", group_size: int = 128,
                      fit: Fit = "absmean") -> torch.Tensor:
    """``1 / step`` per scale block, in float32, shaped as :func:`scale_shape` says."""
    _, inv = _fit_blocks(_grouped(weight.float(), granularity, group_size), fit)
    return inv.reshape(scale_shape(tuple(weight.shape), granularity, group_size))


def _broadcast(scale: torch.Tensor, weight: torch.Tensor, granularity: Granularity, group_size: int) -> torch.Tensor:
    """Expand a scale to the weight's shape."""
    if granularity == "tensor":
        return scale.unsqueeze(-1)
    if granularity == "channel":
        return scale.unsqueeze(-1)
    return scale.repeat_interleave(group_size, dim=-1)


def ternary_quantize(
    weight: torch.Tensor, granularity: Granularity = "tensor", group_size: int = 128, fit: Fit = "absmean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(codes, inv_scale)``: int8 codes in {-1, 0, 1} and the float32 inverse scale."""
    codes, inv = _fit_blocks(_grouped(weight.float(), granularity, group_size), fit)
    return (codes.reshape(weight.shape).to(torch.int8),
            inv.reshape(scale_shape(tuple(weight.shape), granularity, group_size)))


def ternary_dequantize(
    codes: torch.Tensor, inv_scale: torch.Tensor, granularity: Granularity = "tensor", group_size: int = 128,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    return (codes.float() / _broadcast(inv_scale.float(), codes, granularity, group_size)).to(dtype)


def ternary_fake_quantize(weight: torch.Tensor, granularity: Granularity = "tensor", group_size: int = 128,
                          fit: Fit = "absmean") -> torch.Tensor:
    """Round-trip ``weight`` through ternary codes; same dtype, no gradient trick."""
    codes, inv = _fit_blocks(_grouped(weight.float(), granularity, group_size), fit)
    return (codes / inv).reshape(weight.shape).to(weight.dtype)


def ternary_codes_at(weight: torch.Tensor, inv_scale: torch.Tensor, granularity: Granularity = "tensor",
                     group_size: int = 128) -> torch.Tensor:
    """int8 codes of ``weight`` at a given step: the nearest of {-1, 0, +1} to ``weight / step``."""
    scaled = weight.float() * _broadcast(inv_scale.float(), weight, granularity, group_size)
    return scaled.round().clamp(-1, 1).to(torch.int8)


def learned_step_ste(weight: torch.Tensor, log_step: torch.Tensor, strength: torch.Tensor | float,
                     granularity: Granularity = "tensor", group_size: int = 128) -> torch.Tensor:
    """Ternary fake quantization at a trained step, blended by ``strength``; gradients for both inputs.

    Forward: ``codes * step`` with ``codes = clamp(round(w / step), -1, 1)`` and ``step = exp(log_step)``
    (one per scale block), so the threshold between 0 and +-1 is half the step. Backward: the latent weight
    gets the plain straight-through gradient, as with the closed-form fits; the step gets LSQ's (Esser et al.
    2019, which ParetoQ trains ternary scales with): ``d w_q / d step = codes - w / step`` where
    ``|w| <= step``, ``codes`` beyond. The step is trained in log space, so that a shared learning rate moves
    it by a fraction of itself and it stays positive.
    """
    step = _broadcast(log_step.float().exp(), weight, granularity, group_size)
    with torch.no_grad():
        latent = weight.float()
        scaled = latent * _broadcast((-log_step.float()).exp(), weight, granularity, group_size)
        codes = scaled.round().clamp(-1, 1)
        slope = strength * (codes - scaled * (scaled.abs() <= 1))
        delta = strength * (codes * step - latent)
    # zero in value; its gradient carries the slope into the step
    step_term = slope * (step - step.detach())
    return (weight + delta.to(weight.dtype)) + step_term.to(weight.dtype)


def int8_absmax_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes and ``inv_scale = 127 / max|x|`` (float32, keepdim on the last axis)."""
    inv = INT8_MAX / x.float().abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    codes = (x.float() * inv).round().clamp(-INT8_MAX - 1, INT8_MAX)
    return codes.to(torch.int8), inv


def int8_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """Round-trip activations through per-token int8; same dtype, no gradient trick."""
    xf = x.float()
    inv = INT8_MAX / xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return ((xf * inv).round().clamp(-INT8_MAX - 1, INT8_MAX) / inv).to(x.dtype)


def straight_through(x: torch.Tensor, quantized: torch.Tensor, strength: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Forward ``x + strength * (quantized - x)``; backward is the identity in ``x``.

    ``strength`` below 1 blends full precision and quantized values, which is how a gradual
    quantization warmup eases a pretrained model into ternary weights.
    """
    return x + (strength * (quantized - x)).detach()
