"""Attention of one query token per sequence over a key/value cache: the decode step's attention.

``decode_attention`` is the entry point: CUDA half-precision tensors run a Triton kernel
(:mod:`bitconvert.kernels.triton_attention`) that reads each key/value head once for all the query
heads it serves; everything else runs :func:`decode_attention_reference`, torch's
``scaled_dot_product_attention`` on the same grouping. Neither copies keys or values per query head,
which transformers' sdpa path does for grouped-query models whenever a mask is given (and a static
cache always gives one).
"""

from __future__ import annotations

import torch

from bitconvert.kernels.ternary import _reference_only, triton_available

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def decode_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``query`` (B, H, D), ``key``/``value`` (B, HKV, L, D), ``mask`` None or (B, L) bool (True: attend)
    -> (B, H, D): the query heads of each key/value group are that group's query rows."""
    batch, heads, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    attn_mask = None if mask is None else mask.bool()[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attn_mask, scale=scale)
    return out.reshape(batch, heads, value.shape[-1])


def _kernel_runs(x, mask) -> bool:
    """What both kernels need of their input ``x`` and mask: CUDA half precision, no gradient wanted, a
    boolean or uint8 mask, and Triton allowed and present."""
    return (x.is_cuda and x.dtype in _KERNEL_DTYPES and not (torch.is_grad_enabled() and x.requires_grad)
            and (mask is None or mask.dtype in (torch.bool, torch.uint8)) and not _reference_only()
            and triton_available())


def _kernel_eligible(query, key, value, mask) -> bool:
    return (_kernel_runs(query, mask) and key.dtype == value.dtype == query.dtype
            and key.shape[-1] == value.shape[-1] == query.shape[-1] and query.shape[1] % key.shape[1] == 0
            and key.stride(-1) == 1 and value.stride(-1) == 1)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """``softmax(q · kᵀ · scale) · v`` for one query per sequence: shapes as :func:`decode_attention_reference`."""
    if _kernel_eligible(query, key, value, mask):
        from bitconvert.kernels import triton_attention

        return triton_attention.decode_attention(query if query.stride(-1) == 1 else query.contiguous(), key, value,
                                                 mask, scale)
    return decode_attention_reference(query, key, value, mask, scale)


# One opaque operator for torch.compile, as the packed product is: inductor must not trace into the launcher.
@torch.library.custom_op("bitconvert::decode_attention", mutates_args=(),
                         schema="(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor")
def decode_attention_op(query, key, value, mask, scale):
    return decode_attention(query, key, value, mask, scale)


@decode_attention_op.register_fake
def _decode_attention_shape(query, key, value, mask, scale):
    return query.new_empty(query.shape)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotary convention: the last dimension's halves (a, b) become (-b, a)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def decode_attention_rope_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor,
                                    value_cache: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor | None,
                                    scale: float, heads: int) -> torch.Tensor:
    """What transformers' attention does for one new token over a static cache, in its order: rotate q and k,
    write k and v at position ``slot`` of the caches, attend (advancing the position is the caller's). ``qkv``
    (B, (H + 2 HKV) D): the stacked q/k/v product; ``cos``/``sin`` (B, D); caches (B, HKV, L, D); ``slot`` one
    int64. -> (B, H, D)."""
    batch, kv_heads, dim = qkv.shape[0], key_cache.shape[1], key_cache.shape[-1]
    query, key, value = qkv.view(batch, heads + 2 * kv_heads, dim).split([heads, kv_heads, kv_heads], dim=1)
    cos, sin = cos[:, None], sin[:, None]
    query = query * cos + rotate_half(query) * sin
    key = key * cos + rotate_half(key) * sin
    position = slot.reshape(1)
    key_cache.index_copy_(2, position, key[:, :, None].to(key_cache.dtype))
    value_cache.index_copy_(2, position, value[:, :, None].to(value_cache.dtype))
    return decode_attention_reference(query.to(key_cache.dtype), key_cache, value_cache, mask, scale)


def _rope_kernel_eligible(qkv, cos, sin, key_cache, value_cache, slot, mask, heads) -> bool:
    dim = key_cache.shape[-1]
    return (_kernel_runs(qkv, mask) and key_cache.dtype == value_cache.dtype == qkv.dtype
            and qkv.is_contiguous() and dim % 2 == 0 and value_cache.shape[-1] == dim
            and qkv.shape[-1] == (heads + 2 * key_cache.shape[1]) * dim and heads % key_cache.shape[1] == 0
            and cos.shape[-1] == sin.shape[-1] == dim and cos.stride(-1) == sin.stride(-1) == 1
            and key_cache.stride(-1) == value_cache.stride(-1) == 1 and slot.dtype == torch.int64 and slot.numel() == 1)


def group_absmax(out: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The largest |value| of each key/value head's group of query heads in ``out`` (B, H, D): (B, HKV) float32.
    Their maximum per sequence is that sequence's absmax, which the packed product reading ``out`` quantizes by."""
    return out.reshape(out.shape[0], kv_heads, -1).abs().amax(-1).float()


def decode_attention_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor | None, scale: float,
                          heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_attention_rope_reference` as one Triton kernel on CUDA half-precision tensors (the rotary
    embedding and the cache write inside the attention kernel); elsewhere the reference. Returns the output and
    its :func:`group_absmax`, which the kernel writes as it stores the output."""
    if _rope_kernel_eligible(qkv, cos, sin, key_cache, value_cache, slot, mask, heads):
        from bitconvert.kernels import triton_attention

        return triton_attention.decode_attention_rope(qkv, cos, sin, key_cache, value_cache, slot, mask, scale, heads)
    out = decode_attention_rope_reference(qkv, cos, sin, key_cache, value_cache, slot, mask, scale, heads)
    return out, group_absmax(out, key_cache.shape[1])


@torch.library.custom_op("bitconvert::decode_attention_rope", mutates_args=("key_cache", "value_cache"),
                         schema="(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) key_cache, Tensor(b!) value_cache, "
                                "Tensor slot, Tensor? mask, float scale, int heads) -> (Tensor, Tensor)")
def decode_attention_rope_op(qkv, cos, sin, key_cache, value_cache, slot, mask, scale, heads):
    return decode_attention_rope(qkv, cos, sin, key_cache, value_cache, slot, mask, scale, heads)


@decode_attention_rope_op.register_fake
def _decode_attention_rope_shape(qkv, cos, sin, key_cache, value_cache, slot, mask, scale, heads):
    batch, kv_heads = qkv.shape[0], key_cache.shape[1]
    return (key_cache.new_empty((batch, heads, key_cache.shape[-1])),
            qkv.new_empty((batch, kv_heads), dtype=torch.float32))
