"""Triton kernel for attention of one query token per sequence (decode) over a key/value cache.

Imported only when a CUDA tensor reaches :func:`bitconvert.kernels.attention.decode_attention`.

One program takes one key/value head of one sequence and the query heads it serves (grouped-query
attention: ``G`` query heads per key/value head), so keys and values are read once, never copied
per query head. The G queries are the rows of one small matrix product per block of keys (padded to
16 rows, the tensor cores' smallest tile). Softmax is online (flash attention's running maximum and
sum), in float32, with base-2 exponentials.

Split-KV: a cache has few key/value heads (4 of them at batch 1 fill 4 of 132 SMs), so the keys are
cut into slices, one program each. Each writes its unnormalised sum, maximum and total to a scratch
buffer; the last one to finish (a per-head counter says which, as in the ternary kernels' split-K)
combines them (all slices' loads issued at once: an unrolled loop over at most MAX_SPLITS), writes the
output and resets its counter.

Each block's mask, keys and values are loaded together, one memory round trip, and the mask applies
to the scores. In a long cache (more than SKIP_AFTER_KEYS slots) a block is first checked against
the mask and not read at all when no key in it counts (a static cache's unwritten end): one round
trip more per block, far fewer bytes.

ROPE: the kernel also does the two steps before attention that transformers runs as separate kernels.
It reads this step's raw q/k/v (one row of the stacked product per sequence) and rotates q and k
(rotary embedding, transformers' ``rotate_half`` convention). The program whose slice holds the cache
slot writes the new key and value there before it reads its keys. The cache's position is read, not
advanced: the caller advances it, with an in-place add that torch.compile orders correctly (when this
operator advanced it, inductor recomputed the rotary angles of later layers from the advanced position).

AMAX: the program that writes a key/value head's output also stores the largest |value| of it (as stored,
rounded), one float per head and sequence. The packed o_proj that reads the output then quantizes it inside its
GEMV from those few maxima, without a quantizer launch of its own or a pass over the whole row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitconvert.kernels.triton_ternary import (INTERPRET, _overlap_on, _pdl_meta, _sm_count,
                                               _wait_for_previous_kernel)

BLOCK_KEYS = 64
MAX_SPLITS = 16  # the combination's loop is unrolled: its loads are all in flight together
SKIP_AFTER_KEYS = 1024
COUNTERS = 1 << 14  # key/value heads x sequences that one split call may cover


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, cnt_ptr, amax_ptr, L, HKV, keys_per_split,
                             n_splits, scale_log2,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                             stride_mb, stride_ml, stride_ob, stride_oh,
                             cos_ptr, sin_ptr, slot_ptr, stride_cb, stride_sb,
                             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                             BN: tl.constexpr, HAS_MASK: tl.constexpr, SKIP: tl.constexpr, SP: tl.constexpr,
                             ROPE: tl.constexpr, AMAX: tl.constexpr, PDL: tl.constexpr):
    """``q`` (B, H, D) with H = HKV * G, ``k``/``v`` (B, HKV, L, D), ``mask`` (B, L) uint8 (1: attend),
    ``out`` (B, H, D). ``part``: float32 scratch (B * HKV, n_splits, GP, DP + 2) when SP > 1 (SP: a power
    of two, at least n_splits). SKIP: blocks the mask excludes are not read.

    ROPE: ``q`` is this step's stacked product (B, (H + 2 HKV) D), q then k then v, not yet rotated; ``cos``,
    ``sin`` (B, D); ``slot`` (one int64) is the cache position that the new key and value go to.

    AMAX: ``amax`` float32 (B * HKV,) receives each head group's largest |output| (module docstring)."""
    SPLIT: tl.constexpr = SP > 1
    _wait_for_previous_kernel(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    g_mask = offs_g < G
    d_mask = offs_d < D
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, L)
    if ROPE:
        HALF: tl.constexpr = D // 2
        row = q_ptr + b.to(tl.int64) * stride_qb
        cos = tl.load(cos_ptr + b.to(tl.int64) * stride_cb + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + b.to(tl.int64) * stride_sb + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        # rotate_half(x) = (-x[HALF:], x[:HALF]): each element pairs with the one HALF away, the first half negated
        partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
        sin = tl.where(offs_d < HALF, -sin, sin)
        q_mask = g_mask[:, None] & d_mask[None, :]
        q_cols = row + (h * G + offs_g)[:, None] * D
        q_raw = tl.load(q_cols + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
        q_pair = tl.load(q_cols + partner[None, :], mask=q_mask, other=0.0).to(tl.float32)
        q = (q_raw * cos[None, :] + q_pair * sin[None, :]).to(k_ptr.dtype.element_ty)
        slot = tl.load(slot_ptr)
        if (slot >= lo) & (slot < hi):  # one program per key/value head writes the new key and value
            k_cols = row + (HKV * G + h) * D
            k_new = tl.load(k_cols + offs_d, mask=d_mask, other=0.0).to(tl.float32) * cos + \
                tl.load(k_cols + partner, mask=d_mask, other=0.0).to(tl.float32) * sin
            v_new = tl.load(row + (HKV * G + HKV + h) * D + offs_d, mask=d_mask, other=0.0)
            tl.store(k_base + slot * stride_kl + offs_d, k_new.to(k_ptr.dtype.element_ty), mask=d_mask)
            tl.store(v_base + slot * stride_vl + offs_d, v_new.to(v_ptr.dtype.element_ty), mask=d_mask)
        tl.debug_barrier()  # the block that holds the slot is read below, by every thread of the program
    else:
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        valid = offs_n < hi
        if HAS_MASK:
            attend = tl.load(mask_ptr + b.to(tl.int64) * stride_mb + offs_n * stride_ml, mask=valid, other=0)
            valid = valid & (attend != 0)
        if SKIP:
            if tl.max(valid.to(tl.int32), axis=0) > 0:
                m_i, l_i, acc = _attend_block(q, k_base, v_base, offs_n, valid, valid, d_mask, offs_d, stride_kl,
                                              stride_vl, scale_log2, m_i, l_i, acc)
        else:  # keys and values load beside the mask: the load masks do not wait for it
            m_i, l_i, acc = _attend_block(q, k_base, v_base, offs_n, offs_n < hi, valid, d_mask, offs_d, stride_kl,
                                          stride_vl, scale_log2, m_i, l_i, acc)

    out_rows = out_ptr + b.to(tl.int64) * stride_ob + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if not SPLIT:
        out = (acc / tl.where(l_i > 0, l_i, 1.0)[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_rows, out, mask=out_mask)
        if AMAX:
            _store_absmax(amax_ptr + bh, out, out_mask)
    else:
        W: tl.constexpr = DP + 2
        part = part_ptr + (bh.to(tl.int64) * n_splits + split) * GP * W
        tl.store(part + offs_g[:, None] * W + offs_d[None, :], acc)
        tl.store(part + offs_g * W + DP, m_i)
        tl.store(part + offs_g * W + DP + 1, l_i)
        tl.debug_barrier()  # every thread's stores precede the counter's release
        arrived = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
        if arrived == n_splits - 1:
            tl.debug_barrier()
            first = part_ptr + bh.to(tl.int64) * n_splits * GP * W
            # Each slice's sums are scaled by exp2(its maximum - the running one); unrolled, so that every
            # load (.cg: from L2, where the other programs' stores are) is issued before any is used.
            m_all = tl.full([GP], float("-inf"), tl.float32)
            total = tl.zeros([GP], tl.float32)
            out = tl.zeros([GP, DP], tl.float32)
            for s_i in tl.static_range(SP):
                one = first + s_i * GP * W
                here = s_i < n_splits
                m_s = tl.load(one + offs_g * W + DP, mask=g_mask & here, other=float("-inf"), cache_modifier=".cg")
                l_s = tl.load(one + offs_g * W + DP + 1, mask=g_mask & here, other=0.0, cache_modifier=".cg")
                acc_s = tl.load(one + offs_g[:, None] * W + offs_d[None, :], mask=out_mask & here, other=0.0,
                                cache_modifier=".cg")
                m_new = tl.maximum(m_all, m_s)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                old = tl.exp2(m_all - m_safe)
                new = tl.exp2(m_s - m_safe)
                total = total * old + l_s * new
                out = out * old[:, None] + acc_s * new[:, None]
                m_all = m_new
            out = (out / tl.where(total > 0, total, 1.0)[:, None]).to(out_ptr.dtype.element_ty)
            tl.store(out_rows, out, mask=out_mask)
            if AMAX:
                _store_absmax(amax_ptr + bh, out, out_mask)
            tl.atomic_xchg(cnt_ptr + bh, 0, sem="relaxed")


@triton.jit
def _store_absmax(ptr, out, mask):
    """The largest |value| of one program's output as stored (``out`` already rounded), as float32."""
    tl.store(ptr, tl.max(tl.max(tl.where(mask, tl.abs(out.to(tl.float32)), 0.0), axis=1), axis=0))


@triton.jit
def _attend_block(q, k_base, v_base, offs_n, load_mask, valid, d_mask, offs_d, stride_kl, stride_vl, scale_log2,
                  m_i, l_i, acc):
    """One block of keys into the running maximum ``m_i``, sum ``l_i`` and output ``acc`` (base-2 online
    softmax). Keys not ``valid`` get no weight; blocks with none at all leave the three unchanged."""
    kv_mask = load_mask[:, None] & d_mask[None, :]
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.where(valid[None, :], tl.dot(q, tl.trans(k)) * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: every weight stays 0
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


_counters: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device) -> torch.Tensor | None:
    """Per-head arrival counters, all zero between calls (the last program of a head resets its own).
    Made outside any CUDA graph capture: memory allocated during one belongs to that graph."""
    if device not in _counters:
        if not INTERPRET and torch.cuda.is_current_stream_capturing():
            return None
        _counters[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return _counters[device]


def split_count(heads: int, keys: int, device: torch.device) -> int:
    """Slices of the keys: enough programs to cover every SM about twice, at least one block of keys each,
    at most MAX_SPLITS."""
    blocks = triton.cdiv(keys, BLOCK_KEYS)
    return max(1, min(blocks, MAX_SPLITS, 2 * _sm_count(device) // max(1, heads)))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, splits: int | None = None) -> torch.Tensor:
    """``softmax(q · kᵀ · scale) · v`` for ``query`` (B, H, D), ``key``/``value`` (B, HKV, L, D) with the
    last dimension contiguous, ``mask`` None or (B, L) uint8/bool (1: attend). Returns (B, H, D)."""
    return _launch(query, query.shape[1], key, value, mask, scale, splits)


def decode_attention_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor | None, scale: float,
                          heads: int, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, the cache write and decode attention in one kernel (module docstring, ROPE):
    ``qkv`` (B, (H + 2 HKV) D) contiguous, ``cos``/``sin`` (B, D), ``key_cache``/``value_cache``
    (B, HKV, L, D), ``slot`` a one-element int64 tensor (the position written). Returns the output (B, H, D)
    and each head group's largest |output| (B, HKV) float32 (AMAX)."""
    return _launch(qkv, heads, key_cache, value_cache, mask, scale, splits, (cos, sin, slot), absmax=True)


def _launch(query, heads, key, value, mask, scale, splits, rope=None, absmax=False):
    batch, dim = query.shape[0], key.shape[-1]
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    out = torch.empty((batch, heads, dim), dtype=key.dtype, device=query.device)
    splits = min(splits or split_count(batch * kv_heads, keys, query.device), MAX_SPLITS)
    counters = _split_counters(query.device) if splits > 1 and batch * kv_heads <= COUNTERS else None
    if counters is None:
        splits = 1
    per_split = triton.cdiv(triton.cdiv(keys, BLOCK_KEYS), splits) * BLOCK_KEYS
    splits = triton.cdiv(keys, per_split)
    gp, dp = max(16, triton.next_power_of_2(groups)), max(16, triton.next_power_of_2(dim))
    part = (torch.empty((batch * kv_heads, splits, gp, dp + 2), dtype=torch.float32, device=query.device)
            if splits > 1 else out)
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    mask_arg = mask if mask is not None else out
    cos, sin, slot = rope if rope is not None else (out, out, out)
    amax = torch.empty((batch, kv_heads), dtype=torch.float32, device=query.device) if absmax else out
    _decode_attention_kernel[(batch * kv_heads, splits)](
        query, key, value, mask_arg, out, part, counters if splits > 1 else out, amax, keys, kv_heads, per_split,
        splits,
        scale * 1.4426950408889634,  # log2(e): exp(x) = exp2(x * log2 e)
        query.stride(0), query.stride(1) if rope is None else 0, key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        mask.stride(0) if mask is not None else 0, mask.stride(1) if mask is not None else 0,
        out.stride(0), out.stride(1),
        cos, sin, slot,
        cos.stride(0) if rope is not None else 0, sin.stride(0) if rope is not None else 0,
        G=groups, GP=gp, D=dim, DP=dp, BN=BLOCK_KEYS, HAS_MASK=mask is not None,
        SKIP=mask is not None and keys > SKIP_AFTER_KEYS, SP=triton.next_power_of_2(splits), ROPE=rope is not None,
        AMAX=absmax, num_warps=4, **_pdl_meta(_overlap_on(query.device).pdl))
    return (out, amax) if absmax else out
