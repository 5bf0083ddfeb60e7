"""Decoder layers that hand work to their packed products: two kernels fewer per layer at decode.

A batch-1 decode step is a chain of small kernels, and each costs a launch step of a few microseconds
more than its bytes. A pre-norm decoder layer (Llama, Mistral, Qwen2, SmolLM2) runs per layer, after
:func:`~bitconvert.layers.fused.fuse_projections`: residual add and RMSNorm, the activation quantizer,
the q/k/v product, attention, a quantizer and o_proj, residual add and RMSNorm, a quantizer and the
gate/up product, a quantizer and down_proj. :func:`fuse_decoder_layers` changes two things:

- each RMSNorm becomes a :class:`QuantizingRMSNorm`: one kernel that normalises and also writes the
  int8 activations of the packed product that reads its output (which then skips its quantizer);
- the layer's residual adds move into o_proj and down_proj, whose kernels add the residual in their
  epilogue, so no add is left for the norm after them to fuse.

The results are the modelling code's own (the same torch operations where no kernel runs, checked on
the model when the layers are changed). Only for frozen inference, like fused projections, and for CUDA:
on CPU the products that take given activations skip their cache of unpacked weights. Measured on an
H200 (compiled 2.4B decode, three calls, docs/kernels.md): 768-780 → 793-811 tokens/s, 2.26-2.31x →
2.33-2.39x bf16.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from bitconvert.kernels import reference_kernels, rms_norm_quantize, rms_norm_quantize_op, rms_norm_quantize_reference
from bitconvert.layers.fused import FusedSwiGLU, outputs_match, projection_group
from bitconvert.layers.packed import PackedBitLinear

log = logging.getLogger(__name__)


class QuantizingRMSNorm(nn.Module):
    """An RMSNorm that gives the packed product reading its output that output's int8 activations.

    Holds the original norm's weight under the same name, so state dicts keep their keys.
    """

    def __init__(self, original: nn.Module, eps: float, consumer: PackedBitLinear):
        super().__init__()
        self.weight, self.eps = original.weight, eps
        # Not submodules: the consumer has its own place in the model, the original comes back on unfusing.
        object.__setattr__(self, "consumer", consumer)
        object.__setattr__(self, "original", original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return rms_norm_quantize_reference(x, self.weight, self.eps)[0]
        quantize = rms_norm_quantize_op if torch.compiler.is_compiling() else rms_norm_quantize
        normed, codes, inv, total = quantize(x, self.weight, self.eps)
        self.consumer.give_activations(normed, (codes, inv, total))
        return normed

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, quantizes for the packed product after it"


def _residual_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """A pre-norm decoder layer whose o_proj and down_proj add the residual stream themselves."""
    self.self_attn.o_proj.add_residual(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    _down_proj(self.mlp).add_residual(hidden_states)
    return self.mlp(self.post_attention_layernorm(hidden_states))


@functools.cache
def _residual_class(cls: type) -> type:
    return type(f"Residual{cls.__name__}", (cls,), {"forward": _residual_forward, "_bitconvert_original": cls})


def _down_proj(mlp: nn.Module) -> nn.Module | None:
    return getattr(mlp.original if isinstance(mlp, FusedSwiGLU) else mlp, "down_proj", None)


def _first_product(module: nn.Module, names: tuple[str, ...]) -> PackedBitLinear | None:
    """The packed product that reads what ``module``'s norm makes: a fused group's stacked product, or a
    FusedSwiGLU's gate/up product."""
    if isinstance(module, FusedSwiGLU):
        return module.gate_up
    views = projection_group(module, names)
    return views[0].group.fused if views else None


@torch.no_grad()
def _norm_eps(norm: nn.Module) -> float | None:
    """``norm``'s epsilon if it computes transformers' RMSNorm (checked on a random input), else None."""
    weight = getattr(norm, "weight", None)
    eps = next((getattr(norm, a) for a in ("variance_epsilon", "eps") if isinstance(getattr(norm, a, None), float)), None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or eps is None:
        return None
    x = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    try:
        return eps if torch.equal(norm(x), rms_norm_quantize_reference(x, weight, eps)[0]) else None
    except Exception:
        return None


def _eligible(layer: nn.Module) -> tuple[PackedBitLinear, PackedBitLinear, float, float] | None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = [getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
    if attn is None or mlp is None or any(n is None for n in norms):
        return None
    qkv, gate_up = _first_product(attn, ("q_proj", "k_proj", "v_proj")), _first_product(mlp, ("gate_proj", "up_proj"))
    products = (qkv, gate_up, getattr(attn, "o_proj", None), _down_proj(mlp))
    if not all(isinstance(p, PackedBitLinear) and p.spec.variant == "b1.58" and p.rms_norm is None for p in products):
        return None
    eps = [_norm_eps(n) for n in norms]
    return None if None in eps else (qkv, gate_up, eps[0], eps[1])


def _probe_logits(model: nn.Module) -> torch.Tensor:
    device = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", 2)
    ids = torch.randint(0, vocab, (1, 6), generator=torch.Generator().manual_seed(0)).to(device)
    with reference_kernels():
        return model(input_ids=ids, use_cache=False).logits.float()


def _apply(layer: nn.Module, cls: type, norms: tuple[nn.Module, nn.Module]) -> None:
    layer.__class__ = cls
    layer.input_layernorm, layer.post_attention_layernorm = norms


@torch.no_grad()
def fuse_decoder_layers(model: nn.Module) -> list[str]:
    """Change every eligible decoder layer as the module docstring says; returns their names.

    Eligible: ``input_layernorm`` and ``post_attention_layernorm`` compute transformers' RMSNorm, q/k/v and
    gate/up are fused (:func:`fuse_projections` first), o_proj and down_proj are packed ternary. The model's
    logits on a short random input must come out the same afterwards, or every layer is put back.
    Idempotent.
    """
    plans = []  # (name, layer, as it is, as it will be): each a class and the two norms
    for name, layer in model.named_modules():
        if hasattr(type(layer), "_bitconvert_original") or (found := _eligible(layer)) is None:
            continue
        qkv, gate_up, eps_in, eps_post = found
        before = (type(layer), (layer.input_layernorm, layer.post_attention_layernorm))
        after = (_residual_class(type(layer)), (QuantizingRMSNorm(layer.input_layernorm, eps_in, qkv),
                                                QuantizingRMSNorm(layer.post_attention_layernorm, eps_post, gate_up)))
        plans.append((name, layer, before, after))
    if not plans:
        return []
    try:
        want = _probe_logits(model)
        for _, layer, _, after in plans:
            _apply(layer, *after)
        got = _probe_logits(model)
        same, why = outputs_match(got, want), "its logits changed"
    except Exception as err:  # e.g. a layer called with arguments this forward does not pass on
        same, why = False, f"{type(err).__name__}: {err}"
    if not same:
        for _, layer, before, _ in plans:
            _apply(layer, *before)
        log.info("decoder layers left as they are (%s)", why)
        return []
    return [name for name, *_ in plans]


def unfuse_decoder_layers(model: nn.Module) -> int:
    """Undo :func:`fuse_decoder_layers`; returns how many layers were put back."""
    count = 0
    for layer in model.modules():
        original = getattr(type(layer), "_bitconvert_original", None)
        if original is not None:
            _apply(layer, original, (layer.input_layernorm.original, layer.post_attention_layernorm.original))
            count += 1
    return count
