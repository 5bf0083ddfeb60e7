"""Triton kernels for ``y = int8(x) · Wᵀ`` with ternary W packed 2 bits a weight.

Imported only when a CUDA tensor reaches :func:`bitconvert.kernels.ternary_linear`, so that
CPU-only installs need no triton.

The kernels read transformers' bitnet layout as it is stored (no repacking): ``packed`` is uint8
``(R, K)`` with ``R = N / 4``; byte ``(r, k)`` holds ``code + 1`` of the rows ``r, r + R, r + 2R,
r + 3R`` at bits 0, 2, 4, 6. So one tile of bytes yields four weight tiles, for four blocks of
output rows, and each tile of output is written to four row blocks of ``y``.

- ``_act_quant_kernel``: per-token absmax and int8 codes (BitNet's activation quantizer).
- ``_gemv_kernel`` (decode, a few tokens): CUDA cores. Four bytes of a packed row are one int32
  word; ``(word >> 2b) & 0x03030303`` are the codes+1 of four inputs of one row, and ``dp4a``
  multiplies them with four int8 activation codes and accumulates in one instruction.
  With ``FUSED`` (batch <= 8), each program quantizes the tokens itself from ``x`` (absmax over
  the row, then its slice's codes, as ``_act_quant_kernel`` computes them): one launch, no codes
  in memory. Every program reads all of ``x``, from L2.
- ``_gemm_kernel`` (prefill): tensor cores through ``tl.dot`` on int8.

Both multiply with ``code + 1`` in {0, 1, 2} and subtract ``Σ x`` afterwards, which saves one
operation per weight. With ``SWIGLU`` (a SwiGLU MLP's gate and up rows stacked) their epilogue writes
``silu(gate) * up`` instead of both: in this layout the gate and up rows of one feature land in the
same program (row blocks 0 and 2, 1 and 3), so the product needs no kernel after it. Integer sums
are exact, so tensor and channel scales give the reference's result up to the order of float32
scaling (identical in practice).

Split-K: when a matrix has too few rows to fill the GPU, K is cut into slices whose int32 partial
sums are added atomically into a workspace; the last program to finish a tile (a per-tile counter
says which) applies the scales and bias, writes ``y`` and zeroes its part of the workspace and its
counter. The workspace is therefore all zeros between calls, so no memset is launched, and the
result does not depend on the order of the additions.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
import triton
import triton.language as tl

SCALE_MODES = {"tensor": 0, "channel": 1, "group": 2}
GEMV_MAX_M = 16  # the dp4a kernel keeps one accumulator per token: beyond this, tensor cores win
GEMV_MAX_K = 1 << 16  # its int32 sums of 64 * code * x stay exact up to this many inputs
# Measured on an H200 (docs/kernels.md): PDL made the GEMM 2-10% faster at 8 tokens and up to 18% slower at
# 64 (also when it let the next kernel launch only after its products), so larger GEMMs launch plainly.
GEMM_PDL_MAX_M = 16
FUSED_MAX_M = 8  # every program of the fused GEMV quantizes all its tokens: worth it for a few only
# Which GEMVs quantize the activations themselves: "auto" lets the tuner measure the fused GEMV against
# quantize-then-GEMV, "always" keeps only the fused one where it applies (batch <= FUSED_MAX_M), "never"
# drops it. BITCONVERT_FUSED_GEMV=auto|always|never (1 and 0 mean auto and never). The fused GEMV passed
# every check of benchmarks/bench_kernels.py on an H200.
_fused_choice = os.environ.get("BITCONVERT_FUSED_GEMV", "auto")
FUSED_GEMV = {"1": "auto", "0": "never"}.get(_fused_choice, _fused_choice)
# Under "auto" the fused GEMV must beat the best quantize-then-GEMV by this factor, not just by the noise of
# the tuner's timing. On an H200 the two came within 4-6% of each other for the 2.4B model's o_proj, and one
# tuning picked the fused one. The compiled decode of that call ran at 831 tok/s; a later
# call, whose tuning kept both products unfused, ran at 860 (docs/kernels.md).
FUSED_GEMV_MARGIN = 0.9
WORKSPACE_ROWS = 64  # split-K is used only for at most this many tokens...
WORKSPACE_COLS = 1 << 16  # ...and at most this many output features
COUNTERS = 1 << 16


# triton.jit decides between compiling and interpreting when this module is imported, so this is
# fixed from then on too (and a call no longer reads the environment several times).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class LaunchOverlap:
    """How a kernel may overlap the one before it (Hopper and later; see :func:`set_launch_overlap`).

    ``pdl``: programmatic dependent launch. Each kernel is launched while the one before it still runs
    and waits (``griddepcontrol.wait``) only before it reads activations or writes anything; once all
    its programs are past that point it lets the next kernel launch. ``prefetch``: the GEMV first asks
    the TMA unit to bring its slice of the weights into L2 (``cp.async.bulk.prefetch.L2``, one
    instruction a row); weights do not depend on the kernel before, so with ``pdl`` their DRAM latency
    is spent while that kernel finishes. Both are only speed: the results are the same bits.

    Both are on by default: in two calls on an H200 they took the compiled 2.4B decode from 1.60-1.62x
    to 1.66-1.69x bf16, and to 1.82-1.90x with inductor's kernels launched the same way
    (``TORCHINDUCTOR_ENABLE_PDL=1``, which :func:`compile_with_pdl` sets when a packed model loads on
    Hopper), see docs/kernels.md. ``BITCONVERT_PDL=0`` and ``BITCONVERT_L2_PREFETCH=0`` turn them off.
    """

    pdl: bool = True
    prefetch: bool = True


_NO_OVERLAP = LaunchOverlap(pdl=False, prefetch=False)
_overlap = LaunchOverlap(pdl=os.environ.get("BITCONVERT_PDL", "1") == "1",
                         prefetch=os.environ.get("BITCONVERT_L2_PREFETCH", "1") == "1")


# --------------------------------------------------------------------------- device helpers

@triton.jit
def _round_half_even(v, ON_GPU: tl.constexpr):
    if ON_GPU:
        r = tl.extra.cuda.libdevice.rint(v)
    else:  # the interpreter has no libdevice; adding 1.5 * 2**23 rounds the same way for |v| < 2**22
        r = (v + 12582912.0) - 12582912.0
    return r


@triton.jit
def _div(a, b, ON_GPU: tl.constexpr):
    # Triton's plain '/' on float32 is the approximate div.full; torch divides exactly.
    if ON_GPU:
        r = tl.math.div_rn(a, b)
    else:
        r = a / b
    return r


@triton.jit
def _dp4a(a, b, c, ON_GPU: tl.constexpr):
    """``c + Σ_j a_j · b_j`` over the four bytes of int32 words; a's bytes unsigned, b's signed."""
    if ON_GPU:
        r = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = c
        for j in tl.static_range(4):
            r += ((a >> (8 * j)) & 0xFF) * ((b << (24 - 8 * j)) >> 24)
    return r


@triton.jit
def _unpack_bytes(p, SHIFT: tl.constexpr, ON_GPU: tl.constexpr):
    """``(p >> SHIFT) & 3`` of uint8 codes as int8. On the GPU four bytes share one 32-bit register,
    so two instructions unpack four weights (bits shifted in from the next byte are masked off)."""
    if ON_GPU:
        if SHIFT == 0:
            r = tl.inline_asm_elementwise("and.b32 $0, $1, 0x03030303;", "=r,r", [p], dtype=tl.int8,
                                          is_pure=True, pack=4)
        elif SHIFT == 2:
            r = tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 2; and.b32 $0, t, 0x03030303; }",
                                          "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
        elif SHIFT == 4:
            r = tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x03030303; }",
                                          "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
        else:
            r = tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 6; and.b32 $0, t, 0x03030303; }",
                                          "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
    else:
        r = ((p >> SHIFT) & 3).to(tl.int8)
    return r


@triton.jit
def _inv_scale(amax, ON_GPU: tl.constexpr):
    """``127 / max(amax, 1e-5)`` computed as torch does: reciprocal, then product."""
    top = tl.maximum(amax, 1e-5)
    return _div(tl.zeros_like(top) + 1.0, top, ON_GPU) * 127.0


@triton.jit
def _quantize(v, inv, ON_GPU: tl.constexpr):
    """int8 codes (as float32) of float32 ``v``: ``round(v * inv)`` half-to-even, clamped."""
    return tl.minimum(tl.maximum(_round_half_even(v * inv, ON_GPU), -128.0), 127.0)


# One thread of the program issues it: the operands are scalars, which every thread holds.
_PREFETCH_L2_ASM = tl.constexpr("""{
.reg .pred first;
.reg .u32 tid;
mov.u32 tid, %tid.x;
setp.eq.u32 first, tid, 0;
@first cp.async.bulk.prefetch.L2.global [$1], $2;
mov.u32 $0, 0;
}""")


@triton.jit
def _prefetch_rows_l2(ww_ptr, first_row, R, KW, kw_lo, kw_hi, BR: tl.constexpr):
    """Start moving words ``[kw_lo, kw_hi)`` of packed rows ``first_row ..`` (BR of them) into L2.

    Addresses and sizes are multiples of 16 bytes when K is (the launcher checks). Rows past the end
    repeat the last one, which costs nothing.
    """
    nbytes = (kw_hi - kw_lo) * 4
    if nbytes > 0:
        for i in tl.static_range(BR):
            row = tl.minimum(first_row + i, R - 1).to(tl.int64)
            tl.inline_asm_elementwise(_PREFETCH_L2_ASM, "=r,l,r", [ww_ptr + row * KW + kw_lo, nbytes],
                                      dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _wait_for_previous_kernel(PDL: tl.constexpr):
    """With programmatic dependent launch: wait until the kernel before has finished and its writes are
    visible, then let the next kernel launch, which waits for this one in turn. Never the other way
    round: inductor's kernels read what the kernel before their predecessor wrote without waiting,
    trusting that their predecessor waited before it let them launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _quantize_row(v, q_ptrs, mask, ON_GPU: tl.constexpr):
    """BitNet's codes of one whole row ``v`` (float32, zeros where masked) stored at ``q_ptrs``; returns
    ``inv = 127 / max|v|`` (computed as torch does, reciprocal then product) and Σ codes."""
    inv = _inv_scale(tl.zeros_like(v) + tl.max(tl.abs(v), axis=0), ON_GPU)
    q = _quantize(v, inv, ON_GPU)
    tl.store(q_ptrs, q.to(tl.int8), mask=mask)
    return inv, tl.sum(q.to(tl.int32), axis=0)


@triton.jit
def _store_row_stats(inv_ptr, sum_ptr, row, offs, inv, total):
    """One token's inverse scale and Σ codes (``inv`` is the row-wide value in every lane)."""
    first = offs < 1
    tl.store(inv_ptr + row + offs, inv, mask=first)
    tl.store(sum_ptr + row + offs, tl.zeros_like(offs) + total, mask=first)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, inv_ptr, sum_ptr, K, stride_x, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                      ON_GPU: tl.constexpr, PDL: tl.constexpr):
    """One token: ``inv = 127 / max|x|`` (computed as torch does, reciprocal then product), codes
    ``round(x * inv)`` and their sum (which the matmuls subtract, see the module docstring)."""
    _wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * K
    offs = tl.arange(0, BLOCK)
    if ONE_PASS:
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        inv, total = _quantize_row(v, q_row + offs, offs < K, ON_GPU)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        inv = _inv_scale(tl.zeros([BLOCK], tl.float32) + tl.max(amax, axis=0), ON_GPU)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for k0 in range(0, K, BLOCK):
            v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            q = _quantize(v, inv, ON_GPU)
            tl.store(q_row + k0 + offs, q.to(tl.int8), mask=k0 + offs < K)
            acc += q.to(tl.int32)
        total = tl.sum(acc, axis=0)
    _store_row_stats(inv_ptr, sum_ptr, row, offs, inv, total)


@triton.jit
def _rms_norm_quant_kernel(x_ptr, w_ptr, n_ptr, q_ptr, inv_ptr, sum_ptr, K, stride_x, eps,
                           BLOCK: tl.constexpr, ON_GPU: tl.constexpr, PDL: tl.constexpr):
    """One token: transformers' RMSNorm of x (float32 statistics, the normalised row rounded to x's dtype,
    then times the weight in the weight's and x's common dtype, which is ``n``'s), and BitNet's int8 codes
    of that row as ``_act_quant_kernel`` computes them. The whole row is in registers (K <= BLOCK)."""
    _wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    v = x.to(tl.float32)
    mean_square = tl.zeros([BLOCK], tl.float32) + tl.sum(v * v, axis=0) / K
    if ON_GPU:
        r = tl.extra.cuda.libdevice.rsqrt(mean_square + eps)
    else:
        r = 1.0 / tl.sqrt(mean_square + eps)
    h = (v * r).to(x.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out_ty: tl.constexpr = n_ptr.dtype.element_ty
    n = (w.to(tl.float32) * h.to(tl.float32)).to(out_ty)
    tl.store(n_ptr + row * K + offs, n, mask=mask)
    inv, total = _quantize_row(n.to(tl.float32), q_ptr + row * K + offs, mask, ON_GPU)
    _store_row_stats(inv_ptr, sum_ptr, row, offs, inv, total)


@triton.jit
def _scaled(acc, offs_n, n_mask, xinv, xsum, winv_ptr, bias_ptr, out_ty: tl.constexpr,
            SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ON_GPU: tl.constexpr):
    """Turn exact sums of ``codes_x · (codes_w + 1)`` into outputs of type ``out_ty``: subtract Σ codes_x,
    scale, add bias.

    ``xinv``, ``xsum``: the tokens' inverse scales and Σ codes, (BM,). In group mode ``acc`` is
    already float32, Σx subtracted and divided by the group scales.
    """
    if SCALE_MODE == 2:
        accf = acc
        scale = xinv[:, None] + tl.zeros_like(accf)
    else:
        accf = (acc - xsum[:, None]).to(tl.float32)
        if SCALE_MODE == 0:
            winv = tl.load(winv_ptr + tl.zeros_like(offs_n), mask=n_mask, other=1.0)
        else:
            winv = tl.load(winv_ptr + offs_n, mask=n_mask, other=1.0)
        scale = xinv[:, None] * winv[None, :]
    y = _div(accf, scale, ON_GPU).to(out_ty)
    if HAS_BIAS:  # the reference rounds to the output dtype first, then adds the bias
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + bias[None, :]).to(out_ty)
    return y


@triton.jit
def _silu_times(gate, up, ON_GPU: tl.constexpr):
    """``silu(gate) * up`` rounded as torch rounds it: silu in float32, to the dtype, the product likewise."""
    g = gate.to(tl.float32)
    if ON_GPU:
        e = tl.extra.cuda.libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    s = _div(g, e + 1.0, ON_GPU).to(gate.dtype)
    return (s.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _store(y, offs_m, offs_n, n_mask, M, y_ptr, stride_ym):
    ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(ptrs, y, mask=(offs_m < M)[:, None] & n_mask[None, :])


@triton.jit
def _plus_residual(y, offs_m, offs_n, n_mask, M, res_ptr, stride_rm):
    """``residual + y`` rounded once to y's dtype, as torch adds two tensors of that dtype."""
    ptrs = res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :]
    r = tl.load(ptrs, mask=(offs_m < M)[:, None] & n_mask[None, :], other=0.0)
    return (r.to(tl.float32) + y.to(tl.float32)).to(y.dtype)


@triton.jit
def _write(acc0, acc1, acc2, acc3, offs_m, offs_r, r_mask, M, R, xinv, xsum, winv_ptr, bias_ptr, y_ptr, stride_ym,
           res_ptr, stride_rm, SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr,
           RESIDUAL: tl.constexpr, ON_GPU: tl.constexpr):
    """Scale the four row blocks ``b * R + offs_r`` and store them, or with SWIGLU store ``silu(gate) * up``.

    SWIGLU: the rows are gate then up, stacked (N = 2I); ``I = 2R``, so blocks 0 and 2 hold gate and up of
    the same features, as do blocks 1 and 3, and ``y`` (M, I) receives ``I`` columns. RESIDUAL (not with
    SWIGLU): store ``residual + y`` instead, ``residual`` (M, N) rows ``stride_rm`` apart, as a decoder
    layer adds a projection's output to its residual stream.
    """
    out_ty: tl.constexpr = y_ptr.dtype.element_ty
    y0 = _scaled(acc0, offs_r, r_mask, xinv, xsum, winv_ptr, bias_ptr, out_ty, SCALE_MODE, HAS_BIAS, ON_GPU)
    y1 = _scaled(acc1, offs_r + R, r_mask, xinv, xsum, winv_ptr, bias_ptr, out_ty, SCALE_MODE, HAS_BIAS, ON_GPU)
    y2 = _scaled(acc2, offs_r + 2 * R, r_mask, xinv, xsum, winv_ptr, bias_ptr, out_ty, SCALE_MODE, HAS_BIAS, ON_GPU)
    y3 = _scaled(acc3, offs_r + 3 * R, r_mask, xinv, xsum, winv_ptr, bias_ptr, out_ty, SCALE_MODE, HAS_BIAS, ON_GPU)
    if SWIGLU:
        _store(_silu_times(y0, y2, ON_GPU), offs_m, offs_r, r_mask, M, y_ptr, stride_ym)
        _store(_silu_times(y1, y3, ON_GPU), offs_m, offs_r + R, r_mask, M, y_ptr, stride_ym)
    else:
        if RESIDUAL:
            y0 = _plus_residual(y0, offs_m, offs_r, r_mask, M, res_ptr, stride_rm)
            y1 = _plus_residual(y1, offs_m, offs_r + R, r_mask, M, res_ptr, stride_rm)
            y2 = _plus_residual(y2, offs_m, offs_r + 2 * R, r_mask, M, res_ptr, stride_rm)
            y3 = _plus_residual(y3, offs_m, offs_r + 3 * R, r_mask, M, res_ptr, stride_rm)
        _store(y0, offs_m, offs_r, r_mask, M, y_ptr, stride_ym)
        _store(y1, offs_m, offs_r + R, r_mask, M, y_ptr, stride_ym)
        _store(y2, offs_m, offs_r + 2 * R, r_mask, M, y_ptr, stride_ym)
        _store(y3, offs_m, offs_r + 3 * R, r_mask, M, y_ptr, stride_ym)


@triton.jit
def _finish(acc0, acc1, acc2, acc3, offs_m, offs_r, M, N, R, tile, xinv, xsum, winv_ptr, bias_ptr, y_ptr,
            stride_ym, res_ptr, stride_rm,
            ws_ptr, cnt_ptr, split_k, SPLIT: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
            SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, ON_GPU: tl.constexpr):
    """Write the four output row blocks ``b * R + offs_r`` whose sums are ``acc0..acc3`` (see ``_write``).

    With split-K, add them into the workspace instead; the program that arrives last finishes.
    """
    r_mask = offs_r < R
    if not SPLIT:
        _write(acc0, acc1, acc2, acc3, offs_m, offs_r, r_mask, M, R, xinv, xsum, winv_ptr, bias_ptr, y_ptr,
               stride_ym, res_ptr, stride_rm, SCALE_MODE, HAS_BIAS, SWIGLU, RESIDUAL, ON_GPU)
    else:
        mask = (offs_m < M)[:, None] & r_mask[None, :]
        ws = ws_ptr + offs_m[:, None] * N + offs_r[None, :]
        tl.atomic_add(ws, acc0, mask=mask, sem="relaxed")
        tl.atomic_add(ws + R, acc1, mask=mask, sem="relaxed")
        tl.atomic_add(ws + 2 * R, acc2, mask=mask, sem="relaxed")
        tl.atomic_add(ws + 3 * R, acc3, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's additions precede the counter's release
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == split_k - 1:
            tl.debug_barrier()
            zero = tl.zeros_like(acc0)
            total0 = tl.atomic_xchg(ws, zero, mask=mask, sem="relaxed")
            total1 = tl.atomic_xchg(ws + R, zero, mask=mask, sem="relaxed")
            total2 = tl.atomic_xchg(ws + 2 * R, zero, mask=mask, sem="relaxed")
            total3 = tl.atomic_xchg(ws + 3 * R, zero, mask=mask, sem="relaxed")
            _write(total0, total1, total2, total3, offs_m, offs_r, r_mask, M, R, xinv, xsum, winv_ptr, bias_ptr,
                   y_ptr, stride_ym, res_ptr, stride_rm, SCALE_MODE, HAS_BIAS, SWIGLU, RESIDUAL, ON_GPU)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")


@triton.jit
def _rows_absmax(x_ptr, offs_m, m_mask, K, stride_x, BM: tl.constexpr, XBLOCK: tl.constexpr):
    """``max |x|`` of the rows ``offs_m`` of ``x`` (M, K), as float32 (BM,)."""
    rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_x
    offs = tl.arange(0, XBLOCK)
    amax = tl.zeros([BM, XBLOCK], tl.float32)
    for k0 in range(0, K, XBLOCK):
        v = tl.load(rows + k0 + offs[None, :], mask=m_mask[:, None] & (k0 + offs < K)[None, :], other=0.0)
        amax = tl.maximum(amax, tl.abs(v.to(tl.float32)))
    return tl.max(amax, axis=1)


@triton.jit
def _quantize_words(x_ptr, offs_m, m_mask, offs_kw, kw_mask, stride_x, inv, ON_GPU: tl.constexpr):
    """The int8 codes of inputs ``4w .. 4w + 3`` (w in ``offs_kw``) packed into one int32 word each, byte j
    holding input 4w + j: what ``quantize_activations`` stores, read as int32 (little-endian)."""
    byte = tl.arange(0, 4)
    ptrs = (x_ptr + offs_m[:, None, None].to(tl.int64) * stride_x + offs_kw[None, :, None] * 4
            + byte[None, None, :])
    v = tl.load(ptrs, mask=m_mask[:, None, None] & kw_mask[None, :, None], other=0.0).to(tl.float32)
    q = _quantize(v, inv[:, None, None], ON_GPU).to(tl.int32)
    return tl.sum((q & 0xFF) << (byte * 8)[None, None, :], axis=2)  # disjoint bytes: the sum is an OR


@triton.jit
def _gemv_group_part(prod, xs, kw0, offs_n, r_mask, winv_ptr, n_groups, SHIFT: tl.constexpr, BM: tl.constexpr,
                     BR: tl.constexpr, BKW: tl.constexpr, GW: tl.constexpr, GWT: tl.constexpr,
                     ON_GPU: tl.constexpr):
    """Σ over the groups of one tile of (integer partial sum / group scale), for one row block."""
    NPT: tl.constexpr = BKW // GWT
    psum = tl.sum(tl.reshape(prod, (BM, BR, NPT, GWT)), axis=3) >> SHIFT
    part = (psum - xs[:, None, :]).to(tl.float32)
    g = (kw0 + tl.arange(0, NPT) * GWT) // GW
    winv = tl.load(winv_ptr + offs_n[:, None].to(tl.int64) * n_groups + g[None, :],
                   mask=r_mask[:, None] & (g < n_groups)[None, :], other=1.0)
    return tl.sum(_div(part, winv[None, :, :] + tl.zeros_like(part), ON_GPU), axis=2)


@triton.jit
def _gemv_kernel(xw_ptr, xinv_ptr, xsum_ptr, ww_ptr, winv_ptr, bias_ptr, y_ptr, res_ptr, ws_ptr, cnt_ptr,
                 M, N, R, KW, stride_x, stride_ym, stride_rm, n_groups, split_k,
                 BM: tl.constexpr, BR: tl.constexpr, BKW: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr,
                 CHAIN: tl.constexpr, SCALE_MODE: tl.constexpr, GW: tl.constexpr, GWT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, FUSED: tl.constexpr, XBLOCK: tl.constexpr, ON_GPU: tl.constexpr,
                 PDL: tl.constexpr, PREFETCH: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                 PARTS: tl.constexpr, PARTS_P2: tl.constexpr):
    """A few tokens: ``xw`` int32 (M, K/4) activation codes, ``ww`` int32 (R, K/4) packed weights.

    FUSED: ``xw`` is the activations themselves (M, K), rows ``stride_x`` apart, and ``xinv``/``xsum``
    are unused: this program quantizes them (absmax over whole rows, XBLOCK inputs a step, then the
    codes of each tile as it goes) exactly as ``_act_quant_kernel`` does. It subtracts the Σ codes of
    its own K slice before ``_finish``, so split-K partial sums still add up to the whole. With PARTS > 0 the
    kernel that wrote ``x`` also wrote PARTS maxima of |x| per row (float32 (M, PARTS), at ``xinv``), and their
    maximum is the row's absmax: no pass over the rows (PARTS_P2: PARTS rounded up to a power of two).

    Row block b is masked in place (``word & (0x03030303 << 2b)``, no shift): its dp4a sums come out
    multiplied by 4^b and are shifted back once at the end, exactly. CHAIN keeps one running sum
    per loaded word and reduces after the loop (fewest instructions, more registers); otherwise
    each tile is reduced as it comes. In group mode GW is the scale group in words and
    GWT = min(GW, BKW) the part of a group that one tile holds.

    PREFETCH and PDL: see :class:`LaunchOverlap`. Nothing that the kernel before may write (activations,
    the output, the split-K workspace) is touched before ``_wait_for_previous_kernel``. RESIDUAL: see ``_write``.
    """
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    tiles = tl.cdiv(KW, BKW)
    per_split = tl.cdiv(tiles, split_k)
    kw_lo = pid_k * per_split * BKW
    kw_hi = tl.minimum(kw_lo + per_split * BKW, KW)
    if PREFETCH:
        _prefetch_rows_l2(ww_ptr, pid_r * BR, R, KW, kw_lo, kw_hi, BR)
    _wait_for_previous_kernel(PDL)

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_r = pid_r * BR + tl.arange(0, BR)
    m_mask = offs_m < M
    r_mask = offs_r < R
    zero3 = tl.zeros([BM, BR, BKW], tl.int32)
    ones = tl.full([BM, BKW], 0x01010101, tl.int32)  # dp4a with these sums four codes
    if FUSED:
        if PARTS > 0:
            offs_p = tl.arange(0, PARTS_P2)
            parts = tl.load(xinv_ptr + offs_m[:, None] * PARTS + offs_p[None, :],
                            mask=m_mask[:, None] & (offs_p < PARTS)[None, :], other=0.0)
            xinv = _inv_scale(tl.max(parts, axis=1), ON_GPU)
        else:
            xinv = _inv_scale(_rows_absmax(xw_ptr, offs_m, m_mask, KW * 4, stride_x, BM, XBLOCK), ON_GPU)
        xsum = tl.zeros([BM], tl.int32)
    else:
        xinv = tl.load(xinv_ptr + offs_m, mask=m_mask, other=1.0)
        xsum = tl.load(xsum_ptr + offs_m, mask=m_mask, other=0)

    if SCALE_MODE == 2:
        acc0 = tl.zeros([BM, BR], dtype=tl.float32)
    elif CHAIN:
        acc0 = zero3
    else:
        acc0 = tl.zeros([BM, BR], dtype=tl.int32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    w_rows = ww_ptr + offs_r[:, None].to(tl.int64) * KW
    x_rows = xw_ptr + offs_m[:, None].to(tl.int64) * stride_x
    # STAGES > 1 software-pipelines the loop: the next tiles' weights are in flight while this one is
    # multiplied. A batch-1 GEMV is bound by load latency, not bandwidth, without it.
    for kw0 in tl.range(kw_lo, kw_hi, BKW, num_stages=STAGES):
        offs_k = kw0 + tl.arange(0, BKW)
        k_mask = offs_k < kw_hi
        w = tl.load(w_rows + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0)[None, :, :]
        if FUSED:
            xv = _quantize_words(xw_ptr, offs_m, m_mask, offs_k, k_mask, stride_x, xinv, ON_GPU)
            if SCALE_MODE != 2:
                xsum += tl.sum(_dp4a(ones, xv, tl.zeros_like(xv), ON_GPU), axis=1)
        else:
            xv = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
        x3 = xv[:, None, :]
        if SCALE_MODE == 2:
            NPT: tl.constexpr = BKW // GWT
            xs = tl.sum(tl.reshape(_dp4a(ones, xv, tl.zeros_like(xv), ON_GPU), (BM, NPT, GWT)), axis=2)
            acc0 += _gemv_group_part(_dp4a(w & 0x03030303, x3, zero3, ON_GPU), xs, kw0, offs_r, r_mask,
                                     winv_ptr, n_groups, 0, BM, BR, BKW, GW, GWT, ON_GPU)
            acc1 += _gemv_group_part(_dp4a(w & 0x0C0C0C0C, x3, zero3, ON_GPU), xs, kw0, offs_r + R, r_mask,
                                     winv_ptr, n_groups, 2, BM, BR, BKW, GW, GWT, ON_GPU)
            acc2 += _gemv_group_part(_dp4a(w & 0x30303030, x3, zero3, ON_GPU), xs, kw0, offs_r + 2 * R, r_mask,
                                     winv_ptr, n_groups, 4, BM, BR, BKW, GW, GWT, ON_GPU)
            acc3 += _gemv_group_part(_dp4a(w & -1061109568, x3, zero3, ON_GPU), xs, kw0, offs_r + 3 * R, r_mask,
                                     winv_ptr, n_groups, 6, BM, BR, BKW, GW, GWT, ON_GPU)
        elif CHAIN:
            acc0 = _dp4a(w & 0x03030303, x3, acc0, ON_GPU)
            acc1 = _dp4a(w & 0x0C0C0C0C, x3, acc1, ON_GPU)
            acc2 = _dp4a(w & 0x30303030, x3, acc2, ON_GPU)
            acc3 = _dp4a(w & -1061109568, x3, acc3, ON_GPU)  # 0xC0C0C0C0 as int32
        else:
            acc0 += tl.sum(_dp4a(w & 0x03030303, x3, zero3, ON_GPU), axis=2)
            acc1 += tl.sum(_dp4a(w & 0x0C0C0C0C, x3, zero3, ON_GPU), axis=2)
            acc2 += tl.sum(_dp4a(w & 0x30303030, x3, zero3, ON_GPU), axis=2)
            acc3 += tl.sum(_dp4a(w & -1061109568, x3, zero3, ON_GPU), axis=2)
    if SCALE_MODE != 2:
        if CHAIN:
            acc0 = tl.sum(acc0, axis=2)
            acc1 = tl.sum(acc1, axis=2)
            acc2 = tl.sum(acc2, axis=2)
            acc3 = tl.sum(acc3, axis=2)
        acc1 = acc1 >> 2
        acc2 = acc2 >> 4
        acc3 = acc3 >> 6
        if FUSED:  # Σ codes of this K slice only: subtract it here, not the whole row's in the epilogue
            acc0 -= xsum[:, None]
            acc1 -= xsum[:, None]
            acc2 -= xsum[:, None]
            acc3 -= xsum[:, None]
            xsum = tl.zeros_like(xsum)
    _finish(acc0, acc1, acc2, acc3, offs_m, offs_r, M, N, R, pid_m * tl.num_programs(0) + pid_r, xinv,
            xsum, winv_ptr, bias_ptr, y_ptr, stride_ym, res_ptr, stride_rm, ws_ptr, cnt_ptr, split_k, SPLIT,
            SCALE_MODE, HAS_BIAS, SWIGLU, RESIDUAL, ON_GPU)


@triton.jit
def _gemm_kernel(xq_ptr, xinv_ptr, xsum_ptr, w_ptr, winv_ptr, bias_ptr, y_ptr, res_ptr, ws_ptr, cnt_ptr,
                 M, N, R, K, stride_ym, stride_rm, n_groups,
                 BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                 GROUP_M: tl.constexpr, SCALE_MODE: tl.constexpr, GS: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ON_GPU: tl.constexpr, PDL: tl.constexpr,
                 SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr):
    """Many tokens: ``xq`` int8 (M, K) activation codes, ``w`` uint8 (R, K) packed weights.

    In group mode GS (the group size) is a multiple of BK and partial sums are scaled per group.
    """
    _wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_r = tl.cdiv(R, BR)
    # Consecutive programs share weight tiles (GROUP_M token tiles at a time) so that L2 serves them.
    in_group = GROUP_M * num_r
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_r = (pid % in_group) // group_rows

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_r = pid_r * BR + tl.arange(0, BR)
    m_mask = offs_m < M
    r_mask = offs_r < R
    row_inv = tl.load(xinv_ptr + offs_m, mask=m_mask, other=1.0)
    row_sum = tl.load(xsum_ptr + offs_m, mask=m_mask, other=0)

    tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(tiles, SPLIT_K)
    k_lo = pid_k * per_split * BK
    k_hi = tl.minimum(k_lo + per_split * BK, K)
    x_rows = xq_ptr + offs_m[:, None].to(tl.int64) * K
    w_cols = w_ptr + offs_r[None, :].to(tl.int64) * K

    if SCALE_MODE == 2:
        out0 = tl.zeros([BM, BR], dtype=tl.float32)
        out1 = out0
        out2 = out0
        out3 = out0
        for g0 in range(k_lo, k_hi, GS):
            acc0 = tl.zeros([BM, BR], dtype=tl.int32)
            acc1 = acc0
            acc2 = acc0
            acc3 = acc0
            xsum = tl.zeros([BM], dtype=tl.int32)
            for k0 in range(g0, g0 + GS, BK):
                offs_k = k0 + tl.arange(0, BK)
                k_mask = offs_k < k_hi
                a = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
                p = tl.load(w_cols + offs_k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0)
                acc0 = tl.dot(a, _unpack_bytes(p, 0, ON_GPU), acc0, out_dtype=tl.int32)
                acc1 = tl.dot(a, _unpack_bytes(p, 2, ON_GPU), acc1, out_dtype=tl.int32)
                acc2 = tl.dot(a, _unpack_bytes(p, 4, ON_GPU), acc2, out_dtype=tl.int32)
                acc3 = tl.dot(a, _unpack_bytes(p, 6, ON_GPU), acc3, out_dtype=tl.int32)
                xsum += tl.sum(a.to(tl.int32), axis=1)
            g = g0 // GS
            xs = xsum[:, None]
            out0 += _gemm_group_part(acc0 - xs, offs_r, r_mask, g, winv_ptr, n_groups, ON_GPU)
            out1 += _gemm_group_part(acc1 - xs, offs_r + R, r_mask, g, winv_ptr, n_groups, ON_GPU)
            out2 += _gemm_group_part(acc2 - xs, offs_r + 2 * R, r_mask, g, winv_ptr, n_groups, ON_GPU)
            out3 += _gemm_group_part(acc3 - xs, offs_r + 3 * R, r_mask, g, winv_ptr, n_groups, ON_GPU)
    else:
        out0 = tl.zeros([BM, BR], dtype=tl.int32)
        out1 = out0
        out2 = out0
        out3 = out0
        for k0 in range(k_lo, k_hi, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_mask = offs_k < k_hi
            a = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
            p = tl.load(w_cols + offs_k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0)
            out0 = tl.dot(a, _unpack_bytes(p, 0, ON_GPU), out0, out_dtype=tl.int32)
            out1 = tl.dot(a, _unpack_bytes(p, 2, ON_GPU), out1, out_dtype=tl.int32)
            out2 = tl.dot(a, _unpack_bytes(p, 4, ON_GPU), out2, out_dtype=tl.int32)
            out3 = tl.dot(a, _unpack_bytes(p, 6, ON_GPU), out3, out_dtype=tl.int32)
    _finish(out0, out1, out2, out3, offs_m, offs_r, M, N, R, pid, row_inv, row_sum, winv_ptr, bias_ptr, y_ptr,
            stride_ym, res_ptr, stride_rm, ws_ptr, cnt_ptr, SPLIT_K, SPLIT_K > 1, SCALE_MODE, HAS_BIAS, SWIGLU,
            RESIDUAL, ON_GPU)


@triton.jit
def _gemm_group_part(acc, offs_n, r_mask, g, winv_ptr, n_groups, ON_GPU: tl.constexpr):
    winv = tl.load(winv_ptr + offs_n.to(tl.int64) * n_groups + g, mask=r_mask, other=1.0)
    part = acc.to(tl.float32)
    return _div(part, winv[None, :] + tl.zeros_like(part), ON_GPU)


# --------------------------------------------------------------------------- configurations

@dataclass(frozen=True)
class GemvConfig:
    br: int = 4
    bkw: int = 128
    split_k: int = 1  # a launch argument, not compiled in: every split of one tile shares one binary
    num_warps: int = 4
    fused: bool = False  # quantize the activations inside the GEMV: one launch, reads x instead of codes
    stages: int = 1  # software pipelining depth of the K loop (1 = none)
    kind: str = "gemv"


@dataclass(frozen=True)
class GemmConfig:
    bm: int = 64
    br: int = 32
    bk: int = 128
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    kind: str = "gemm"
    fused: ClassVar[bool] = False


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _sm_count(device: torch.device) -> int:
    if INTERPRET:
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=64)
def _l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size


@dataclass(frozen=True)
class Problem:
    """What decides which kernel and tiles fit: the shape, the kind of scales, and whether the caller
    already has the quantized activations (then the fused GEMV, which quantizes again, is no candidate) and
    whether the product ends in SwiGLU (``n`` is then the stacked gate and up rows, the output half of them)."""

    m: int
    n: int
    k: int
    mode: int
    group_size: int
    device: torch.device
    acts_ready: bool = False
    swiglu: bool = False
    parts: int = 0  # maxima of |x| per row that the kernel before wrote (the fused GEMV then needs no absmax pass)

    @property
    def rows(self) -> int:
        return self.n // 4

    @property
    def gemv_ok(self) -> bool:
        if self.k % 4 or self.m > GEMV_MAX_M or self.k > GEMV_MAX_K:
            return False
        return self.mode != 2 or (_is_pow2(self.group_size) and self.group_size >= 16)

    @property
    def gemm_ok(self) -> bool:
        return self.mode != 2 or (_is_pow2(self.group_size) and self.group_size >= 32)

    @property
    def fused_ok(self) -> bool:
        return FUSED_GEMV != "never" and self.gemv_ok and self.m <= FUSED_MAX_M and not self.acts_ready

    @cached_property
    def tuning_key(self) -> tuple:
        """Problems that share this share one measured choice (``fused_ok``: they have the same candidates)."""
        return (self.device.index or 0, _bucket(self.m), self.n, self.k, self.mode, self.group_size, self.fused_ok,
                self.swiglu, self.parts)

    def split_ok(self, split_k: int) -> bool:
        """Split-K sums in int32 through the workspace: not for group scales, and only if it fits."""
        return split_k == 1 or (self.mode != 2 and self.m <= WORKSPACE_ROWS and self.n <= WORKSPACE_COLS)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def default_config(p: Problem) -> GemvConfig | GemmConfig | None:
    """A reasonable choice without measuring: enough programs to cover every SM about twice."""
    sms = _sm_count(p.device)
    if p.gemv_ok and p.m <= 8:
        br, bkw = 4, 128
        programs = triton.cdiv(p.rows, br)
        split = 1
        while (split < 8 and programs * split < 2 * sms and triton.cdiv(p.k // 4, bkw) >= 4 * split * 2
               and p.split_ok(split * 2)):
            split *= 2
        return GemvConfig(br=br, bkw=bkw, split_k=split)
    if not p.gemm_ok:
        return None
    bm = min(128, max(16, _next_pow2(p.m)))
    br = 32 if p.m > 16 else 16
    bk = 128 if p.mode != 2 else min(128, p.group_size)
    programs = triton.cdiv(p.m, bm) * triton.cdiv(p.rows, br)
    split = 1
    while (split < 8 and programs * split < sms and triton.cdiv(p.k, bk) >= 4 * split * 2
           and p.split_ok(split * 2)):
        split *= 2
    return GemmConfig(bm=bm, br=br, bk=bk, split_k=split, num_warps=4 if bm <= 64 else 8)


# GEMV tiles (packed rows, int32 words of K, warps). Batch-1 decode is bound by how many weight bytes
# are in flight, so the larger tiles, deeper pipelines and split-K are there to keep more loads
# outstanding per SM; registers bound the tile (one token: at most 1024 words a warp).
GEMV_TILES = ((2, 256, 4), (4, 128, 4), (4, 256, 4), (8, 128, 4), (8, 256, 8), (4, 512, 8))
GEMV_SPLITS = (1, 2, 4, 8)


def candidate_configs(p: Problem) -> list[GemvConfig | GemmConfig]:
    """What the tuner measures for one problem. Each distinct tile, pipelining depth and fused flag is one
    compilation, shared by every shape and split (split-K is a launch argument).

    The fused GEMV comes first, so that a tuning budget running out drops the older variants.
    """
    out: list[GemvConfig | GemmConfig] = []
    if p.gemv_ok:
        bm = _next_pow2(p.m)
        for fused in ((True,) if FUSED_GEMV == "always" else (True, False)) if p.fused_ok else (False,):
            for br, bkw, warps in GEMV_TILES:
                if bm * br * bkw > 1024 * warps:
                    continue
                tiles = triton.cdiv(p.k // 4, bkw)
                for stages in (5, 3, 1):
                    for split in GEMV_SPLITS:
                        # a split needs at least two tiles, a pipeline of S stages S tiles per split
                        if not p.split_ok(split) or (split > 1 and tiles < 2 * split) or (stages > 1 and tiles < split * stages):
                            continue
                        out.append(GemvConfig(br=br, bkw=bkw, split_k=split, num_warps=warps, fused=fused, stages=stages))
    if p.gemm_ok:
        if p.m <= GEMV_MAX_M:
            tiles = [(16, br, 128, 4, 4) for br in (16, 32)]
        else:
            big = min(128, max(32, _next_pow2(p.m)))
            tiles = [(bm, br, bk, w, s) for bm in sorted({max(32, big // 2), big})
                     for br, bk, w, s in ((16, 128, 4, 4), (32, 128, 4, 3), (64, 64, 8, 3))]
        for bm, br, bk, warps, stages in tiles:
            if p.mode == 2:
                bk = min(bk, p.group_size)
            for split in (1, 2, 4):
                if p.split_ok(split) and (split == 1 or triton.cdiv(p.k, bk) >= 2 * split):
                    out.append(GemmConfig(bm=bm, br=br, bk=bk, split_k=split, num_warps=warps, num_stages=stages))
    return out


# Problems and launch parameters are looked up per call: built once per shape (a frozen dataclass and a
# dozen arithmetic steps cost microseconds of host time on every call otherwise).
_problem = functools.lru_cache(maxsize=4096)(Problem)


def _absmax_block(k: int, bm: int, num_warps: int) -> int:
    """Inputs per step of the fused GEMV's absmax: at most 32 values a thread. Each step is one L2 round
    trip before the weights stream, but registers bound occupancy: compiled for sm_90 (1 token, 4x128
    tile), 128 values a thread take 166 registers, 32 take 78, the unfused GEMV 32."""
    return max(16, min(_next_pow2(k), 32 * 32 * num_warps // bm))


def set_launch_overlap(pdl: bool = True, prefetch: bool = True) -> LaunchOverlap:
    """Choose how kernels overlap (see :class:`LaunchOverlap`) from now on; returns the previous choice.

    Also ``BITCONVERT_PDL`` and ``BITCONVERT_L2_PREFETCH`` (``0`` or ``1``) at import. Tile choices are measured
    again afterwards, as the fastest tile may differ. Devices before Hopper ignore both.
    """
    global _overlap
    previous, _overlap = _overlap, LaunchOverlap(pdl=pdl, prefetch=prefetch)
    _overlap_on.cache_clear()
    _launch_params.cache_clear()
    _tuned.clear()
    return previous


@functools.lru_cache(maxsize=64)
def _overlap_on(device: torch.device) -> LaunchOverlap:
    """The part of the chosen overlap that this device and triton support (sm_90 PTX, triton's GDC)."""
    if INTERPRET or device.type != "cuda" or _overlap == _NO_OVERLAP:
        return _NO_OVERLAP
    if torch.cuda.get_device_capability(device)[0] < 9 or not hasattr(tl.extra.cuda, "gdc_wait"):
        return _NO_OVERLAP
    return _overlap


def compile_with_pdl(device: torch.device) -> bool:
    """Have torch.compile launch its own kernels with PDL too (``torch._inductor.config.triton.enable_pdl``),
    where bitconvert's kernels use it on ``device``; returns whether that setting is on now.

    A chain of PDL launches overlaps only where both neighbours take part: with inductor's norms, rotary
    embedding and residual adds launched plainly, each of them waits for the whole kernel before it to
    drain. On an H200 this took the compiled 2.4B decode from 2.01-2.04x to 2.25-2.31x bf16 (docs/kernels.md).
    The setting is process-wide and only speed (the same kernels, the same results); bf16 models compiled
    with it were as fast as without. ``BITCONVERT_INDUCTOR_PDL=0`` leaves it as it is.
    """
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config.triton, "enable_pdl"):
        return False
    if os.environ.get("BITCONVERT_INDUCTOR_PDL", "1") != "0" and _overlap_on(device).pdl:
        inductor_config.triton.enable_pdl = True
    return bool(inductor_config.triton.enable_pdl)


def _prefetch_fits(p: Problem) -> bool:
    """A weight of more than half the L2 evicts its own first lines before the GEMV reads them (the one
    shape that large, 28672x8192, was 8% slower with the overlap on an H200; unmeasured without it)."""
    return p.n * p.k // 4 <= _l2_bytes(p.device) // 2


def _pdl_meta(pdl: bool) -> dict:
    return dict(PDL=True, launch_pdl=True) if pdl else dict(PDL=False)


@functools.lru_cache(maxsize=4096)
def _launch_params(cfg: GemvConfig | GemmConfig, p: Problem, has_bias: bool,
                   aligned: bool = True, has_residual: bool = False) -> tuple[tuple, int, dict]:
    """Grid, number of scale groups and compile-time arguments of one configuration on one problem
    (``aligned``: the packed weight starts on 16 bytes, as the L2 prefetch needs; ``has_residual``: the
    result is added to a residual in the epilogue)."""
    overlap = _overlap_on(p.device)
    n_groups = p.k // p.group_size if p.mode == 2 else 1
    if cfg.kind == "gemv":
        bm = _next_pow2(p.m)
        gw = p.group_size // 4 if p.mode == 2 else 1
        grid = (triton.cdiv(p.rows, cfg.br), cfg.split_k, triton.cdiv(p.m, bm))
        meta = dict(BM=bm, BR=cfg.br, BKW=cfg.bkw, SPLIT=cfg.split_k > 1, STAGES=cfg.stages,
                    CHAIN=bm * cfg.br * cfg.bkw * 4 <= 64 * 32 * cfg.num_warps, SCALE_MODE=p.mode, GW=gw,
                    GWT=min(gw, cfg.bkw), HAS_BIAS=has_bias, FUSED=cfg.fused,
                    XBLOCK=_absmax_block(p.k, bm, cfg.num_warps) if cfg.fused and not p.parts else 1,
                    PARTS=p.parts if cfg.fused else 0, PARTS_P2=_next_pow2(max(1, p.parts)) if cfg.fused else 1,
                    ON_GPU=not INTERPRET,
                    PREFETCH=overlap.prefetch and aligned and p.k % 16 == 0 and _prefetch_fits(p),
                    SWIGLU=p.swiglu, RESIDUAL=has_residual, num_warps=cfg.num_warps,
                    **_pdl_meta(overlap.pdl))
    else:
        grid = (triton.cdiv(p.m, cfg.bm) * triton.cdiv(p.rows, cfg.br), cfg.split_k)
        meta = dict(BM=cfg.bm, BR=cfg.br, BK=min(cfg.bk, p.group_size) if p.mode == 2 else cfg.bk,
                    SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m, SCALE_MODE=p.mode,
                    GS=p.group_size if p.mode == 2 else 1, HAS_BIAS=has_bias, SWIGLU=p.swiglu,
                    RESIDUAL=has_residual, ON_GPU=not INTERPRET,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    **_pdl_meta(overlap.pdl and p.m <= GEMM_PDL_MAX_M))
    return grid, n_groups, meta


# --------------------------------------------------------------------------- launchers

_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The split-K scratch of one device: all zeros between kernels, which restore it.

    Fixed size and allocated outside any CUDA graph capture (None while capturing, before it exists):
    memory allocated during a capture belongs to that graph's pool and goes away with the graph,
    while this buffer must outlive every graph that uses it. Split-K kernels on one device therefore
    share it, which is right as long as they run on one stream, as inference does.
    """
    if device not in _workspaces:
        if not INTERPRET and torch.cuda.is_current_stream_capturing():
            return None
        _workspaces[device] = (torch.zeros(WORKSPACE_ROWS * WORKSPACE_COLS, dtype=torch.int32, device=device),
                               torch.zeros(COUNTERS, dtype=torch.int32, device=device))
    return _workspaces[device]


def _activation_buffers(m: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty int8 codes (m, k), inverse scales (m,) float32 and Σ codes (m,) int32."""
    return (torch.empty((m, k), dtype=torch.int8, device=device), torch.empty((m,), dtype=torch.float32, device=device),
            torch.empty((m,), dtype=torch.int32, device=device))


def quantize_activations(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token int8 codes (M, K), ``127 / absmax`` (M,) float32 and Σ codes (M,) int32 of a 2-D
    tensor whose rows are contiguous."""
    m, k = x2d.shape
    codes, inv, total = _activation_buffers(m, k, x2d.device)
    if m:
        whole = max(128, _next_pow2(k))
        one_pass = whole <= 16384  # the whole row fits in registers: read it once
        block = whole if one_pass else 4096
        _act_quant_kernel[(m,)](x2d, codes, inv, total, k, x2d.stride(0), BLOCK=block, ONE_PASS=one_pass,
                                ON_GPU=not INTERPRET, num_warps=min(16, max(4, block // 512)),
                                **_pdl_meta(_overlap_on(x2d.device).pdl))
    return codes, inv, total


RMS_NORM_MAX_K = 16384  # the norm kernel holds a whole row in registers


def rms_norm_quantize(x2d: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """transformers' RMSNorm of each row of ``x2d`` (rows contiguous) and its activations for the packed
    products (codes, ``127 / absmax``, Σ codes), from one kernel; None where it does not apply."""
    m, k = x2d.shape
    if k > RMS_NORM_MAX_K or weight.shape != (k,) or not weight.is_contiguous():
        return None
    normed = torch.empty((m, k), dtype=torch.promote_types(weight.dtype, x2d.dtype), device=x2d.device)
    codes, inv, total = _activation_buffers(m, k, x2d.device)
    if m:
        block = max(128, _next_pow2(k))
        _rms_norm_quant_kernel[(m,)](x2d, weight, normed, codes, inv, total, k, x2d.stride(0), float(eps),
                                     BLOCK=block, ON_GPU=not INTERPRET, num_warps=min(16, max(4, block // 512)),
                                     **_pdl_meta(_overlap_on(x2d.device).pdl))
    return normed, (codes, inv, total)


def launch(cfg: GemvConfig | GemmConfig, p: Problem, x2d: torch.Tensor,
           acts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, packed: torch.Tensor,
           inv_scale: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
           residual: torch.Tensor | None = None, parts: torch.Tensor | None = None) -> None:
    """Run one configuration: ``y`` (M, N) receives the result, plus ``residual`` (M, N) when given. The fused
    GEMV reads ``x2d`` itself (and ``parts``, (M, p.parts) maxima of |x2d|, when the problem has them); the
    others read ``acts = quantize_activations(x2d)`` (codes, inverse scales, sums)."""
    scratch = _workspace(y.device) if cfg.split_k > 1 else None
    if cfg.split_k > 1 and scratch is None:  # first split-K call inside a graph capture: split 1 is always right
        cfg = dataclasses.replace(cfg, split_k=1)
    grid, n_groups, meta = _launch_params(cfg, p, bias is not None, packed.data_ptr() % 16 == 0, residual is not None)
    ws, counters = scratch or (y, y)  # y: a pointer never touched
    bias_arg = y if bias is None else bias
    res_arg, res_stride = (y, 0) if residual is None else (residual, residual.stride(0))
    if cfg.fused:
        _gemv_kernel[grid](x2d, parts if p.parts else y, y, packed.view(torch.int32), inv_scale, bias_arg, y, res_arg,
                           ws, counters,
                           p.m, p.n, p.rows, p.k // 4, x2d.stride(0), y.stride(0), res_stride, n_groups, cfg.split_k,
                           **meta)
        return
    codes, x_inv, x_sum = acts
    if cfg.kind == "gemv":
        _gemv_kernel[grid](codes.view(torch.int32), x_inv, x_sum, packed.view(torch.int32), inv_scale, bias_arg, y,
                           res_arg, ws, counters, p.m, p.n, p.rows, p.k // 4, p.k // 4, y.stride(0), res_stride,
                           n_groups, cfg.split_k, **meta)
    else:
        _gemm_kernel[grid](codes, x_inv, x_sum, packed, inv_scale, bias_arg, y, res_arg, ws, counters,
                           p.m, p.n, p.rows, p.k, y.stride(0), res_stride, n_groups, **meta)


# --------------------------------------------------------------------------- tuning

_tuned: dict[tuple, GemvConfig | GemmConfig | None] = {}
tuning_log: dict[str, list] = {}  # what each tuning measured, for benchmarks: key -> [(config, µs)]
TUNE_BUDGET_S = 60.0  # per problem (compilations included); past it the best so far is kept


def _bucket(m: int) -> int:
    return m if m <= GEMV_MAX_M else min(_next_pow2(m), 4096)


def tuning_enabled() -> bool:
    return os.environ.get("BITCONVERT_TUNE", "1") != "0" and not INTERPRET


def choose_config(p: Problem, measure) -> GemvConfig | GemmConfig | None:
    """The fastest candidate for this problem's shape (measured once per shape), else the default. A fused GEMV
    is chosen only when it is faster than the best quantize-then-GEMV by :data:`FUSED_GEMV_MARGIN`.

    ``measure(cfg)`` returns the GPU time of one call in µs. Tuning never runs while a CUDA graph is
    being captured.
    """
    key = p.tuning_key
    cfg = _tuned.get(key, _tuned)
    if cfg is not _tuned:
        return cfg
    fallback = default_config(p)
    if not tuning_enabled() or torch.cuda.is_current_stream_capturing():
        return fallback
    log, start = [], time.monotonic()
    fastest: dict[bool, tuple[float, GemvConfig | GemmConfig]] = {}  # fused or not -> (µs, config)
    for cand in candidate_configs(p):
        if time.monotonic() - start > TUNE_BUDGET_S:
            break
        try:
            us = measure(cand)
        except Exception as err:  # a tile that does not compile or fit on this GPU is simply not a candidate
            log.append((str(cand), repr(err)[:200]))
            continue
        log.append((str(cand), us))
        fused = isinstance(cand, GemvConfig) and cand.fused
        if us < fastest.get(fused, (float("inf"),))[0]:
            fastest[fused] = (us, cand)
    best = fallback
    if fastest:
        fused_us, unfused_us = fastest.get(True, (float("inf"),))[0], fastest.get(False, (float("inf"),))[0]
        best = fastest[True][1] if fused_us < FUSED_GEMV_MARGIN * unfused_us else fastest[False][1]
    _tuned[key] = best
    tuning_log[str(key)] = log
    return best


ROTATE_BYTES = 128 << 20  # weight copies a tuning graph cycles through: more than twice the L2 of an H100
GRAPH_REPLAYS = 8


def _rotation(packed: torch.Tensor, inv_scale: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The weight and copies of it, so that timed calls read their weights from memory, as decode does,
    not from an L2 that the previous call filled."""
    copies = max(1, min(16, -(-ROTATE_BYTES // max(1, packed.numel()))))
    return [(packed, inv_scale)] + [(packed.clone(), inv_scale.clone()) for _ in range(copies - 1)]


def graph_time_us(calls: list) -> float:
    """GPU µs per call of ``calls`` (closures launching kernels), replayed from one CUDA graph.

    Eager timing would measure the host: a launch through triton's Python costs more than a batch-1
    GEMV runs. In a graph, as in CUDA-graph decode, only the GPU's time counts, launch gaps included.
    """
    calls[0]()  # compiles outside the capture, and fails here if this configuration cannot run
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(GRAPH_REPLAYS):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (GRAPH_REPLAYS * len(calls))


def ternary_matmul(x2d: torch.Tensor, packed: torch.Tensor, inv_scale: torch.Tensor, bias: torch.Tensor | None,
                   mode: int, group_size: int, config: GemvConfig | GemmConfig | None = None,
                   acts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                   keep_acts=None, out_dtype: torch.dtype | None = None, swiglu: bool = False,
                   residual: torch.Tensor | None = None, parts: torch.Tensor | None = None) -> torch.Tensor | None:
    """``(M, K) -> (M, N)`` on the GPU; ``None`` when no kernel covers this case (the caller falls back).
    ``swiglu``: the rows are gate and up stacked, and the result ``silu(gate) * up`` is ``(M, N / 2)``.
    ``residual`` (M, N) of the result's dtype, rows contiguous: the result is ``residual + x · Wᵀ``.

    ``acts`` are ``quantize_activations(x2d)`` when the caller already has them (then ``x2d`` may be the
    codes themselves and ``out_dtype`` says the result's dtype). Without them the fused GEMV (one
    launch) competes with quantize-then-multiply (two), each measured as a whole; when the choice
    quantizes separately, ``keep_acts(acts)`` receives the activations for reuse. ``parts`` (M, P) float32,
    contiguous: maxima of |x2d| per row whose maximum is the row's absmax, written by the kernel that made
    ``x2d``; the fused GEMV then reads them instead of making a pass over the rows (other tiles ignore them).
    """
    m, k = x2d.shape
    n = packed.shape[0] * 4
    y = torch.empty((m, n // 2 if swiglu else n), dtype=out_dtype or x2d.dtype, device=x2d.device)
    if m == 0:
        return y
    p = _problem(m, n, k, mode, group_size, x2d.device, acts is not None, swiglu)
    if parts is not None and p.fused_ok:  # only a fused GEMV reads the maxima: its own problem, tuned apart
        p = _problem(m, n, k, mode, group_size, x2d.device, False, swiglu, parts.shape[1])

    rotation: list = []

    def measure(cfg) -> float:
        if not rotation:
            rotation.extend(_rotation(packed, inv_scale))

        def call(w, w_inv):  # quantize-then-multiply pays for its quantizer on every call, as in use
            launch(cfg, p, x2d, acts if acts is not None or cfg.fused else quantize_activations(x2d), w, w_inv,
                   bias, y, residual, parts)

        return graph_time_us([functools.partial(call, w, w_inv) for w, w_inv in rotation])

    cfg = config or choose_config(p, measure)
    rotation.clear()
    if cfg is None:
        return None
    if acts is None and not cfg.fused:
        acts = quantize_activations(x2d)
        if keep_acts is not None:
            keep_acts(acts)
    launch(cfg, p, x2d, acts, packed, inv_scale, bias, y, residual, parts)
    return y
