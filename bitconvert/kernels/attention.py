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


def _kernel_eligible(query, key, value, mask) -> bool:
    return (query.is_cuda and query.dtype in _KERNEL_DTYPES and key.dtype == value.dtype == query.dtype
            and key.shape[-1] == value.shape[-1] == query.shape[-1] and query.shape[1] % key.shape[1] == 0
            and key.stride(-1) == 1 and value.stride(-1) == 1 and not (torch.is_grad_enabled() and query.requires_grad)
            and (mask is None or mask.dtype in (torch.bool, torch.uint8))
            and not _reference_only() and triton_available())


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
