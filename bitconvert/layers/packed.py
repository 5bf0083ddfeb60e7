"""Inference layers that keep weights packed: 2 bits per ternary weight (1 bit for the 1-bit
variants) plus its scales."""

from __future__ import annotations

import torch
from torch import nn

from bitconvert.kernels import (
    TernaryCache,
    binary_linear,
    onebit_linear,
    quantize_for_kernels,
    swiglu_reference,
    ternary_linear,
    ternary_linear_op,
    ternary_linear_quantized,
    ternary_linear_quantized_op,
)
from bitconvert.layers.bitlinear import RMSNorm
from bitconvert.quant import (
    QuantSpec,
    dequantize_weight,
    onebit_dequantize,
    packed_weight_shape,
    scale_shape,
    unpack_binary,
    unpack_weight,
)


# Compiled models quantize activations with torch ops that inductor fuses into the preceding kernel, and
# the packed product takes the codes (bitconvert.kernels.ternary_linear_quantized). Off by default: on an
# H200 the products got faster but inductor's extra absmax reductions cost as much (2.4B decode 1.65x vs
# 1.66x bf16, docs/benchmarks.md). Set it before torch.compile traces the model.
COMPILED_ACT_QUANT = False


class _PackedProduct(torch.autograd.Function):
    """The packed kernel forward; backward treats activation quantization as the identity (straight
    through) and multiplies by the dequantized weight. The packed weights get no gradient: this is
    what lets adapters (LoRA) train on top of a frozen packed model."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer._packed_forward(x)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.layer.dequantized_weight(grad.dtype)
        return grad @ weight, None


class PackedBitLinear(nn.Module):
    """A frozen BitLinear. Buffers follow transformers' bitnet names: ``weight`` (uint8, packed) and
    ``weight_scale`` (the inverse scale: ``w = code / weight_scale``).

    By ``spec.variant``: ``b1.58`` packs ternary codes (out/4, in); ``bitnet1`` packs sign codes
    (out, in/8) with the same ``weight_scale``; ``onebit`` packs sign codes (out, in/8) and holds
    ``input_scale`` (g, one per input) and ``output_scale`` (h, one per output) instead of
    ``weight_scale``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, *, spec: QuantSpec,
                 use_rms_norm: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        packed = packed_weight_shape(out_features, in_features, spec.variant)
        self.register_buffer("weight", torch.zeros(packed, dtype=torch.uint8, device=device))
        if spec.variant == "onebit":
            self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float32, device=device))
            self.register_buffer("output_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        else:
            shape = scale_shape((out_features, in_features), spec.weight_scale, spec.group_size)
            self.register_buffer("weight_scale", torch.ones(shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.rms_norm = RMSNorm(in_features, spec.rms_norm_eps, device=device, dtype=dtype) if use_rms_norm else None
        # Not state: what the kernels may keep between calls (the unpacked weight on CPU).
        self.kernel_cache = TernaryCache()
        # Handed over for the next call only (bitconvert.layers.decoder): the int8 activations of its input,
        # quantized by the norm that made it, a residual to add to its output, and the maxima of |input| that the
        # attention kernel wrote (bitconvert.layers.attention).
        self._given: tuple | None = None
        self._residual: torch.Tensor | None = None
        self._absmax: tuple | None = None

    def give_activations(self, x: torch.Tensor, acts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """The next call, if its input is ``x`` itself, multiplies ``acts`` (:func:`quantize_for_kernels` of ``x``)
        instead of quantizing ``x`` again."""
        self._given = (x, acts)

    def give_absmax(self, x: torch.Tensor, parts: torch.Tensor) -> None:
        """The next call, if its input is ``x`` itself, may quantize it from ``parts`` (row maxima of ``|x|`` that
        the kernel which wrote ``x`` computed: ``ternary_linear``'s ``absmax_parts``)."""
        self._absmax = (x, parts)

    def add_residual(self, residual: torch.Tensor) -> None:
        """The next call returns ``residual + output`` (added in the kernel's epilogue where it can be)."""
        self._residual = residual

    def _packed_forward(self, x: torch.Tensor, swiglu: bool = False, acts=None,
                        residual: torch.Tensor | None = None, absmax: torch.Tensor | None = None) -> torch.Tensor:
        variant, granularity, group = self.spec.variant, self.spec.weight_scale, self.spec.group_size
        if variant == "b1.58":
            if acts is not None:
                return ternary_linear_quantized(*acts, self.weight, self.weight_scale, self.bias,
                                                granularity=granularity, group_size=group, dtype=x.dtype,
                                                swiglu=swiglu, residual=residual)
            return ternary_linear(x, self.weight, self.weight_scale, self.bias, granularity=granularity,
                                  group_size=group, cache=self.kernel_cache, swiglu=swiglu, residual=residual,
                                  absmax_parts=absmax)
        if variant == "onebit":
            y = onebit_linear(x, self.weight, self.input_scale, self.output_scale, self.bias)
        else:
            y = binary_linear(x, self.weight, self.weight_scale, self.bias, granularity=granularity, group_size=group)
        y = swiglu_reference(y) if swiglu else y
        return y if residual is None else residual + y

    def forward(self, x: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
        """``x · Wᵀ + b``; with ``swiglu`` (W's rows a SwiGLU MLP's gate and up projections, stacked)
        ``silu(gate) * up`` of it, out_features / 2 of them, computed by the product's own kernel."""
        given, residual, given_absmax = self._given, self._residual, self._absmax
        if given is not None or residual is not None or given_absmax is not None:
            self._given = self._residual = self._absmax = None
        acts = given[1] if given is not None and given[0] is x and self.rms_norm is None else None
        absmax = given_absmax[1] if given_absmax is not None and given_absmax[0] is x and self.rms_norm is None else None
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _PackedProduct.apply(x, self)
            y = swiglu_reference(y) if swiglu else y
            return y if residual is None else residual + y
        if torch.compiler.is_compiling() and self.spec.variant == "b1.58":
            if acts is None and COMPILED_ACT_QUANT:  # the quantizer as torch ops, for inductor to fuse with what made x
                acts = quantize_for_kernels(x)
            if acts is not None:
                return ternary_linear_quantized_op(*acts, self.weight, self.weight_scale, self.bias,
                                                   self.spec.weight_scale, self.spec.group_size, x.dtype, swiglu,
                                                   residual)
            return ternary_linear_op(x, self.weight, self.weight_scale, self.bias, self.spec.weight_scale,
                                     self.spec.group_size, swiglu, residual, absmax)
        return self._packed_forward(x, swiglu, acts, residual, absmax)

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the packed buffers stand for, for gradients and inspection."""
        if self.spec.variant == "onebit":
            return onebit_dequantize(unpack_binary(self.weight), self.input_scale, self.output_scale, dtype)
        return dequantize_weight(unpack_weight(self.weight, self.spec.variant), self.weight_scale, self.spec, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, variant={self.spec.variant}, "
                f"weight_scale={self.spec.weight_scale}")


class PackedExperts(nn.Module):
    """Frozen ternary experts (see ``BitExperts``); each expert a batch routes to is one ``ternary_linear``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn, *, spec: QuantSpec, device=None):
        super().__init__()
        self.spec, self.act_fn, self.num_experts = spec, act_fn, num_experts
        for name, (out_f, in_f) in {"gate_up_proj": (2 * intermediate, hidden), "down_proj": (hidden, intermediate)}.items():
            self.register_buffer(name, torch.zeros(num_experts, out_f // 4, in_f, dtype=torch.uint8, device=device))
            shape = scale_shape((num_experts, out_f, in_f), spec.weight_scale, spec.group_size)
            self.register_buffer(f"{name}_scale", torch.ones(shape, dtype=torch.float32, device=device))

    def _linear(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        return ternary_linear(x, getattr(self, name)[expert], getattr(self, f"{name}_scale")[expert],
                              granularity=self.spec.weight_scale, group_size=self.spec.group_size)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = self._linear("gate_up_proj", expert, hidden_states[token_idx]).chunk(2, dim=-1)
            h = self._linear("down_proj", expert, self.act_fn(gate) * up) * top_k_weights[token_idx, slot, None]
            output.index_add_(0, token_idx, h.to(output.dtype))
        return output
