#!/usr/bin/env python
"""Packed ternary inference on one CUDA GPU: check the kernels, then time them and whole models.

Run from the repository root on a machine with a CUDA GPU:

    python benchmarks/bench_kernels.py --out OUTDIR [--smollm2-gguf PATH] [--sections check,kernels,e2e]

Sections (in this order; each rewrites OUTDIR/kernels.json when it ends, so a run cut short keeps
what it measured):
  check    ternary_linear on the GPU against the unpacked torch reference on random shapes, batch
           sizes, scale kinds (tensor, channel, group), dtypes and every tuning candidate.
  kernels  y = x · Wᵀ for W of shape (out, in) = 4096x4096, 11008x4096, 4096x11008, 8192x8192,
           28672x8192 at batch 1, 8, 64: bf16 cuBLAS (F.linear) against the packed kernels (per-output-
           channel scales, activation quantization included; also the product alone with its int8 codes
           given, as a decoder layer's RMSNorm hands them over), with the bandwidth floor of each.
  e2e      greedy decode tokens/s and peak memory of a packed model against its bf16 original, in
           the same loop: plain eager `generate()`, and one decode step captured in a CUDA graph
           (static KV cache). Models: SmolLM2-135M (real weights with --smollm2-gguf, else a random-
           init model of its config; speed does not depend on weight values) and a random-init
           Llama of about 2.4B parameters.

--overlap (default, off, prefetch, pdl, pdl_noprefetch) chooses how the kernels of the check and
kernels sections overlap the kernel before them (bitconvert.kernels.triton_ternary.LaunchOverlap;
the default is bitconvert's, PDL and prefetch on Hopper). The e2e variants packed, packed_fused and
packed_fused_prequant use bitconvert's default (packed_fused: fused projections, decoder layers and,
over the static cache, the rotary embedding and cache write inside the attention kernel); the variants in OVERLAP_VARIANTS set their own, some
with inductor's kernels launched with PDL too (torch._inductor.config.triton.enable_pdl), some with
transformers' sdpa instead of bitconvert's decode attention, without the SwiGLU epilogue, with other
fused-GEMV policies or attention block sizes, without the decoder layers or the fused rotary. bf16 variants: bf16_pdl (compiled with inductor's PDL)
and bf16_decode_attention (the bf16 model with bitconvert's decode attention, the fair baseline for
the part of a step both models share).

Times: "kernel" is triton's do_bench median with L2 flushed before each call (the GPU time of one
call while the CPU can queue it during the flush; a call whose Python/launch cost exceeds the flush,
as the packed path's does on a slow host CPU, shows that cost instead); "graph" replays a CUDA graph
that calls the op on
rotating copies of the weights (at least 256 MB, so L2 does not hold them); "eager" is back-to-back
Python calls on the same rotating copies (includes the CPU cost of launching).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]  # (out, in)
BATCHES = [1, 8, 64]
ROTATE_BYTES = 256 << 20


# --------------------------------------------------------------------------- helpers

def relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison_allocator(nbytes: int) -> None:
    """Fill a block with NaN and free it, so that the next allocations likely start as NaN."""
    torch.full((nbytes // 4 + 1,), float("nan"), dtype=torch.float32, device="cuda")
    torch.cuda.synchronize()


def random_packed(n: int, k: int, granularity: str, group_size: int, device="cuda", seed=0):
    from bitconvert.quant import pack_ternary

    g = torch.Generator(device="cpu").manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    shape = {"tensor": (1,), "channel": (n,), "group": (n, k // group_size)}[granularity]
    inv = (torch.rand(shape, generator=g) * 40 + 10).float()
    return pack_ternary(codes.to(device)), inv.to(device), codes


def measure_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus written."""
    src = torch.randn(256 << 20, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / seconds


def time_kernel_us(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def time_graph_us(fns, replays: int = 20) -> float:
    """Per-call µs of a CUDA graph that calls every fn once (rotating over weight copies)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    calls = max(1, 64 // len(fns)) if len(fns) < 64 else 1
    with torch.cuda.graph(graph):
        for _ in range(calls):
            for fn in fns:
                fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    us = start.elapsed_time(end) * 1e3 / (replays * calls * len(fns))
    del graph
    return us


def time_eager_us(fns, rounds: int = 3) -> float:
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    calls = max(1, 200 // len(fns))
    best = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            for fn in fns:
                fn()
        end.record()
        end.synchronize()
        best.append(start.elapsed_time(end) * 1e3 / (calls * len(fns)))
    return sorted(best)[len(best) // 2]


class Results:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.data: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / ".kernels.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.out_dir / "kernels.json")
        (self.out_dir / "kernels.md").write_text(markdown(self.data))


# --------------------------------------------------------------------------- section: environment

def environment() -> dict:
    import transformers
    import triton

    props = torch.cuda.get_device_properties(0)
    bw = measure_bandwidth()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_kernel_us(lambda: a @ b) / 1e3
    info = {"gpu": props.name, "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "copy_bandwidth_gbs": bw / 1e9, "bf16_matmul_tflops": 2 * 8192**3 / (ms / 1e3) / 1e12}
    print(f"# {info['gpu']}: {info['sms']} SMs, copy {info['copy_bandwidth_gbs']:.0f} GB/s, "
          f"bf16 matmul {info['bf16_matmul_tflops']:.0f} TFLOP/s; torch {torch.__version__}, "
          f"triton {triton.__version__}, transformers {transformers.__version__}", flush=True)
    return info


# --------------------------------------------------------------------------- section: check

CHECK_PARTS = ("ternary", "swiglu", "layers", "attention")


def check_section(parts=CHECK_PARTS) -> dict:
    """Every GPU result against the reference (ternary products, their SwiGLU epilogue, decode attention, as
    ``parts`` says); returns cases and whether all passed."""
    from bitconvert.kernels import ternary_linear, ternary_linear_reference
    from bitconvert.kernels import triton_ternary as tt

    torch.manual_seed(1234)
    cases, failures = [], 0
    # Default tiles here: tuning every random shape would compile and time dozens of variants each.
    tune = os.environ.get("BITCONVERT_TUNE")
    os.environ["BITCONVERT_TUNE"] = "0"

    def compare(tag, x, packed, inv, bias, gran, gs, cfg=None):
        """The result, after checking it against the reference (None if the kernel raised)."""
        nonlocal failures
        ref = ternary_linear_reference(x, packed, inv, bias, granularity=gran, group_size=gs)
        poison_allocator(4 * ref.numel() * 4)
        try:
            if cfg is None:
                y = ternary_linear(x, packed, inv, bias, granularity=gran, group_size=gs)
            else:
                x2d = x.reshape(-1, x.shape[-1])
                y = tt.ternary_matmul(x2d, packed, inv, bias, tt.SCALE_MODES[gran], gs, config=cfg)
                y = y.reshape(ref.shape)
            torch.cuda.synchronize()
        except Exception as err:  # a configuration that does not compile here: the tuner skips it too
            failures += 1
            cases.append({"case": tag, "ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            print(f"  ERROR {tag}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            return None
        err = relerr(y, ref)
        exact = (y == ref).float().mean().item()
        # Integer sums are exact: fp32 differs only in the last bit of a division, 16-bit outputs by
        # at most a rounding step where an activation code or scale product lands on a tie.
        limit = 1e-6 if x.dtype == torch.float32 else 4e-3
        if gran == "group":
            limit = max(limit, 2e-6)
        ok = err <= limit and y.shape == ref.shape and y.dtype == ref.dtype
        failures += not ok
        cases.append({"case": tag, "relerr": err, "exact_fraction": exact, "ok": ok})
        if not ok:
            print(f"  FAIL {tag}: relerr {err:.3e}, exact {exact:.3f}, dtype {y.dtype} vs {ref.dtype}", flush=True)
        return y

    if "ternary" in parts:
        gen = torch.Generator().manual_seed(7)
        for i in range(30):
            gran = ("tensor", "channel", "group")[i % 3]
            gs = (32, 64, 128, 256)[i % 4] if gran == "group" else 128
            m = [1, 2, 3, 5, 8, 13, 16, 17, 33, 64, 100, 257][int(torch.randint(0, 12, (1,), generator=gen))]
            n = 4 * int(torch.randint(1, 400, (1,), generator=gen))
            k = gs * int(torch.randint(1, 24, (1,), generator=gen)) if gran == "group" else \
                int(torch.randint(8, 3000, (1,), generator=gen))
            dtype = (torch.bfloat16, torch.float16, torch.float32)[i % 3 if i % 7 else 0]
            packed, inv, _ = random_packed(n, k, gran, gs, seed=i)
            x = (torch.randn(m, k, generator=gen) * float(torch.rand(1, generator=gen) * 10 + 0.1)).to("cuda", dtype)
            if i % 5 == 0:
                x = x.reshape(1, m, k)
            bias = torch.randn(n, generator=gen).to("cuda", dtype) if i % 2 else None
            compare(f"random m={m} n={n} k={k} {gran}{gs if gran == 'group' else ''} {str(dtype)[6:]} "
                    f"bias={bias is not None}", x, packed, inv, bias, gran, gs)

        # every tuning candidate of a few problems, so each compiled variant (split-K and the fused GEMV
        # included) is checked; the fused GEMV must equal the two-launch GEMV of the same tile bit for bit.
        # The first has the kernels section's K and no bias: the same binaries, compiled once for both.
        for (m, n, k, gran, gs, has_bias) in [(1, 2048, 11008, "channel", 128, False), (1, 1024, 1024, "channel", 128, True),
                                              (8, 512, 4096, "tensor", 128, True), (5, 1000, 4100, "channel", 128, True),
                                              (2, 512, 2048, "group", 64, True), (64, 1024, 512, "channel", 128, True)]:
            packed, inv, _ = random_packed(n, k, gran, gs, seed=m + n)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None
            p = tt.Problem(m, n, k, tt.SCALE_MODES[gran], gs, x.device)
            for cfg in tt.candidate_configs(p):
                y = compare(f"config m={m} n={n} k={k} {gran} {cfg}", x, packed, inv, bias, gran, gs, cfg)
                if cfg.split_k > 1:  # the workspace must be clean for the next call
                    compare(f"config m={m} n={n} k={k} {gran} {cfg} again", x, packed, inv, bias, gran, gs, cfg)
                if cfg.fused and y is not None:
                    two = tt.ternary_matmul(x, packed, inv, bias, tt.SCALE_MODES[gran], gs,
                                            config=dataclasses.replace(cfg, fused=False))
                    same = torch.equal(y, two)
                    failures += not same
                    cases.append({"case": f"fused = two-launch m={m} n={n} k={k} {gran} {cfg}", "ok": same})
                    # the row maxima handed over by the kernel before (attention: one per key/value head)
                    cuts = torch.linspace(0, k, 5).long().tolist()
                    maxima = torch.stack([x[:, a:b].abs().amax(-1) for a, b in zip(cuts, cuts[1:])], 1).float()
                    given = tt.ternary_matmul(x, packed, inv, bias, tt.SCALE_MODES[gran], gs, config=cfg,
                                              parts=maxima.contiguous())
                    same = torch.equal(given, two)
                    failures += not same
                    cases.append({"case": f"fused with row maxima = two-launch m={m} n={n} k={k} {gran} {cfg}",
                                  "ok": same})

        # activation quantizer bit for bit
        from bitconvert.quant import int8_absmax_quantize
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for k in (4099, 20000):  # one pass and two passes over the row
                x = torch.randn(37, k, device="cuda", dtype=dtype) * 3
                codes, inv, total = tt.quantize_activations(x)
                rc, ri = int8_absmax_quantize(x)
                ok = (torch.equal(codes, rc) and torch.equal(inv, ri.reshape(-1))
                      and torch.equal(total, rc.int().sum(-1, dtype=torch.int32)))
                failures += not ok
                cases.append({"case": f"act quant {dtype} k={k}", "ok": ok})
        # activations quantized by the caller (the compiled path with COMPILED_ACT_QUANT): equal to the product on x
        from bitconvert.kernels import quantize_for_kernels, ternary_linear_quantized
        for m, n, k, gran, gs, dtype in [(1, 2048, 2560, "channel", 128, torch.bfloat16), (3, 512, 6912, "group", 64, torch.bfloat16),
                                         (40, 1024, 1024, "tensor", 128, torch.float16)]:
            packed, inv, _ = random_packed(n, k, gran, gs, seed=3 * m + n)
            x = torch.randn(2, m, k, device="cuda", dtype=dtype) * 2
            bias = torch.randn(n, device="cuda", dtype=dtype)
            y = ternary_linear_quantized(*quantize_for_kernels(x), packed, inv, bias, granularity=gran, group_size=gs,
                                         dtype=dtype)
            same = torch.equal(y, ternary_linear(x, packed, inv, bias, granularity=gran, group_size=gs))
            ref = ternary_linear_reference(x, packed, inv, bias, granularity=gran, group_size=gs)
            ok = same and relerr(y, ref) <= 4e-3
            failures += not ok
            cases.append({"case": f"quantized acts m={m} n={n} k={k} {gran} {str(dtype)[6:]}", "ok": ok,
                          "equal_to_ternary_linear": same, "relerr": relerr(y, ref)})
    if "swiglu" in parts:
        # SwiGLU in the epilogue (a SwiGLU MLP's gate/up product): every candidate of two decode problems, and
        # random prompts; silu itself may differ from torch's by a rounding step of the output dtype
        for m, n, k, gran, gs, dtype, all_candidates in [(1, 13824, 2560, "channel", 128, torch.bfloat16, True),
                                                         (4, 3072, 1024, "tensor", 128, torch.bfloat16, False),
                                                         (2, 1024, 512, "group", 64, torch.float16, False),
                                                         (77, 2048, 2560, "channel", 128, torch.bfloat16, False),
                                                         (300, 1536, 576, "group", 64, torch.bfloat16, False)]:
            packed, inv, _ = random_packed(n, k, gran, gs, seed=5 * m + n)
            x = torch.randn(m, k, device="cuda", dtype=dtype) * 2
            ref = ternary_linear_reference(x, packed, inv, None, granularity=gran, group_size=gs, swiglu=True)
            p = tt.Problem(m, n, k, tt.SCALE_MODES[gran], gs, x.device, swiglu=True)
            for cfg in tt.candidate_configs(p) if all_candidates else [None]:
                try:
                    y = (ternary_linear(x, packed, inv, granularity=gran, group_size=gs, swiglu=True) if cfg is None else
                         tt.ternary_matmul(x, packed, inv, None, tt.SCALE_MODES[gran], gs, config=cfg, swiglu=True))
                    err, ok = relerr(y, ref), y.shape == ref.shape and relerr(y, ref) <= 8e-3
                except Exception as exc:
                    err, ok = f"{type(exc).__name__}: {str(exc)[:200]}", False
                failures += not ok
                cases.append({"case": f"swiglu m={m} n={n} k={k} {gran} {str(dtype)[6:]} {cfg or 'tuned'}", "ok": ok,
                              "relerr": err})
    if "layers" in parts:
        # what bitconvert.layers.decoder hands to the products: a residual added in the epilogue (every candidate
        # of a decode o_proj problem, bit for bit against the product plus the residual), and RMSNorm with the
        # quantizer in one kernel (its codes exactly the quantizer's of its normed output)
        from bitconvert.kernels import rms_norm_quantize_reference
        for m, n, k, gran, gs, all_candidates in [(1, 2560, 2560, "channel", 128, True), (3, 1024, 6912, "group", 64, False),
                                                  (40, 2048, 1024, "channel", 128, False)]:
            packed, inv, _ = random_packed(n, k, gran, gs, seed=7 * m + n)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
            residual = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * 4
            p = tt.Problem(m, n, k, tt.SCALE_MODES[gran], gs, x.device)
            for cfg in tt.candidate_configs(p) if all_candidates else [None]:
                try:
                    if cfg is None:
                        y = ternary_linear(x, packed, inv, granularity=gran, group_size=gs, residual=residual)
                        plain = ternary_linear(x, packed, inv, granularity=gran, group_size=gs)
                    else:
                        y = tt.ternary_matmul(x, packed, inv, None, tt.SCALE_MODES[gran], gs, config=cfg, residual=residual)
                        plain = tt.ternary_matmul(x, packed, inv, None, tt.SCALE_MODES[gran], gs, config=cfg)
                    ok = torch.equal(y, residual + plain)
                    err = relerr(y, residual + plain)
                except Exception as exc:
                    err, ok = f"{type(exc).__name__}: {str(exc)[:200]}", False
                failures += not ok
                cases.append({"case": f"residual m={m} n={n} k={k} {gran} {cfg or 'tuned'}", "ok": ok, "relerr": err})
        for m, k, dtype, wdtype in [(1, 2560, torch.bfloat16, torch.bfloat16), (7, 576, torch.bfloat16, torch.bfloat16),
                                    (300, 4096, torch.float16, torch.float32), (2, 8192, torch.bfloat16, torch.bfloat16)]:
            x = torch.randn(m, k, device="cuda", dtype=dtype) * 3
            weight = (torch.randn(k, device="cuda") * 0.3 + 1).to(wdtype)
            normed, (codes, x_inv, total) = tt.rms_norm_quantize(x, weight, 1e-5)
            want = rms_norm_quantize_reference(x, weight, 1e-5)
            again = tt.quantize_activations(normed)
            exact = (normed == want[0]).float().mean().item()
            ok = (normed.dtype == want[0].dtype and relerr(normed, want[0]) <= 4e-3 and torch.equal(codes, again[0])
                  and torch.equal(x_inv, again[1]) and torch.equal(total, again[2])
                  and (codes.int() - want[1].int()).abs().max().item() <= 1)
            failures += not ok
            cases.append({"case": f"rms norm + quantizer m={m} k={k} {str(dtype)[6:]} weight {str(wdtype)[6:]}", "ok": ok,
                          "normed_exact_fraction": exact, "codes_exact_fraction": (codes == want[1]).float().mean().item()})
    if "attention" in parts:
        # decode attention: one query per sequence over a cache, grouped heads, masks with padding and empty slots
        from bitconvert.kernels import triton_attention as ta
        from bitconvert.kernels.attention import decode_attention_reference
        for b, h, hkv, d, keys, valid, splits, dtype in [
                (1, 20, 4, 128, 304, [33], None, torch.bfloat16), (1, 20, 4, 128, 304, [288], 1, torch.bfloat16),
                (1, 9, 3, 64, 4096, [4000], None, torch.bfloat16), (4, 32, 8, 128, 1000, [1000, 1, 500, 999], None, torch.float16),
                (2, 16, 16, 64, 130, [130, 64], 3, torch.bfloat16), (8, 12, 2, 96, 77, None, None, torch.bfloat16),
                (1, 64, 8, 128, 32768, [30000], None, torch.bfloat16)]:
            q = torch.randn(b, h, d, device="cuda", dtype=dtype)
            k, v = (torch.randn(b, hkv, keys, d, device="cuda", dtype=dtype) for _ in range(2))
            mask = None
            if valid is not None:
                mask = torch.zeros(b, keys, dtype=torch.bool, device="cuda")
                for row, n_valid in enumerate(valid):
                    mask[row, keys - n_valid:] = True
            ref = decode_attention_reference(q.float(), k.float(), v.float(), mask, d ** -0.5)
            try:
                got = ta.decode_attention(q, k, v, mask, d ** -0.5, splits=splits)
                again = ta.decode_attention(q, k, v, mask, d ** -0.5, splits=splits)
                err = relerr(got.float(), ref)
                ok = err <= 1e-2 and torch.equal(got, again) and got.dtype == dtype
            except Exception as exc:
                err, ok = f"{type(exc).__name__}: {str(exc)[:200]}", False
            failures += not ok
            cases.append({"case": f"decode attention b={b} h={h}/{hkv} d={d} keys={keys} valid={valid} splits={splits} "
                                  f"{str(dtype)[6:]}", "ok": ok, "relerr": err})
        # ROPE: the rotary embedding and the cache write inside the kernel, against the torch reference in float32;
        # the slot on both sides of a block's edge and in a later split, rotary angles shared (stride 0) or not
        from bitconvert.kernels.attention import decode_attention_rope_reference, group_absmax
        for b, h, hkv, d, keys, slot, splits, shared in [
                (1, 20, 4, 128, 304, 40, None, True), (1, 20, 4, 128, 304, 63, 1, True), (1, 20, 4, 128, 304, 64, 3, True),
                (4, 32, 8, 128, 1000, 999, None, False), (2, 9, 3, 64, 4096, 1500, None, False),
                (8, 12, 2, 96, 77, 0, None, True)]:
            dtype = torch.bfloat16
            qkv = torch.randn(b, (h + 2 * hkv) * d, device="cuda", dtype=dtype)
            angles = torch.randn(1 if shared else b, d, device="cuda")
            cos, sin = (f(angles).to(dtype).expand(b, d) for f in (torch.cos, torch.sin))
            caches = [torch.randn(b, hkv, keys, d, device="cuda", dtype=dtype) for _ in range(2)]
            mask = torch.zeros(b, keys, dtype=torch.bool, device="cuda")
            mask[:, :slot + 1] = True
            want_caches = [c.float() for c in caches]
            position = torch.tensor(slot, device="cuda")
            ref = decode_attention_rope_reference(qkv.float(), cos.float(), sin.float(), *want_caches, position, mask,
                                                  d ** -0.5, h)
            try:
                got, absmax = ta.decode_attention_rope(qkv, cos, sin, *caches, position, mask, d ** -0.5, h,
                                                       splits=splits)
                err = relerr(got.float(), ref)
                cache_err = max(relerr(c[:, :, slot].float(), w[:, :, slot]) for c, w in zip(caches, want_caches))
                others = [i for i in range(keys) if i != slot]
                untouched = all(torch.equal(c[:, :, others].float(), w[:, :, others]) for c, w in zip(caches, want_caches))
                ok = (err <= 1e-2 and cache_err <= 1e-2 and untouched and int(position) == slot
                      and got.dtype == dtype and torch.equal(absmax, group_absmax(got, hkv)))
            except Exception as exc:
                err, cache_err, ok = f"{type(exc).__name__}: {str(exc)[:200]}", None, False
            failures += not ok
            cases.append({"case": f"decode attention + rope b={b} h={h}/{hkv} d={d} keys={keys} slot={slot} "
                                  f"splits={splits} angles {'shared' if shared else 'per row'}", "ok": ok, "relerr": err,
                          "cache_relerr": cache_err})
        counters_clean = all(int(c.abs().sum()) == 0 for c in ta._counters.values())
        failures += not counters_clean
        cases.append({"case": "decode attention counters all zero after the checks", "ok": counters_clean})
    ws = [int(w.abs().sum()) + int(c.abs().sum()) for w, c in tt._workspaces.values()]
    clean = all(v == 0 for v in ws)
    failures += not clean
    cases.append({"case": "split-K workspace all zeros after the checks", "ok": clean})
    if tune is None:
        os.environ.pop("BITCONVERT_TUNE")
    else:
        os.environ["BITCONVERT_TUNE"] = tune
    print(f"# check: {len(cases) - failures}/{len(cases)} passed", flush=True)
    return {"passed": failures == 0, "failures": failures, "cases": cases}


# --------------------------------------------------------------------------- section: kernels

def config_label(cfg) -> str:
    """A tuned configuration in a few characters: kernel, tile, split-K."""
    if cfg is None:
        return "reference"
    if cfg.kind == "gemv":
        label = f"gemv{'-fused' if cfg.fused else ''} {cfg.br}x{cfg.bkw}" + (f" s{cfg.stages}" if cfg.stages > 1 else "")
    else:
        label = f"gemm {cfg.bm}x{cfg.br}x{cfg.bk}"
    return label + (f" k{cfg.split_k}" if cfg.split_k > 1 else "")


def kernels_section(bandwidth: float, batches=BATCHES, shapes=SHAPES, deadline: float = float("inf")) -> list[dict]:
    from bitconvert.kernels import ternary_linear, ternary_linear_quantized, ternary_linear_reference
    from bitconvert.kernels import triton_ternary as tt

    rows = []
    for n, k in shapes:
        packed, inv, codes = random_packed(n, k, "channel", 128, seed=n + k)
        w_bf16 = (codes.to("cuda", torch.bfloat16) / inv.reshape(-1, 1).to(torch.bfloat16))
        p_copies = [(packed.clone(), inv.clone()) for _ in range(min(64, math.ceil(ROTATE_BYTES / packed.numel())))]
        b_copies = [w_bf16.clone() for _ in range(min(8, math.ceil(ROTATE_BYTES / (2 * w_bf16.numel()))))]
        for m in batches:
            if time.time() > deadline:
                print(f"  skipped {n}x{k} batch {m}: out of time (--budget-s)", flush=True)
                continue
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t0 = time.time()
            ternary_linear(x, packed, inv, granularity="channel")  # tunes this shape once
            tune_s = time.time() - t0
            # x[:] is a new tensor object each call: ternary_linear reuses the quantized activations of
            # the very same input object (q/k/v share one), which a single-layer timing must not count on
            y = ternary_linear(x[:], packed, inv, granularity="channel")
            exact = relerr(y, ternary_linear_reference(x, packed, inv, granularity="channel"))
            ref = F.linear(x, w_bf16)
            err = relerr(y, ref)  # vs unquantized activations: the int8 rounding of x, not a kernel error
            bytes_bf16 = 2 * n * k + 2 * m * k + 2 * m * n
            bytes_packed = n * k // 4 + 4 * n + 2 * m * k + 2 * m * n
            p = tt.Problem(m, n, k, 1, 128, x.device)  # as ternary_linear sees it: activations not yet quantized
            cfg = tt._tuned.get(p.tuning_key)
            row = {"out": n, "in": k, "batch": m, "config": str(cfg), "config_label": config_label(cfg),
                   "tune_s": tune_s,
                   "relerr_vs_bf16_unquantized": err, "relerr_vs_reference": exact,
                   "floor_bf16_us": bytes_bf16 / bandwidth * 1e6, "floor_packed_us": bytes_packed / bandwidth * 1e6}
            row["bf16_kernel_us"] = time_kernel_us(lambda: F.linear(x, w_bf16))
            row["packed_kernel_us"] = time_kernel_us(lambda: ternary_linear(x[:], packed, inv, granularity="channel"))
            acts = tt.quantize_activations(x)
            row["act_quant_kernel_us"] = time_kernel_us(lambda: tt.quantize_activations(x))
            yb = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            if cfg is not None:  # the fused GEMV: the whole operation in its one launch
                row["matmul_only_kernel_us"] = time_kernel_us(
                    lambda: tt.launch(cfg, p, x, acts, packed, inv, None, yb))
            row["bf16_graph_us"] = time_graph_us([lambda w=w: F.linear(x, w) for w in b_copies])
            row["packed_graph_us"] = time_graph_us(
                [lambda c=c: ternary_linear(x[:], c[0], c[1], granularity="channel") for c in p_copies])
            # the product alone, its activations quantized by the kernel before it (as the RMSNorm of a decoder
            # layer hands them over, bitconvert.layers.decoder): the codes in, no quantizer launch of its own
            ternary_linear_quantized(*acts, packed, inv, granularity="channel", dtype=torch.bfloat16)  # tunes once
            row["packed_codes_graph_us"] = time_graph_us(
                [lambda c=c: ternary_linear_quantized(*acts, c[0], c[1], granularity="channel", dtype=torch.bfloat16)
                 for c in p_copies])
            row["speedup_codes_graph"] = row["bf16_graph_us"] / row["packed_codes_graph_us"]
            row["bf16_eager_us"] = time_eager_us([lambda w=w: F.linear(x, w) for w in b_copies])
            row["packed_eager_us"] = time_eager_us(
                [lambda c=c: ternary_linear(x[:], c[0], c[1], granularity="channel") for c in p_copies])
            for mode in ("kernel", "graph", "eager"):
                row[f"speedup_{mode}"] = row[f"bf16_{mode}_us"] / row[f"packed_{mode}_us"]
            row["packed_graph_vs_floor"] = row["packed_graph_us"] / row["floor_packed_us"]
            row["bf16_graph_vs_floor"] = row["bf16_graph_us"] / row["floor_bf16_us"]
            rows.append(row)
            print(f"  {n:>5}x{k:<5} b{m:<3} bf16 {row['bf16_kernel_us']:7.1f} / {row['bf16_graph_us']:7.1f} us  "
                  f"packed {row['packed_kernel_us']:6.1f} / {row['packed_graph_us']:6.1f} us  "
                  f"(act {row['act_quant_kernel_us']:.1f}, mm {row.get('matmul_only_kernel_us', float('nan')):.1f}; "
                  f"floor {row['floor_packed_us']:.1f})  x{row['speedup_kernel']:.2f} / x{row['speedup_graph']:.2f}  "
                  f"codes given {row['packed_codes_graph_us']:.1f} us x{row['speedup_codes_graph']:.2f}  "
                  f"{config_label(cfg)}", flush=True)
        del p_copies, b_copies, w_bf16
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- section: e2e

def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2)


def llama_2b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
                       num_attention_heads=20, num_key_value_heads=4, max_position_embeddings=4096,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def random_model(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def placeholder_tokenizer():
    """A random-init model has no tokenizer; an export folder wants one."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def eager_decode(model, prompt, new_tokens: int) -> dict:
    kw = dict(do_sample=False, pad_token_id=0, use_cache=True)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kw)  # warm up, tune
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    def timed(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        assert out.shape[1] == prompt.shape[1] + n
        return time.perf_counter() - t

    t1 = min(timed(1) for _ in range(2))
    tn = min(timed(new_tokens) for _ in range(2))
    return {"tokens_per_s": (new_tokens - 1) / (tn - t1), "prefill_s": t1,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


@torch.no_grad()
def graph_decode(model, prompt, new_tokens: int, compiled: bool = False, profile: bool = False) -> dict:
    """One decode step (static KV cache) captured in a CUDA graph that also feeds its argmax back.

    ``compiled``: the step runs through ``torch.compile`` first (kernel fusion for the norms, rotary
    embedding and residuals; the packed product is one opaque custom op), then the same capture.
    The 2-D attention mask is explicit: without it transformers skips the mask for one query token in
    eager mode but builds it while a graph is captured, and the two disagree about the empty cache slots.
    ``profile``: also where the GPU time of a step goes, by kind of kernel (:func:`kernel_profile`).
    """
    from transformers import StaticCache

    p = prompt.shape[1]
    # room for every replay: the first step, 8 warm-up steps, the timed ones and the profiled ones (a
    # replay past the cache's end fails with a device-side index assert, which ends the whole process)
    length = p + new_tokens + 16 + (PROFILE_STEPS if profile else 0)
    cache = StaticCache(config=model.config, max_cache_len=length)
    mask = torch.zeros(1, length, dtype=torch.long, device="cuda")
    mask[:, :p] = 1
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(p, device="cuda"),
                attention_mask=mask, use_cache=True)
    first_ids = out.logits[:, -1:].argmax(-1)
    ids = first_ids.clone()
    pos = torch.tensor([p], device="cuda")
    mask[:, p] = 1
    step = torch.compile(model, dynamic=False) if compiled else model

    def decode():
        return step(input_ids=ids, past_key_values=cache, cache_position=pos, position_ids=pos[None],
                    attention_mask=mask, use_cache=True).logits[:, -1]

    # references for the first decode step: eager with the cache, and a full forward without one
    first_eager = model(input_ids=ids, past_key_values=cache, cache_position=pos, position_ids=pos[None],
                        attention_mask=mask, use_cache=True).logits[:, -1].float()
    full = model(input_ids=torch.cat([prompt, first_ids], 1), use_cache=False).logits[:, -1].float()
    t0 = time.perf_counter()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compiles (compiled) and tunes every shape outside the capture
            decode()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = decode()
        ids.copy_(logits.argmax(-1, keepdim=True))
        pos.add_(1)
        mask.index_fill_(1, pos, 1)
    # replay from the first decode position: same inputs as first_eager
    ids.copy_(first_ids)
    pos.fill_(p)
    graph.replay()
    torch.cuda.synchronize()
    step_check = relerr(logits.float(), first_eager)
    check_full = relerr(logits.float(), full)
    for _ in range(8):
        graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(new_tokens):
        graph.replay()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    result = {"tokens_per_s": new_tokens / seconds, "first_step_relerr_vs_eager": step_check,
              "first_step_relerr_vs_full_forward": check_full,
              "eager_step_relerr_vs_full_forward": relerr(first_eager, full), "warmup_s": warmup_s,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    if profile:
        try:
            result["profile"] = kernel_profile(graph.replay, steps=PROFILE_STEPS)
        except Exception as err:  # the profile is extra: a profiler that fails here must not cost the timing
            result["profile_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    del graph
    return result


PROFILE_STEPS = 8
KERNEL_KINDS = ("ternary product", "bf16 product (cuBLAS)", "attention",
                "inductor fused (norms, residuals, activations, cache)", "other (eager elementwise, copies, argmax)")


def kernel_kind(name: str) -> str:
    if any(t in name for t in ("_gemv_kernel", "_gemm_kernel", "_act_quant", "_rms_norm_quant")):
        return "ternary product"  # with the quantizers, which the RMSNorm of bitconvert's decoder layers is
    if any(t in name for t in ("gemv", "gemm", "nvjet", "cutlass", "xmma", "splitKreduce")):
        return "bf16 product (cuBLAS)"
    if any(t in name for t in ("fmha", "flash", "attention", "attn")):
        return "attention"
    if name.startswith("triton_"):
        return "inductor fused (norms, residuals, activations, cache)"
    return "other (eager elementwise, copies, argmax)"


def kernel_profile(run, steps: int) -> dict:
    """GPU time per decode step by kind of kernel, from CUPTI's records of ``steps`` calls of ``run``.

    Kernel durations only: the gaps between kernels of a graph (a fraction of a microsecond each) are
    the difference between their sum and the measured step time. Kinds go by kernel name, so inductor
    kernels named after the attention they prepare count as attention.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    kinds: dict[str, dict] = {}
    top = []
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0)
        if not us or evt.key.startswith("cuda"):  # runtime calls on the host, not kernels
            continue
        kind = kernel_kind(evt.key)
        entry = kinds.setdefault(kind, {"kernels_per_step": 0.0, "us_per_step": 0.0})
        entry["kernels_per_step"] += evt.count / steps
        entry["us_per_step"] += us / steps
        top.append((us / steps, evt.count / steps, evt.key[:120]))
    top.sort(reverse=True)
    return {"by_kind": kinds, "kernels_per_step": sum(k["kernels_per_step"] for k in kinds.values()),
            "kernel_us_per_step": sum(k["us_per_step"] for k in kinds.values()),
            "top": [{"us_per_step": round(us, 2), "per_step": n, "kernel": name} for us, n, name in top[:15]]}


DECODE_MODES = ("eager", "graph", "compiled")


def measure_model(model, prompt, new_tokens: int, graph_tokens: int, modes=DECODE_MODES,
                  profile: bool = False) -> dict:
    row = {"weight_bytes": model_bytes(model)}
    with torch.no_grad():  # tune the prompt's and one token's shapes first: the tuner's weight copies
        model(prompt[:, :1])  # are temporary and must not count in the peak memory measured below
        model(prompt)
    runs = {"eager": lambda: eager_decode(model, prompt, new_tokens),
            "graph": lambda: graph_decode(model, prompt, graph_tokens, profile=profile),
            "compiled": lambda: graph_decode(model, prompt, graph_tokens, compiled=True, profile=profile)}
    for mode in modes:
        try:
            row[mode] = runs[mode]()
        except Exception as err:
            row[mode] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
            traceback.print_exc()
        torch._dynamo.reset()
        print(f"  {mode}: {row[mode]}", flush=True)
    return row


VARIANTS = ("packed", "packed_fused", "packed_fused_prequant")
# (programmatic dependent launch, L2 prefetch of the weights): see triton_ternary.LaunchOverlap
OVERLAPS = {"off": (False, False), "prefetch": (False, True), "pdl": (True, True), "pdl_noprefetch": (True, False)}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A packed_fused variant: how bitconvert's kernels overlap (OVERLAPS), inductor's kernels launched with
    PDL too, the activation quantizer compiled into the kernel before each product (COMPILED_ACT_QUANT),
    bitconvert's decode attention (else transformers' sdpa), SwiGLU in the gate/up product's epilogue, which
    GEMVs quantize their activations themselves (triton_ternary.FUSED_GEMV)."""

    overlap: str
    inductor_pdl: bool
    prequant: bool = False
    decode_attention: bool = True
    swiglu: bool = True
    fused_gemv: str = "auto"
    attention_block: int = 0  # keys per block of the decode attention kernel (0: its default)
    decoder_layers: bool = True  # bitconvert.layers.decoder: norms quantize, o_proj/down_proj add the residual
    rope_attention: bool = True  # bitconvert.layers.attention.fuse_rope_attention: rotary and cache write inside
    deferred_positions: bool = True  # the fused layers' cache positions advanced in one kernel after the last layer
    absmax_handover: bool = True  # the attention kernel's row maxima let o_proj's GEMV quantize its input itself


OVERLAP_VARIANTS = {"packed_fused_no_overlap": Variant("off", False),
                    "packed_fused_prefetch": Variant("prefetch", False), "packed_fused_pdl": Variant("pdl", True),
                    "packed_fused_pdl_kernels": Variant("pdl", False),
                    "packed_fused_pdl_noprefetch": Variant("pdl_noprefetch", True),
                    "packed_fused_prequant_pdl": Variant("pdl", True, prequant=True),
                    "packed_fused_pdl_sdpa": Variant("pdl", True, decode_attention=False),
                    "packed_fused_pdl_no_swiglu": Variant("pdl", True, swiglu=False),
                    "packed_fused_pdl_sdpa_no_swiglu": Variant("pdl", True, decode_attention=False, swiglu=False),
                    "packed_fused_pdl_fused_gemv": Variant("pdl", True, fused_gemv="always"),
                    "packed_fused_fused_gemv": Variant("pdl", False, fused_gemv="always"),
                    "packed_fused_pdl_keys32": Variant("pdl", True, attention_block=32),
                    "packed_fused_pdl_keys128": Variant("pdl", True, attention_block=128),
                    "packed_fused_pdl_no_layers": Variant("pdl", True, decoder_layers=False),
                    "packed_fused_pdl_kernels_no_layers": Variant("pdl", False, decoder_layers=False),
                    "packed_fused_pdl_no_rope": Variant("pdl", True, rope_attention=False),
                    "packed_fused_pdl_no_rope_no_layers": Variant("pdl", True, decoder_layers=False,
                                                                  rope_attention=False),
                    "packed_fused_pdl_positions_per_layer": Variant("pdl", True, deferred_positions=False),
                    "packed_fused_pdl_no_absmax": Variant("pdl", True, absmax_handover=False)}
# bf16 variants: the bf16 model compiled with inductor's PDL; with bitconvert's decode attention (the part of
# a step that the two models share, made as fast for bf16 as for packed)
BF16_VARIANTS = ("bf16_pdl", "bf16_decode_attention")


@contextlib.contextmanager
def attention(model, decode: bool):
    """The model attends with bitconvert's decode attention inside the block if ``decode``, else with sdpa."""
    from bitconvert.layers.attention import decode_attention

    before = model.config._attn_implementation
    if decode:
        with decode_attention(model):
            yield
        return
    model.config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        model.config._attn_implementation = before


@contextlib.contextmanager
def fused_gemv(policy: str):
    """triton_ternary.FUSED_GEMV = ``policy`` inside the block, every tile choice measured afresh."""
    from bitconvert.kernels import triton_ternary as tt

    before = tt.FUSED_GEMV
    tt.FUSED_GEMV = policy
    tt._tuned.clear()
    try:
        yield
    finally:
        tt.FUSED_GEMV = before
        tt._tuned.clear()


@contextlib.contextmanager
def attention_block(keys: int):
    """The decode attention kernel takes ``keys`` keys a block inside the block (0: as it is)."""
    from bitconvert.kernels import triton_attention as ta

    before = ta.BLOCK_KEYS
    ta.BLOCK_KEYS = keys or before
    try:
        yield
    finally:
        ta.BLOCK_KEYS = before


@contextlib.contextmanager
def toggled(model, on: bool, fuse, unfuse, what: str):
    """Inside the block ``model`` is as ``fuse`` makes it if ``on`` (which must change something: ``what``), else
    as ``unfuse`` leaves it; after the block it is as it was."""
    was_on = unfuse(model) > 0
    if on and not fuse(model):
        raise RuntimeError(f"{fuse.__name__} changed no {what} of this model")
    try:
        yield
    finally:
        unfuse(model)
        if was_on:
            fuse(model)


def rope_attention(model, on: bool):
    """Off: attention as transformers has it inside the block (fuse_rope_attention undone), on: fused."""
    from bitconvert.layers.attention import fuse_rope_attention, unfuse_rope_attention

    return toggled(model, on, fuse_rope_attention, unfuse_rope_attention, "attention module")


@contextlib.contextmanager
def absmax_handover(on: bool):
    """Off: the fused decode step does not hand o_proj the attention output's row maxima inside the block, so
    o_proj quantizes its input as every other product does (bitconvert.layers.attention.HAND_OVER_ABSMAX)."""
    from bitconvert.layers import attention as attention_layers

    before = attention_layers.HAND_OVER_ABSMAX
    attention_layers.HAND_OVER_ABSMAX = on
    try:
        yield
    finally:
        attention_layers.HAND_OVER_ABSMAX = before


@contextlib.contextmanager
def deferred_positions(model, on: bool):
    """Off: each fused attention module advances its own cache position (one small kernel per layer) inside the
    block, as before bitconvert.layers.attention deferred them to one advance after the last layer."""
    taken = []
    if not on:
        for module in model.modules():
            deferred = module.__dict__.pop("_bitconvert_positions", None)
            if deferred is not None:
                taken.append((module, deferred))
    try:
        yield
    finally:
        for module, deferred in taken:
            module._bitconvert_positions = deferred


def decoder_layers(model, on: bool):
    """Off: the decoder layers as transformers has them inside the block (bitconvert.layers.decoder undone),
    on: as fuse_decoder_layers makes them."""
    from bitconvert.layers.decoder import fuse_decoder_layers, unfuse_decoder_layers

    return toggled(model, on, fuse_decoder_layers, unfuse_decoder_layers, "layer")


@contextlib.contextmanager
def swiglu_epilogue(model, on: bool):
    """Off: every FusedSwiGLU MLP is its original module again inside the block (gate/up fused, SiLU·up apart)."""
    from bitconvert.layers.fused import FusedSwiGLU

    swapped = []
    if not on:
        for name, module in list(model.named_modules()):
            if isinstance(module, FusedSwiGLU):
                owner, _, attr = name.rpartition(".")
                parent = model.get_submodule(owner)
                setattr(parent, attr, module.original)
                swapped.append((parent, attr, module))
    try:
        yield
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)


@contextlib.contextmanager
def compiled_act_quant(on: bool):
    """Compiled only: the activation quantizer as torch ops that inductor fuses into the kernel before each
    product, which then takes int8 codes (bitconvert.layers.packed.COMPILED_ACT_QUANT), inside the block."""
    import bitconvert.layers.packed as packed_layers

    packed_layers.COMPILED_ACT_QUANT = on
    try:
        yield
    finally:
        packed_layers.COMPILED_ACT_QUANT = False


@contextlib.contextmanager
def launch_overlap(name: str, inductor: bool | None = None):
    """bitconvert's kernels launched as OVERLAPS[name] says inside the block, and inductor's with PDL too if
    ``inductor`` (by default: when bitconvert's are)."""
    import torch._inductor.config as inductor_config

    from bitconvert.kernels import triton_ternary as tt

    pdl, prefetch = OVERLAPS[name]
    previous = tt.set_launch_overlap(pdl=pdl, prefetch=prefetch)
    inductor_pdl = getattr(inductor_config.triton, "enable_pdl", None)
    if inductor_pdl is not None:
        inductor_config.triton.enable_pdl = pdl if inductor is None else inductor
    try:
        yield
    finally:
        tt.set_launch_overlap(pdl=previous.pdl, prefetch=previous.prefetch)
        if inductor_pdl is not None:
            inductor_config.triton.enable_pdl = inductor_pdl


def tuned_gemvs() -> dict[str, str]:
    """The tile the tuner keeps for each batch-1..8 problem it has met (fused or not): variants re-tune, and a
    choice that flips between calls explains a change in decode speed."""
    from bitconvert.kernels import triton_ternary as tt

    return {str(key): str(cfg) for key, cfg in tt._tuned.items() if isinstance(cfg, tt.GemvConfig)}


def e2e_model(result: dict, make_bf16, spec, prompt_len: int, new_tokens: int, graph_tokens: int,
              modes=DECODE_MODES, profile: bool = False, variants=VARIANTS, save=lambda: None) -> dict:
    """Fills ``result`` (which names the model) one variant at a time, calling ``save`` after each."""
    from bitconvert.convert import convert_to_bitnet
    from bitconvert.export.packed import export_ternary, load_ternary

    name = result["model"]
    model, tokenizer, source = make_bf16()
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0)).cuda()
    result.update(source=source, parameters=sum(p.numel() for p in model.parameters()), spec=spec.model_dump(),
                  prompt_tokens=prompt_len, eager_new_tokens=new_tokens, graph_new_tokens=graph_tokens)
    print(f"# e2e {name} ({source}, {result['parameters'] / 1e9:.2f}B parameters)", flush=True)
    with attention(model, decode=False):
        result["bf16"] = measure_model(model, prompt, new_tokens, graph_tokens, modes, profile)
    save()
    if "bf16_pdl" in variants and "compiled" in modes:
        with launch_overlap("pdl"), attention(model, decode=False):  # the compiler settings of packed_fused_pdl
            result["bf16_pdl"] = measure_model(model, prompt, new_tokens, graph_tokens, ["compiled"], profile)
        save()
    if "bf16_decode_attention" in variants:
        with attention(model, decode=True):
            result["bf16_decode_attention"] = measure_model(model, prompt, new_tokens, graph_tokens,
                                                            [m for m in modes if m != "eager"], profile)
        save()
    with tempfile.TemporaryDirectory() as tmp:
        convert_to_bitnet(model, spec)
        export_ternary(model, tokenizer or placeholder_tokenizer(), tmp, spec, dtype=torch.bfloat16)
        del model
        torch.cuda.empty_cache()
        packed, _ = load_ternary(tmp, dtype=torch.bfloat16, device="cuda", verify=False)
    with torch.no_grad():  # the packed model with kernels vs the same model on the torch reference
        got = packed(prompt).logits.float()
        os.environ["BITCONVERT_KERNELS"] = "reference"
        try:
            want = packed(prompt).logits.float()
        finally:
            os.environ.pop("BITCONVERT_KERNELS")
    result["packed_logits_relerr_kernels_vs_reference"] = relerr(got, want)
    result["weight_bytes_ratio"] = result["bf16"]["weight_bytes"] / model_bytes(packed)
    if "packed" in variants:
        result["packed"] = measure_model(packed, prompt, new_tokens, graph_tokens, modes, profile)
        save()
    # q/k/v and gate/up as one product each, the decoder layers handing work to them, and the rotary embedding
    # and cache write in the attention kernel (decode steps over a static cache)
    from bitconvert.layers.attention import fuse_rope_attention
    from bitconvert.layers.decoder import fuse_decoder_layers
    from bitconvert.layers.fused import fuse_projections

    fused_names = fuse_projections(packed)
    result["fused_groups"] = len(fused_names)
    result["swiglu_mlps"] = sum(name.endswith("+swiglu") for name in fused_names)
    with torch.no_grad():
        result["fused_logits_relerr_vs_unfused"] = relerr(packed(prompt).logits.float(), got)
        with swiglu_epilogue(packed, False):
            apart = packed(prompt).logits.float()
        result["fused_logits_relerr_swiglu_vs_apart"] = relerr(packed(prompt).logits.float(), apart)
        result["decoder_layers"] = len(fuse_decoder_layers(packed))
        result["fused_logits_relerr_decoder_layers_vs_not"] = relerr(packed(prompt).logits.float(), got)
        result["rope_attention"] = len(fuse_rope_attention(packed))  # decode steps over a static cache only
    if "packed_fused" in variants:
        result["packed_fused"] = measure_model(packed, prompt, new_tokens, graph_tokens, modes, profile)
        result.setdefault("tuned_gemvs", {})["packed_fused"] = tuned_gemvs()
        save()
    if "packed_fused_prequant" in variants and "compiled" in modes:
        with compiled_act_quant(True):
            result["packed_fused_prequant"] = measure_model(packed, prompt, new_tokens, graph_tokens, ["compiled"],
                                                            profile)
        save()
    for variant, v in OVERLAP_VARIANTS.items():
        if variant in variants and (not v.prequant or "compiled" in modes):
            with (compiled_act_quant(v.prequant), launch_overlap(v.overlap, v.inductor_pdl),
                  attention(packed, v.decode_attention), swiglu_epilogue(packed, v.swiglu), fused_gemv(v.fused_gemv),
                  attention_block(v.attention_block), decoder_layers(packed, v.decoder_layers),
                  rope_attention(packed, v.rope_attention), deferred_positions(packed, v.deferred_positions),
                  absmax_handover(v.absmax_handover)):
                result[variant] = measure_model(packed, prompt, new_tokens, graph_tokens,
                                                ["compiled"] if v.prequant else modes, profile)
                result.setdefault("tuned_gemvs", {})[variant] = tuned_gemvs()
            save()
    del packed
    torch.cuda.empty_cache()
    pairs = [("packed", "", "bf16"), ("packed_fused", "_fused", "bf16"), ("packed_fused_prequant", "_prequant", "bf16"),
             *((v, v.removeprefix("packed_fused"), "bf16") for v in OVERLAP_VARIANTS),
             ("packed_fused_pdl", "_pdl_vs_bf16_pdl", "bf16_pdl"), ("bf16_decode_attention", "_bf16_decode_attention", "bf16"),
             ("packed_fused_pdl", "_pdl_vs_bf16_decode_attention", "bf16_decode_attention")]
    for mode in DECODE_MODES:
        for variant, suffix, base in pairs:
            b, q = result.get(base, {}).get(mode, {}), result.get(variant, {}).get(mode, {})
            if "tokens_per_s" in b and "tokens_per_s" in q:
                result[f"speedup_{mode}{suffix}"] = q["tokens_per_s"] / b["tokens_per_s"]
                result[f"peak_mem_ratio_{mode}{suffix}"] = b["peak_mem_gib"] / q["peak_mem_gib"]
    print(json.dumps({k: v for k, v in result.items() if k not in ("spec",)}, indent=1, default=str), flush=True)
    return result


def e2e_section(args, runs: list, save=lambda: None) -> list[dict]:
    """Appends one result per model to ``runs`` and calls ``save`` after each, so a cut-short call keeps them."""
    from bitconvert.quant import QuantSpec

    spec = QuantSpec(weight_scale=args.weight_scale)

    def smollm2():
        if args.smollm2_gguf:
            from bitconvert.sources import load_model

            model, tokenizer = load_model(args.smollm2_gguf, dtype=torch.bfloat16, device="cuda")
            return model.eval(), tokenizer, f"real weights from {args.smollm2_gguf}"
        return (random_model(smollm2_config(), 0), None,
                "random init from SmolLM2-135M's config (no --smollm2-gguf given)")

    plans = [("SmolLM2-135M", smollm2),
             ("Llama-2.4B", lambda: (random_model(llama_2b_config(), 1), None, "random init"))]
    for name, make in plans:
        if args.models and name not in args.models:
            continue
        if time.time() > args.deadline:
            runs.append({"model": name, "error": "skipped: out of time (--budget-s)"})
            continue
        modes = args.modes.split(",")
        if name not in args.compile_models.split(","):
            modes = [m for m in modes if m != "compiled"]
        result = {"model": name}
        runs.append(result)
        try:
            e2e_model(result, make, spec, args.prompt_tokens, args.new_tokens, args.graph_tokens, modes,
                      args.profile, args.variants.split(","), save)
        except Exception as err:
            traceback.print_exc()
            result["error"] = f"{type(err).__name__}: {err}"
        torch.cuda.empty_cache()
        save()
    return runs


# --------------------------------------------------------------------------- report

def env_overlap(data: dict) -> str:
    overlap = data.get("environment", {}).get("launch_overlap", {}).get("bitconvert_default")
    return overlap or "no overlap (before PDL became the default)"


def markdown(data: dict) -> str:
    lines = ["# Packed ternary kernels vs bf16", ""]
    env = data.get("environment")
    if env:
        lines += [f"{env['gpu']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}, transformers "
                  f"{env['transformers']}; measured copy bandwidth {env['copy_bandwidth_gbs']:.0f} GB/s, bf16 matmul "
                  f"{env['bf16_matmul_tflops']:.0f} TFLOP/s.", ""]
    check = data.get("check")
    if check:
        lines += [f"Correctness against the unpacked torch reference: {len(check['cases']) - check['failures']}/"
                  f"{len(check['cases'])} cases passed.", ""]
    rows = data.get("kernels")
    if rows:
        lines += ["## y = x · Wᵀ, W (out x in), per-output-channel scales, activation quantization included", "",
                  "Times in µs. kernel = one call after an L2 flush (do_bench median; includes the CPU launch cost "
                  "where it exceeds the flush); graph = CUDA-graph replay over rotating weight copies (GPU time); "
                  "eager = back-to-back Python calls. Floors: bytes moved / measured copy bandwidth. codes given = "
                  "the packed graph row with the int8 activations handed over by the kernel before (a decoder "
                  "layer's RMSNorm quantizes them, bitconvert.layers.decoder), so no quantizer launch of its own.", "",
                  "| out x in | batch | bf16 kernel | packed kernel | speedup | bf16 graph | packed graph | speedup "
                  "| codes given | speedup | packed floor | bf16 floor | packed eager | bf16 eager | tuned config |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['out']}x{r['in']} | {r['batch']} | {r['bf16_kernel_us']:.1f} | {r['packed_kernel_us']:.1f} "
                         f"| {r['speedup_kernel']:.2f}x | {r['bf16_graph_us']:.1f} | {r['packed_graph_us']:.1f} | "
                         f"{r['speedup_graph']:.2f}x | {r.get('packed_codes_graph_us', float('nan')):.1f} | "
                         f"{r.get('speedup_codes_graph', float('nan')):.2f}x | {r['floor_packed_us']:.1f} | {r['floor_bf16_us']:.1f} | "
                         f"{r['packed_eager_us']:.1f} | {r['bf16_eager_us']:.1f} | "
                         f"{r.get('config_label', '')} |")
        lines.append("")
    runs = data.get("e2e")
    if runs:
        lines += ["## End-to-end greedy decode, batch 1", "",
                  "packed = the export as loaded; packed+fused = q/k/v and gate/up stacked into one product each, "
                  "the decoder layers' norms quantizing for them and o_proj/down_proj adding the residual "
                  "(bitconvert.layers.decoder), and the rotary embedding and cache write inside the attention kernel "
                  "(bitconvert.layers.attention.fuse_rope_attention). graph = one decode step in a CUDA graph; compiled = "
                  "torch.compile, then the same graph. +prequant = packed+fused, compiled with the activation "
                  "quantizer as torch ops (inductor fuses it into the kernel before each product).", "",
                  "| model | source | mode | bf16 tok/s | packed tok/s | speedup | packed+fused tok/s | speedup "
                  "| +prequant tok/s | speedup | bf16 peak GiB | packed peak GiB | weights bf16 / packed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            if "error" in r:
                lines.append(f"| {r['model']} | error: {r['error']} | | | | | | | | | | | |")
                continue

            if "bf16" not in r or "weight_bytes_ratio" not in r:  # cut short before anything was compared
                continue

            def cell(variant, mode, r=r):
                got = r.get(variant, {}).get(mode, {})
                return f"{got['tokens_per_s']:.1f}" if "tokens_per_s" in got else got.get("error", "")[:80]

            def ratio(variant, mode, r=r):  # from the rows themselves: a run cut short has no speedup_* keys
                got, base = r.get(variant, {}).get(mode, {}), r["bf16"].get(mode, {})
                both = "tokens_per_s" in got and "tokens_per_s" in base
                return f"{got['tokens_per_s'] / base['tokens_per_s']:.2f}x" if both else ""

            for mode in DECODE_MODES:
                b, q = r["bf16"].get(mode, {}), (r.get("packed") or r.get("packed_fused") or {}).get(mode, {})
                if not b and not q:
                    continue
                lines.append(f"| {r['model']} | {r['source']} | {mode} | {cell('bf16', mode)} | {cell('packed', mode)} | "
                             f"{ratio('packed', mode)} | {cell('packed_fused', mode)} | {ratio('packed_fused', mode)} | "
                             f"{cell('packed_fused_prequant', mode)} | {ratio('packed_fused_prequant', mode)} | "
                             f"{b.get('peak_mem_gib', float('nan')):.2f} | "
                             f"{q.get('peak_mem_gib', float('nan')):.2f} | {r['bf16']['weight_bytes'] / 2**20:.0f} MiB / "
                             f"{r['bf16']['weight_bytes'] / r['weight_bytes_ratio'] / 2**20:.0f} MiB "
                             f"({r['weight_bytes_ratio']:.2f}x) |")
        lines.append("")
        overlapped = [(r, m) for r in runs if "bf16" in r for m in DECODE_MODES
                      if any(m in r.get(v, {}) for v in (*OVERLAP_VARIANTS, *BF16_VARIANTS))]
        if overlapped:
            lines += ["### Variants: kernels launched to overlap the one before, decode attention, SwiGLU epilogue", "",
                      "Variants of packed+fused, which runs bitconvert's defaults (decode attention, SwiGLU in the "
                      "gate/up product, the decoder layers, the rotary embedding in the attention kernel, the overlap "
                      "below, inductor's kernels with PDL on Hopper). "
                      "no_layers = the decoder layers as transformers has them (each RMSNorm and residual add an "
                      "inductor kernel, a quantizer launch before every product); no_rope = the rotary embedding and the "
                      "cache writes as transformers runs them, before the attention kernel; positions_per_layer = each layer's "
                      "cache position advanced by a kernel of its own after its attention, instead of all of them in one "
                      "kernel after the last layer; no_absmax = o_proj quantizes its input with a kernel of its own instead of "
                      "taking the attention kernel's row maxima into its GEMV. sdpa = transformers' attention instead of bitconvert's "
                      "decode attention; no_swiglu = SiLU·up as its own kernel between the two MLP products; "
                      "bf16_decode_attention = the bf16 model with bitconvert's decode attention (the attention both "
                      "models share, as fast for both); fused_gemv = every batch-1 GEMV quantizes its activations "
                      "itself (the tuner's choice otherwise); keys32, keys128 = the decode attention kernel with "
                      "blocks of 32 or 128 keys instead of 64. prefetch = the GEMVs first start the L2 prefetch of their weights; "
                      "pdl = that, and every bitconvert kernel launched with programmatic dependent launch (it "
                      "starts while the one before finishes and waits for it only before touching activations), "
                      "and inductor's kernels launched the same way (bf16_pdl: the bf16 model compiled with that "
                      "setting); pdl_kernels = PDL for bitconvert's kernels only; "
                      "pdl_noprefetch = pdl without the prefetch; prequant_pdl = pdl compiled with the activation "
                      "quantizer fused as in +prequant; no_overlap = neither. packed_fused itself runs with "
                      f"bitconvert's default of this run: {env_overlap(data)}.", "",
                      "| model | mode | variant | tok/s | vs bf16 | vs bf16 PDL | vs bf16 + decode attention |",
                      "|---|---|---|---|---|---|---|"]
            for r, m in overlapped:
                bf16 = r["bf16"].get(m, {}).get("tokens_per_s")
                bf16_pdl = r.get("bf16_pdl", {}).get(m, {}).get("tokens_per_s")
                bf16_attn = r.get("bf16_decode_attention", {}).get(m, {}).get("tokens_per_s")
                for v in ("bf16", *BF16_VARIANTS, "packed_fused", *OVERLAP_VARIANTS):
                    got = r.get(v, {}).get(m, {}).get("tokens_per_s")
                    if got and bf16:
                        lines.append(f"| {r['model']} | {m} | {v} | {got:.1f} | {got / bf16:.2f}x | "
                                     f"{f'{got / bf16_pdl:.2f}x' if bf16_pdl else ''} | "
                                     f"{f'{got / bf16_attn:.2f}x' if bf16_attn else ''} |")
            lines.append("")
        profiled = [(r, v, m) for r in runs if "bf16" in r for m in DECODE_MODES
                    for v in ("bf16", *BF16_VARIANTS, "packed", "packed_fused", "packed_fused_prequant", *OVERLAP_VARIANTS)
                    if "profile" in r.get(v, {}).get(m, {})]
        if profiled:
            lines += ["### Where a decode step's GPU time goes", "",
                      "µs per step (kernels per step) by kind of kernel, from CUPTI during graph replays; the step is "
                      "1e6 / tok/s, and what the kernels do not cover is the gaps between them. rest = the step less "
                      "its ternary product kernels; bound = bf16 step / rest, the speedup if those took no time. Kernels "
                      "launched with PDL overlap their neighbours, so their times can sum to more than the step "
                      "(rest: overlapped).", "",
                      "| model | mode | variant | step µs | kernels | " + " | ".join(KERNEL_KINDS) + " | rest µs | bound |",
                      "|---|---|---|---|---|" + "---|" * (len(KERNEL_KINDS) + 2)]
            for r, v, m in profiled:
                run, step_us = r[v][m], 1e6 / r[v][m]["tokens_per_s"]
                kinds = run["profile"]["by_kind"]
                cells = [f"{kinds[k]['us_per_step']:.0f} ({kinds[k]['kernels_per_step']:.0f})" if k in kinds else ""
                         for k in KERNEL_KINDS]
                rest, bound = "", ""
                if not v.startswith("bf16") and "tokens_per_s" in r["bf16"].get(m, {}):
                    rest_us = step_us - kinds.get("ternary product", {}).get("us_per_step", 0.0)
                    if rest_us > 0:
                        rest, bound = f"{rest_us:.0f}", f"{1e6 / r['bf16'][m]['tokens_per_s'] / rest_us:.2f}x"
                    else:  # PDL-launched kernels overlap: their times sum to more than the step
                        rest = "overlapped"
                lines.append(f"| {r['model']} | {m} | {v} | {step_us:.0f} | {run['profile']['kernels_per_step']:.0f} | "
                             + " | ".join(cells) + f" | {rest} | {bound} |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="folder for kernels.json/md")
    parser.add_argument("--sections", default="check,kernels,e2e")
    parser.add_argument("--checks", default=",".join(CHECK_PARTS), help="parts of the check section")
    parser.add_argument("--smollm2-gguf", default=None, help="real SmolLM2-135M weights (a .gguf or model folder)")
    parser.add_argument("--models", nargs="*", default=None, help="e2e models to run (default: all)")
    parser.add_argument("--weight-scale", default="channel", choices=["tensor", "channel", "group"])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per eager generate() run")
    parser.add_argument("--graph-tokens", type=int, default=256, help="tokens per CUDA-graph decode run")
    parser.add_argument("--modes", default=",".join(DECODE_MODES), help="e2e decode modes")
    parser.add_argument("--compile-models", default="Llama-2.4B",
                        help="e2e models that also decode through torch.compile (compilation takes a minute or two)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="e2e variants besides bf16: packed, packed_fused, packed_fused_prequant (compiled only), "
                             + ", ".join((*BF16_VARIANTS, *OVERLAP_VARIANTS)))
    parser.add_argument("--profile", action="store_true",
                        help="e2e: also break each graph decode step's GPU time down by kind of kernel")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="out x in, in this order")
    parser.add_argument("--overlap", default="default", choices=["default", *OVERLAPS],
                        help="check and kernels sections: how the kernels overlap the one before them")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="skip the kernel rows and models that would start after this many seconds")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    from bitconvert.kernels import triton_ternary as tt

    tt.FUSED_GEMV = "never" if tt.FUSED_GEMV == "never" else "auto"  # checked before anything is timed
    default_overlap = (tt._overlap.pdl, tt._overlap.prefetch)
    tt.set_launch_overlap(*(default_overlap if args.overlap == "default" else OVERLAPS[args.overlap]))
    sections = args.sections.split(",")
    start = time.time()
    args.deadline = start + args.budget_s
    results = Results(Path(args.out))
    results.data["environment"] = env = environment()
    env["launch_overlap"] = {"check_and_kernels": args.overlap,
                             "bitconvert_default": str(tt.LaunchOverlap(*default_overlap))}
    results.data["args"] = {k: v for k, v in vars(args).items() if k != "deadline"}
    results.save()
    for section in sections:  # in the order given
        if section == "check":
            results.data["check"] = check_section(args.checks.split(","))
        elif section == "kernels":
            print("# kernels: out x in, batch: bf16 kernel / graph µs, packed kernel / graph µs (components), "
                  "speedups", flush=True)
            results.data["kernels"] = kernels_section(env["copy_bandwidth_gbs"] * 1e9,
                                                      [int(b) for b in args.batches.split(",")],
                                                      [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")],
                                                      deadline=args.deadline)
        elif section == "e2e":
            tt.set_launch_overlap(*default_overlap)  # variants that differ say so
            e2e_section(args, results.data.setdefault("e2e", []), results.save)
        else:
            print(f"unknown section {section!r}; expected check, kernels, e2e", file=sys.stderr)
            return 2
        results.save()
        print(f"# {section} done at {time.time() - start:.0f} s", flush=True)
    results.data["tuned"] = {str(k): str(v) for k, v in tt._tuned.items()}
    results.data["tuning_log"] = {str(k): v for k, v in tt.tuning_log.items()}
    results.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    results.save()
    print(markdown(results.data))
    check = results.data.get("check")
    return 1 if check and not check["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
