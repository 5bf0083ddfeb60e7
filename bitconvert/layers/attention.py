"""The decode step's attention for transformers models: :func:`bitconvert.kernels.decode_attention`.

Registered with transformers' attention interface under :data:`DECODE_ATTENTION`, beside sdpa: one
query token per sequence goes to bitconvert's kernel (keys and values read once per key/value head,
none copied, a Triton kernel on CUDA); prompts (several query tokens) and anything the kernel does not
cover (dropout, soft-capping, attention sinks, float masks) go to transformers' own sdpa. Masks are
sdpa's, so padding, sliding windows and a static cache's empty slots mean what they mean there.

:func:`fuse_rope_attention` goes one step further for attention modules whose q/k/v are one fused packed
product (:func:`~bitconvert.layers.fused.fuse_projections`): at a decode step over a static cache, the
rotary embedding and the cache writes happen inside the attention kernel
(:func:`bitconvert.kernels.decode_attention_rope`) instead of in kernels of their own before it.
The cache positions of those layers then advance together, in one kernel after the last layer
(:class:`_DeferredPositions`), instead of one small kernel per layer. The attention kernel also writes the
largest |output| of each key/value head's query heads, which it hands to a packed o_proj
(:meth:`~bitconvert.layers.packed.PackedBitLinear.give_absmax`): its GEMV can quantize the output from those
few numbers instead of a quantizer launch of its own.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from contextlib import contextmanager

import torch

from bitconvert.kernels import reference_kernels
from bitconvert.kernels.attention import decode_attention_op, decode_attention_rope_op
from bitconvert.layers.fused import outputs_match, projection_group

log = logging.getLogger(__name__)

DECODE_ATTENTION = "bitconvert_decode"
# The fused decode step hands the attention output's absmax to a packed o_proj (module docstring); off: o_proj
# quantizes its input as any product does. Read while dynamo traces: set it before compiling.
HAND_OVER_ABSMAX = True
_EXTRAS = ("softcap", "position_bias", "s_aux", "sinks")  # what sdpa handles and the kernel does not


def _kernel_mask(mask) -> bool:
    """A mask the kernel takes: none, or sdpa's boolean (B, 1, 1, L) of one query token."""
    return mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.dtype == torch.bool)


def _flat_mask(mask, batch: int, keys: int):
    """sdpa's (B or 1, 1, 1, L) mask as the kernel's (B, keys): the last ``keys`` slots."""
    return None if mask is None else mask[:, 0, 0, -keys:].expand(batch, keys)


def decode_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             **kwargs):
    """transformers' attention function signature: ``query`` (B, H, Q, D), ``key``/``value`` (B, HKV, L, D);
    returns ``(output (B, Q, H, D), None)``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    batch, heads, q_length, dim = query.shape
    if (q_length != 1 or not _kernel_mask(attention_mask) or dropout or heads % key.shape[1]
            or any(kwargs.get(name) is not None for name in _EXTRAS)):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, **kwargs)
    scale = dim ** -0.5 if scaling is None else float(scaling)
    out = decode_attention_op(query[:, :, 0], key, value, _flat_mask(attention_mask, batch, key.shape[2]), scale)
    return out.reshape(batch, 1, heads, value.shape[-1]), None


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(DECODE_ATTENTION, decode_attention_forward)
    AttentionMaskInterface.register(DECODE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _configs(model):
    """The model's config and the sub-configs (a multimodal model's text model) that choose attention too."""
    config = model.config
    yield config
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            yield sub


def use_decode_attention(model) -> bool:
    """Switch a model that attends with sdpa to :data:`DECODE_ATTENTION` (idempotent); returns whether it
    attends with it now. Models on eager, flash or flex attention are left as they are, as is every model
    when ``BITCONVERT_DECODE_ATTENTION=0``."""
    if os.environ.get("BITCONVERT_DECODE_ATTENTION", "1") == "0":
        return False
    configs = [c for c in _configs(model) if getattr(c, "_attn_implementation", None) in ("sdpa", DECODE_ATTENTION)]
    if not configs or getattr(model.config, "_attn_implementation", None) not in ("sdpa", DECODE_ATTENTION):
        return False
    _register()
    for config in configs:
        config._attn_implementation = DECODE_ATTENTION
    return True


@contextmanager
def decode_attention(model):
    """:func:`use_decode_attention` inside the block only: the model's attention is as before afterwards."""
    before = [(c, getattr(c, "_attn_implementation", None)) for c in _configs(model)]
    use_decode_attention(model)
    try:
        yield
    finally:
        for config, implementation in before:
            config._attn_implementation = implementation


def cache_keyword(forward) -> str:
    """The name ``forward`` takes the cache under: transformers 5.24 renamed ``past_key_values`` to ``cache`` (the
    old name still works there, with a deprecation warning on every call); 5.17 knows only the old one."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _static_layer(cache, index: int):
    """The cache's layer ``index`` if it is transformers' StaticLayer with its tensors made, else None."""
    from transformers.cache_utils import StaticLayer

    layers = getattr(cache, "layers", None)
    if layers is None or not 0 <= index < len(layers):
        return None
    layer = layers[index]
    return layer if type(layer) is StaticLayer and layer.is_initialized else None


_probe_fast_steps = 0  # decode steps that took the fused path, counted in eager mode (the probe reads it)


class _DeferredPositions:
    """The cache positions that fused decode steps read and leave to be advanced, for one stack of layers.

    Each fused step reads its layer's position (the slot it writes) and nothing else in that forward pass reads
    it again, so the advance can wait: the module that runs the layers advances all of them in one
    ``_foreach_add_`` when it returns, one kernel per step instead of one per layer (a decode step of a 2.4B
    model is launch-bound: every kernel in the chain costs about a microsecond). A layer skipped, or one that
    took the modelling code's forward (which advances its own), is never listed. Cleared before every forward
    pass, so a pass that failed half-way leaves nothing behind.
    """

    def __init__(self, owner: torch.nn.Module):
        self.pending: list[torch.Tensor] = []
        self.hooks = (owner.register_forward_pre_hook(self.clear), owner.register_forward_hook(self.advance))

    def clear(self, *_):
        self.pending.clear()

    def advance(self, *_):
        if self.pending:
            torch._foreach_add_(self.pending, 1)
            self.pending.clear()

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def _rope_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                            past_key_values=None, **kwargs):
    """A decode step over a static cache in one kernel after the q/k/v product; anything else is the
    modelling code's own forward."""
    global _probe_fast_steps
    cache = cache if cache is not None else past_key_values
    original = type(self)._bitconvert_rope_original
    layer = _static_layer(cache, self.layer_idx) if cache is not None else None
    if (layer is None or hidden_states.shape[1] != 1 or position_embeddings is None or self.training
            or self.config._attn_implementation != DECODE_ATTENTION or not _kernel_mask(attention_mask)
            or any(kwargs.get(name) is not None for name in _EXTRAS)):
        return original.forward(self, hidden_states, position_embeddings, attention_mask,
                                **{cache_keyword(original.forward): cache}, **kwargs)
    batch = hidden_states.shape[0]
    qkv = self.q_proj.group.fused(hidden_states).reshape(batch, -1)
    cos, sin = (t.expand(batch, -1, -1)[:, -1] for t in position_embeddings)  # (1 or B, 1, D) -> (B, D)
    out, absmax = decode_attention_rope_op(qkv, cos, sin, layer.keys, layer.values, layer.cumulative_length,
                                           _flat_mask(attention_mask, batch, layer.keys.shape[2]),
                                           float(self.scaling), self.config.num_attention_heads)
    deferred = getattr(self, "_bitconvert_positions", None)
    if deferred is None:
        layer.cumulative_length.add_(1)  # as StaticLayer.update does; outside the operator, see triton_attention
    else:
        deferred.pending.append(layer.cumulative_length)
    if not torch.compiler.is_compiling():
        _probe_fast_steps += 1
    out = out.reshape(batch, 1, -1)
    if HAND_OVER_ABSMAX and hasattr(self.o_proj, "give_absmax"):
        self.o_proj.give_absmax(out, absmax)
    return self.o_proj(out), None


@functools.cache
def _rope_class(cls: type) -> type:
    return type(f"Rope{cls.__name__}", (cls,), {"forward": _rope_attention_forward, "_bitconvert_rope_original": cls})


def _rope_eligible(attn) -> bool:
    """q/k/v one fused product in that order, transformers' head counts, nothing between the product and the
    rotary embedding (q/k norms) or inside attention (sinks) that the kernel does not do."""
    views = projection_group(attn, ("q_proj", "k_proj", "v_proj"))
    if views is None:
        return False
    config, dim = getattr(attn, "config", None), getattr(attn, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not (isinstance(dim, int) and isinstance(heads, int) and isinstance(kv_heads, int)) or heads % kv_heads:
        return False
    sizes = (heads * dim, kv_heads * dim, kv_heads * dim)
    return ([v.index for v in views] == [0, 1, 2] and tuple(views[0].group.sizes) == sizes
            and not any(hasattr(attn, name) for name in ("q_norm", "k_norm", "sinks"))
            and isinstance(getattr(attn, "layer_idx", None), int)
            and all(hasattr(attn, name) for name in ("scaling", "o_proj")))


def _probe_decode(model) -> tuple[torch.Tensor, int]:
    """Logits of two decode steps after a 4-token prompt over a static cache (reference kernels, two sequences,
    the first left-padded), and how many attention calls took the fused path."""
    global _probe_fast_steps
    from transformers import StaticCache

    device = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", 2)
    ids = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    cache = StaticCache(config=model.config, max_cache_len=8)
    keyword = cache_keyword(model.forward)
    _probe_fast_steps = 0
    logits = []
    with reference_kernels(), decode_attention(model):
        model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True, **{keyword: cache})
        for step in (4, 5):
            logits.append(model(input_ids=ids[:, step:step + 1], attention_mask=mask[:, :step + 1], use_cache=True,
                                **{keyword: cache}).logits.float())
    return torch.cat(logits, dim=1), _probe_fast_steps


def _layer_stack(model, names: list[str]):
    """The module whose forward runs every named attention module: the nearest common ancestor that is not a
    container (a Llama's ``model``, which holds ``layers``), or None when the model itself is that container."""
    parts = [name.split(".") for name in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    while common:
        owner = model.get_submodule(".".join(common))
        if not isinstance(owner, (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)):
            return owner
        common.pop()
    return None if isinstance(model, (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)) else model


def _defer_positions(model, plans) -> None:
    """Attach one :class:`_DeferredPositions` to the fused modules of each stack of layers."""
    names = [name for name, *_ in plans]
    owner = _layer_stack(model, names)
    if owner is None:
        return
    deferred = _DeferredPositions(owner)
    for _, module, _ in plans:
        module._bitconvert_positions = deferred


def _undefer_positions(modules) -> None:
    for module in modules:
        deferred = module.__dict__.pop("_bitconvert_positions", None)
        if deferred is not None:
            deferred.remove()


@torch.no_grad()
def fuse_rope_attention(model) -> list[str]:
    """Give every eligible attention module the fused decode step of the module docstring; returns their names.

    The model's logits over two decode steps of a static cache must come out the same afterwards (reference
    kernels on both sides, so what is compared is the operator's arithmetic against the modelling code's), or
    every module is put back. Idempotent; :func:`unfuse_rope_attention` undoes it.
    """
    plans = [(name, module, type(module)) for name, module in model.named_modules()
             if not hasattr(type(module), "_bitconvert_rope_original") and _rope_eligible(module)]
    if not plans:
        return []
    try:
        want, _ = _probe_decode(model)
        for _, module, cls in plans:
            module.__class__ = _rope_class(cls)
        _defer_positions(model, plans)
        got, fast = _probe_decode(model)
        same = outputs_match(got, want) and fast > 0
        why = "its logits changed" if fast else "no decode step took the fused path"
    except Exception as err:  # e.g. a model whose forward passes its attention other arguments
        same, why = False, f"{type(err).__name__}: {err}"
    if not same:
        for _, module, cls in plans:
            module.__class__ = cls
        _undefer_positions(module for _, module, _ in plans)
        log.info("attention left as it is (%s)", why)
        return []
    return [name for name, *_ in plans]


def unfuse_rope_attention(model) -> int:
    """Undo :func:`fuse_rope_attention`; returns how many attention modules were put back."""
    count = 0
    for module in model.modules():
        original = getattr(type(module), "_bitconvert_rope_original", None)
        if original is not None:
            module.__class__ = original
            _undefer_positions([module])
            count += 1
    return count
