"""The decode step's attention for transformers models: :func:`bitconvert.kernels.decode_attention`.

Registered with transformers' attention interface under :data:`DECODE_ATTENTION`, beside sdpa: one
query token per sequence goes to bitconvert's kernel (keys and values read once per key/value head,
none copied, a Triton kernel on CUDA); prompts (several query tokens) and anything the kernel does not
cover (dropout, soft-capping, attention sinks, float masks) go to transformers' own sdpa. Masks are
sdpa's, so padding, sliding windows and a static cache's empty slots mean what they mean there.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from bitconvert.kernels.attention import decode_attention_op

DECODE_ATTENTION = "bitconvert_decode"
_EXTRAS = ("softcap", "position_bias", "s_aux", "sinks")  # what sdpa handles and the kernel does not


def decode_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             **kwargs):
    """transformers' attention function signature: ``query`` (B, H, Q, D), ``key``/``value`` (B, HKV, L, D);
    returns ``(output (B, Q, H, D), None)``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    batch, heads, q_length, dim = query.shape
    mask = attention_mask
    shared_mask = mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1
                                   and mask.dtype == torch.bool)
    if (q_length != 1 or not shared_mask or dropout or heads % key.shape[1]
            or any(kwargs.get(name) is not None for name in _EXTRAS)):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, **kwargs)
    scale = dim ** -0.5 if scaling is None else float(scaling)
    keys = key.shape[2]
    flat_mask = None if mask is None else mask[:, 0, 0, -keys:].expand(batch, keys)
    out = decode_attention_op(query[:, :, 0], key, value, flat_mask, scale)
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
