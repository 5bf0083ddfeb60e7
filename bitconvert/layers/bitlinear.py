"""Quantization-aware training layers: full-precision latent weights, quantized forward pass.

``BitLinear`` is an ``nn.Linear`` (same parameter names, so optimizers, FSDP, peft and state dicts
see a plain linear) whose forward pass uses ternary weights and int8 activations through a
straight-through estimator. ``BitExperts`` does the same for mixture-of-experts blocks that keep
all experts in 3-D tensors (Mixtral, Qwen-MoE in transformers 5). With ``ternary_fit: learned`` each
quantized weight ``W`` gets one more parameter, ``W_log_step``: the log of its trained step per scale block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitconvert.quant import (
    QuantSpec,
    fake_quantize_weight,
    int8_fake_quantize,
    learned_step_ste,
    quantize_weight,
    scale_shape,
    ternary_codes_at,
    ternary_inv_scale,
)
from bitconvert.quant.binary import onebit_activation_ste, onebit_init, onebit_weight_ste, sign_codes


# Eager by default. Compiling these two alone with torch.compile was measured slower on an H100 (46k vs
# 52k tokens/s distilling SmolLM2-135M, benchmarks/results/qat_step_speed_h100.json); train.compile:
# layers compiles them inside each decoder block instead. The quantized value is computed without
# autograd: the straight-through estimator discards its graph anyway, so recording it is pure overhead.
def activation_ste(x: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """int8 per-token fake quantization with a straight-through gradient (blended by ``strength``)."""
    with torch.no_grad():
        delta = strength.to(x.dtype) * (int8_fake_quantize(x) - x)
    return x + delta


def weight_ste(weight: torch.Tensor, strength: torch.Tensor, spec: QuantSpec,
               log_step: torch.Tensor | None = None) -> torch.Tensor:
    """Fake quantization of a latent weight as ``spec`` says (b1.58 or bitnet1), straight-through gradient;
    ``log_step`` is the trained step of ``ternary_fit: learned``, which gets a gradient too."""
    if log_step is not None:
        return learned_step_ste(weight, log_step, strength, spec.weight_scale, spec.group_size)
    with torch.no_grad():
        delta = strength.to(weight.dtype) * (fake_quantize_weight(weight, spec) - weight)
    return weight + delta


LOG_STEP_SUFFIX = "_log_step"


def initial_log_step(weight: torch.Tensor, spec: QuantSpec) -> nn.Parameter:
    """The learned fit's starting point: the log of TWN's least-squares step, float32 whatever the weight's dtype."""
    inv = ternary_inv_scale(weight.detach(), spec.weight_scale, spec.group_size, "twn")
    return nn.Parameter(-inv.log())


@torch.no_grad()
def weight_codes(weight: torch.Tensor, spec: QuantSpec,
                 log_step: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, inv_scale)`` of a latent weight as the forward pass quantizes it (at ``log_step`` when learned),
    for export."""
    if log_step is None:
        return quantize_weight(weight, spec)
    inv = (-log_step.float()).exp()
    return ternary_codes_at(weight, inv, spec.weight_scale, spec.group_size), inv


class RMSNorm(nn.Module):
    """Plain RMSNorm, the same arithmetic as transformers' LlamaRMSNorm (used for SubLN)."""

    def __init__(self, features: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(dtype)


class QuantStrength(nn.Module):
    """Holds the blend factor of gradual quantization (1 = fully quantized) as a tensor buffer.

    A tensor, not a Python float, so that updating it every step never recompiles a compiled model.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("value", torch.ones(()), persistent=False)


class BitLinear(nn.Linear):
    """``nn.Linear`` trained as BitNet b1.58: absmean ternary weights, per-token int8 activations.

    ``spec.variant`` switches the weight quantizer to BitNet's binary ``bitnet1`` or to ``onebit``,
    which adds two trainable vectors, ``input_scale`` (OneBit's g) and ``output_scale`` (h).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, spec: QuantSpec,
                 use_rms_norm: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.spec = spec
        self.transposed_source = False  # True when converted from GPT-2's Conv1D
        self.strength = QuantStrength()
        self.rms_norm = RMSNorm(in_features, spec.rms_norm_eps, device=device, dtype=dtype) if use_rms_norm else None
        if spec.variant == "onebit":  # OneBit's value vectors; from_linear initialises them by SVID
            self.input_scale = nn.Parameter(torch.ones(in_features, device=device, dtype=dtype))
            self.output_scale = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))
        if spec.ternary_fit == "learned":  # from_linear starts it at TWN's step
            shape = scale_shape((out_features, in_features), spec.weight_scale, spec.group_size)
            self.weight_log_step = nn.Parameter(torch.zeros(shape, device=device, dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, use_rms_norm: bool = False) -> "BitLinear":
        """Wrap an existing linear's parameters (shared, not copied)."""
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, spec=spec,
                        use_rms_norm=use_rms_norm)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.strength = QuantStrength().to(linear.weight.device)
        if spec.variant == "onebit":
            layer.init_onebit()
        if spec.ternary_fit == "learned":
            layer.weight_log_step = initial_log_step(linear.weight, spec)
        if use_rms_norm:
            layer.rms_norm = RMSNorm(linear.in_features, spec.rms_norm_eps, device=linear.weight.device,
                                       dtype=linear.weight.dtype)
        return layer

    @classmethod
    def from_conv1d(cls, conv, spec: QuantSpec, use_rms_norm: bool = False) -> "BitLinear":
        """GPT-2's ``Conv1D`` stores the weight as (in, out); a linear stores (out, in)."""
        in_features, out_features = conv.weight.shape
        linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device="meta")
        linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=conv.weight.requires_grad)
        linear.bias = conv.bias
        layer = cls.from_linear(linear, spec, use_rms_norm)
        layer.transposed_source = True
        return layer

    @torch.no_grad()
    def init_onebit(self) -> None:
        """OneBit's SVID: ``|W| ≈ outer(h, g)`` by the rank-1 approximation of ``|W|``."""
        _, g, h = onebit_init(self.weight)
        self.input_scale = nn.Parameter(g.to(self.weight.device, self.weight.dtype))
        self.output_scale = nn.Parameter(h.to(self.weight.device, self.weight.dtype))

    def quantized_weight(self) -> torch.Tensor:
        """The quantized weight the forward pass sees (blended during quantization warmup)."""
        if self.spec.variant == "onebit":
            return onebit_weight_ste(self.weight, self.input_scale, self.output_scale, self.strength.value)
        return weight_ste(self.weight, self.strength.value, self.spec, getattr(self, "weight_log_step", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        if self.spec.variant == "onebit":
            x = onebit_activation_ste(x, self.input_scale, self.strength.value)
        else:
            x = activation_ste(x, self.strength.value)
        return F.linear(x, self.quantized_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, inv_scale)`` of the current latent weight, for export (variant b1.58 only)."""
        if self.spec.variant != "b1.58":
            raise ValueError(f"ternary() needs variant 'b1.58', this layer is {self.spec.variant!r}; use quantized_codes()")
        return weight_codes(self.weight, self.spec, getattr(self, "weight_log_step", None))

    @torch.no_grad()
    def quantized_codes(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(codes, scales)`` for export, whatever the variant: int8 codes (out, in) and float32 scale
        tensors named as the buffers of ``PackedBitLinear`` (``weight_scale``, or ``input_scale`` and
        ``output_scale`` for onebit)."""
        if self.spec.variant == "onebit":
            return sign_codes(self.weight), {"input_scale": self.input_scale.detach().float(),
                                             "output_scale": self.output_scale.detach().float()}
        codes, inv = weight_codes(self.weight, self.spec, getattr(self, "weight_log_step", None))
        return codes, {"weight_scale": inv}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, variant={self.spec.variant}, weight_scale={self.spec.weight_scale}, "
                f"fit={self.spec.ternary_fit}, subln={self.rms_norm is not None}")


class BitExperts(nn.Module):
    """Mixture-of-experts MLPs in 3-D tensors, trained with ternary weights (one scale set per expert).

    Accepts the module layout transformers 5 uses for Mixtral and Qwen-MoE: ``gate_up_proj``
    (experts, 2 * intermediate, hidden), ``down_proj`` (experts, hidden, intermediate), ``act_fn``;
    called as ``experts(hidden_states, top_k_index, top_k_weights)``.
    """

    def __init__(self, experts: nn.Module, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.num_experts = experts.gate_up_proj.shape[0]
        self.gate_up_proj = experts.gate_up_proj
        self.down_proj = experts.down_proj
        self.act_fn = experts.act_fn
        self.strength = QuantStrength().to(self.gate_up_proj.device)
        if spec.ternary_fit == "learned":
            self.gate_up_proj_log_step = initial_log_step(self.gate_up_proj, spec)
            self.down_proj_log_step = initial_log_step(self.down_proj, spec)

    @staticmethod
    def supports(module: nn.Module) -> bool:
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        own = {name for name, _ in module.named_parameters(recurse=False)}
        return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.ndim == 3
                and down.ndim == 3 and hasattr(module, "act_fn") and own == {"gate_up_proj", "down_proj"})

    def _quantized(self, name: str) -> torch.Tensor:
        return weight_ste(getattr(self, name), self.strength.value, self.spec, getattr(self, name + LOG_STEP_SUFFIX, None))

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return activation_ste(x, self.strength.value)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        gate_up = self._quantized("gate_up_proj")
        down = self._quantized("down_proj")
        output = torch.zeros_like(hidden_states)
        x = self._act(hidden_states)
        for expert in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = F.linear(x[token_idx], gate_up[expert].to(x.dtype)).chunk(2, dim=-1)
            h = self._act(self.act_fn(gate) * up)
            h = F.linear(h, down[expert].to(h.dtype)) * top_k_weights[token_idx, slot, None]
            output.index_add_(0, token_idx, h.to(output.dtype))
        return output

    def ternary_of(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, inv_scale)`` of ``gate_up_proj`` or ``down_proj``, for export."""
        return weight_codes(getattr(self, name), self.spec, getattr(self, name + LOG_STEP_SUFFIX, None))

    def ternary(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: self.ternary_of(name) for name in ("gate_up_proj", "down_proj")}
