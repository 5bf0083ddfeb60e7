"""ternary_linear against the unpacked reference: the CPU paths here, the Triton kernels through
triton's interpreter when triton is installed (the GPU itself is checked by benchmarks/bench_kernels.py)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bitconvert.kernels import CPU_CACHES, TernaryCache, ternary_linear, ternary_linear_reference
from bitconvert.layers import PackedBitLinear
from bitconvert.quant import QuantSpec, pack_ternary, ternary_quantize
from conftest import run_in_triton_interpreter

ROOT = Path(__file__).resolve().parents[1]


def random_packed(n, k, granularity, group_size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes, inv = ternary_quantize(torch.randn(n, k, generator=g), granularity, group_size)
    return pack_ternary(codes), inv


@pytest.mark.parametrize("cpu", CPU_CACHES)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_paths_match_reference_on_random_shapes(cpu, granularity, dtype):
    g = torch.Generator().manual_seed(hash((cpu, granularity, str(dtype))) % 1000)
    for trial in range(4):
        n = 4 * int(torch.randint(1, 40, (1,), generator=g))
        k = 32 * int(torch.randint(1, 12, (1,), generator=g))
        lead = [(1,), (3,), (2, 5), (17,)][trial]
        packed, inv = random_packed(n, k, granularity, seed=trial)
        x = (torch.randn(*lead, k, generator=g) * 4).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype) if trial % 2 else None
        cache = TernaryCache(cpu)
        want = ternary_linear_reference(x, packed, inv, bias, granularity=granularity, group_size=32)
        for _ in range(2):  # the second call reads the cache
            got = ternary_linear(x, packed, inv, bias, granularity=granularity, group_size=32, cache=cache)
            assert got.shape == want.shape and got.dtype == want.dtype
            if granularity == "group":  # same arithmetic, possibly another summation order
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            else:  # integer sums are exact: identical
                assert torch.equal(got, want)


def test_int8_codes_multiply_exactly_by_either_product(monkeypatch):
    """The int8 cache's product, whichever the first call's timing picks: torch's int8 matmul, or float32
    sgemm over a few weight rows at a time; rows longer than float32 sums hold exactly take the int8
    matmul (the limits are shrunk here to reach every branch)."""
    from bitconvert.kernels import ternary as cpu_path

    g = torch.Generator().manual_seed(3)
    x = torch.randint(-127, 128, (5, 96), generator=g, dtype=torch.int8)
    w = torch.randint(-1, 2, (40, 96), generator=g, dtype=torch.int8)
    exact = (x.long() @ w.long().t()).float()
    monkeypatch.setattr(cpu_path, "_int_mm_faster", None)
    assert torch.equal(cpu_path._int_matmul(x, w), exact)
    assert cpu_path._int_mm_faster in (True, False)  # timed once, then kept
    for faster in (True, False):
        monkeypatch.setattr(cpu_path, "_int_mm_faster", faster)
        assert torch.equal(cpu_path._int_matmul(x, w), exact)
    monkeypatch.setattr(cpu_path, "FLOAT_CHUNK", 96 * 7)  # 7 rows a block: 6 blocks, the last one short
    assert torch.equal(cpu_path._int_matmul(x, w), exact)
    monkeypatch.setattr(cpu_path, "EXACT_FLOAT_INPUTS", 64)
    calls = []
    monkeypatch.setattr(cpu_path, "_int_mm", lambda *a: calls.append(a) or (a[0].long() @ a[1].long().t()).float())
    assert torch.equal(cpu_path._int_matmul(x, w), exact) and len(calls) == 1


def test_cache_holds_the_promised_bytes_and_follows_weight_updates():
    layer = PackedBitLinear(64, 32, True, spec=QuantSpec(weight_scale="channel"))
    packed, inv = random_packed(32, 64, "channel")
    layer.load_state_dict({"weight": packed, "weight_scale": inv, "bias": torch.zeros(32)})
    x = torch.randn(3, 64)
    first = layer(x)
    assert layer.kernel_cache.nbytes == 32 * 64  # int8 codes: one byte a weight
    assert "kernel_cache" not in dict(layer.named_buffers()) and "kernel_cache" not in layer.state_dict()
    other, inv2 = random_packed(32, 64, "channel", seed=5)
    layer.load_state_dict({"weight": other, "weight_scale": inv2, "bias": torch.zeros(32)})  # in place
    second = layer(x)
    assert torch.equal(second, ternary_linear_reference(x, other, inv2, torch.zeros(32), granularity="channel"))
    assert not torch.equal(first, second)


def test_reference_can_be_forced(monkeypatch):
    packed, inv = random_packed(16, 64, "tensor")
    x = torch.randn(2, 64)
    monkeypatch.setenv("BITCONVERT_KERNELS", "reference")
    cache = TernaryCache("float")
    ternary_linear(x, packed, inv, cache=cache)
    assert cache.nbytes == 0


def test_unknown_cache_mode_is_named():
    with pytest.raises(ValueError, match="unknown CPU cache 'fast'"):
        TernaryCache("fast")


def test_triton_is_imported_only_for_cuda_tensors():
    code = textwrap.dedent("""
        import sys, torch
        from bitconvert.kernels import ternary_linear, TernaryCache
        from bitconvert.quant import pack_ternary
        packed = pack_ternary(torch.randint(-1, 2, (8, 16), dtype=torch.int8))
        ternary_linear(torch.randn(2, 16), packed, torch.ones(1), cache=TernaryCache())
        assert "triton" not in sys.modules and "bitconvert.kernels.triton_ternary" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


INTERPRETER_CHECK = textwrap.dedent("""
    import os, sys, torch
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np
    from triton.runtime import interpreter
    from bitconvert.kernels import triton_ternary as tt
    from bitconvert.kernels.reference import ternary_linear_reference
    from bitconvert.quant import int8_absmax_quantize, pack_ternary, ternary_quantize

    torch.manual_seed(0)
    cases = [  # m, n, k, granularity, group size, config
        (1, 32, 64, "tensor", 128, tt.GemvConfig(br=2, bkw=8)),
        (5, 64, 512, "channel", 128, tt.GemvConfig(br=8, bkw=64)),
        (6, 64, 1024, "tensor", 128, tt.GemvConfig(br=8, bkw=64, split_k=2)),
        (1, 64, 2048, "channel", 128, tt.GemvConfig(br=4, bkw=16, split_k=8, stages=3)),
        (3, 32, 1000, "tensor", 128, tt.GemvConfig(br=2, bkw=32, stages=3)),
        (3, 48, 96, "channel", 128, tt.GemvConfig(br=4, bkw=8, split_k=2)),
        (2, 32, 128, "group", 32, tt.GemvConfig(br=2, bkw=16)),
        (1, 32, 256, "group", 64, tt.GemvConfig(br=2, bkw=8)),
        (7, 64, 96, "tensor", 128, tt.GemmConfig(bm=16, br=16, bk=32)),
        (20, 64, 200, "channel", 128, tt.GemmConfig(bm=16, br=8, bk=32, split_k=3)),
        (40, 64, 256, "channel", 128, tt.GemmConfig(bm=16, br=8, bk=32, split_k=2)),
        (33, 48, 128, "group", 64, tt.GemmConfig(bm=16, br=8, bk=32)),
    ]
    for m, n, k, gran, gs, cfg in cases:
        codes, inv = ternary_quantize(torch.randn(n, k), gran, gs)
        packed = pack_ternary(codes)
        x = torch.randn(m, k) * 3
        bias = torch.randn(n) if m % 2 else None
        want = ternary_linear_reference(x, packed, inv, bias, granularity=gran, group_size=gs)
        got = tt.ternary_matmul(x, packed, inv, bias, tt.SCALE_MODES[gran], gs, config=cfg)
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-6, (m, n, k, gran, cfg, err)  # the interpreter's division may differ in the last bit
    # activations quantized by the caller (the compiled path): the codes stand in for x, out_dtype gives y's dtype
    for m, n, k, gran, gs, cfg in [(1, 32, 256, "channel", 128, tt.GemvConfig(br=2, bkw=16, stages=3)),
                                   (20, 64, 128, "group", 64, tt.GemmConfig(bm=16, br=8, bk=32))]:
        codes_w, inv_w = ternary_quantize(torch.randn(n, k), gran, gs)
        packed = pack_ternary(codes_w)
        x = torch.randn(m, k) * 3
        acts = tt.quantize_activations(x)
        want = ternary_linear_reference(x, packed, inv_w, None, granularity=gran, group_size=gs)
        got = tt.ternary_matmul(acts[0], packed, inv_w, None, tt.SCALE_MODES[gran], gs, config=cfg, acts=acts,
                                out_dtype=torch.float32)
        assert got.dtype == torch.float32 and ((got - want).norm() / want.norm()).item() < 1e-6, (m, n, k, cfg)
    x = torch.randn(4, 300) * 5
    codes, inv, total = tt.quantize_activations(x)
    want_codes, _ = int8_absmax_quantize(x)
    assert torch.equal(codes, want_codes) and torch.equal(total, want_codes.int().sum(-1, dtype=torch.int32))
    fused_cases = [  # m, n, k, granularity, group size, tile (br, bkw, split_k, stages): K not a multiple of the tile
        (1, 32, 100, "tensor", 128, (2, 16, 1, 1)),
        (3, 48, 1000, "channel", 128, (4, 32, 2, 3)),
        (8, 32, 516, "channel", 128, (2, 64, 1, 1)),
        (2, 64, 224, "tensor", 128, (8, 8, 4, 1)),
        (1, 64, 4000, "channel", 128, (4, 32, 8, 3)),
        (5, 32, 192, "group", 32, (2, 16, 1, 3)),
        (1, 16, 256, "group", 64, (4, 32, 1, 1)),
    ]
    for m, n, k, gran, gs, (br, bkw, split, stages) in fused_cases:
        codes, inv = ternary_quantize(torch.randn(n, k), gran, gs)
        packed = pack_ternary(codes)
        x = torch.randn(m, k) * 3
        x[0, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5])  # inv = 1 exactly: ties round to even
        bias = torch.randn(n) if m % 2 else None
        want = ternary_linear_reference(x, packed, inv, bias, granularity=gran, group_size=gs)
        cfg = tt.GemvConfig(br=br, bkw=bkw, split_k=split, fused=True, stages=stages)
        got = tt.ternary_matmul(x, packed, inv, bias, tt.SCALE_MODES[gran], gs, config=cfg)
        two_launch = tt.ternary_matmul(x, packed, inv, bias, tt.SCALE_MODES[gran], gs,
                                       config=tt.GemvConfig(br=br, bkw=bkw, split_k=split, stages=stages))
        # the same integer sums and the same scaling: the fused GEMV equals quantize-then-multiply bit for bit
        assert torch.equal(got, two_launch), (m, n, k, gran, cfg)
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-6, (m, n, k, gran, cfg, err)
        # the row maxima from the kernel before, in 3 uneven slices (one of them a single input): the same bits
        cuts = [0, 1, k // 3, k]
        parts = torch.stack([x[:, a:b].abs().amax(-1) for a, b in zip(cuts, cuts[1:])], dim=1).float().contiguous()
        given = tt.ternary_matmul(x, packed, inv, bias, tt.SCALE_MODES[gran], gs, config=cfg, parts=parts)
        assert torch.equal(given, two_launch), ("parts", m, n, k, gran, cfg)
    # SwiGLU in the epilogue: rows are gate then up, the result silu(gate) * up, half as wide
    swiglu_cases = [(1, 64, 128, "channel", 128, tt.GemvConfig(br=2, bkw=16)),
                    (3, 96, 256, "tensor", 128, tt.GemvConfig(br=4, bkw=16, split_k=2, fused=True, stages=3)),
                    (2, 64, 128, "group", 32, tt.GemvConfig(br=2, bkw=16, fused=True)),
                    (20, 64, 200, "channel", 128, tt.GemmConfig(bm=16, br=8, bk=32, split_k=3)),
                    (33, 48, 128, "group", 64, tt.GemmConfig(bm=16, br=8, bk=32))]
    for m, n, k, gran, gs, cfg in swiglu_cases:
        codes, inv = ternary_quantize(torch.randn(n, k), gran, gs)
        packed = pack_ternary(codes)
        x = torch.randn(m, k) * 3
        bias = torch.randn(n) if m % 2 else None
        want = ternary_linear_reference(x, packed, inv, bias, granularity=gran, group_size=gs, swiglu=True)
        got = tt.ternary_matmul(x, packed, inv, bias, tt.SCALE_MODES[gran], gs, config=cfg, swiglu=True)
        assert got.shape == (m, n // 2), (got.shape, cfg)
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-5, ("swiglu", m, n, k, gran, cfg, err)
    # a residual added in the epilogue: residual + product, rounded once to the output dtype
    residual_cases = [(1, 32, 256, "channel", 128, tt.GemvConfig(br=2, bkw=16, stages=3)),
                      (3, 64, 512, "tensor", 128, tt.GemvConfig(br=4, bkw=16, split_k=4)),
                      (2, 32, 128, "group", 32, tt.GemvConfig(br=2, bkw=16, fused=True)),
                      (20, 64, 200, "channel", 128, tt.GemmConfig(bm=16, br=8, bk=32, split_k=3))]
    for m, n, k, gran, gs, cfg in residual_cases:
        codes, inv = ternary_quantize(torch.randn(n, k), gran, gs)
        packed = pack_ternary(codes)
        x = (torch.randn(m, k) * 3).half()
        bias = torch.randn(n).half() if m % 2 else None
        residual = torch.randn(m, n).half()
        plain = tt.ternary_matmul(x, packed, inv, bias, tt.SCALE_MODES[gran], gs, config=cfg)
        got = tt.ternary_matmul(x, packed, inv, bias, tt.SCALE_MODES[gran], gs, config=cfg, residual=residual)
        assert torch.equal(got, residual + plain), ("residual", m, n, k, gran, cfg)
    # RMSNorm and the quantizer in one kernel, against transformers' formula then quantize_for_kernels
    from bitconvert.kernels.ternary import rms_norm_quantize_reference
    for m, k, dtype, wdtype in [(1, 64, torch.float16, torch.float16), (5, 300, torch.float32, torch.float32),
                                (3, 96, torch.float16, torch.float32)]:
        x = (torch.randn(m, k) * 4).to(dtype)
        weight = torch.randn(k).to(wdtype)
        normed, (codes, inv, total) = tt.rms_norm_quantize(x, weight, 1e-5)
        want = rms_norm_quantize_reference(x, weight, 1e-5)
        assert normed.dtype == want[0].dtype
        assert ((normed.float() - want[0].float()).abs() <= 2e-3 * want[0].float().abs() + 1e-6).all(), (m, k, dtype)
        # the codes of the kernel's own normed row, exactly as the quantizer makes them
        again = tt.quantize_activations(normed)
        assert torch.equal(codes, again[0]) and torch.equal(total, again[2]), (m, k, dtype)
        assert ((inv - again[1]).abs() <= 1e-6 * again[1]).all()
        assert (codes.int() - want[1].int()).abs().max() <= 1
    # the tuner measures the fused GEMV against the two-launch path, unless the activations are quantized already
    tt.FUSED_GEMV = "auto"
    fresh = tt.candidate_configs(tt.Problem(3, 64, 256, 1, 128, torch.device("cpu")))
    ready = tt.candidate_configs(tt.Problem(3, 64, 256, 1, 128, torch.device("cpu"), acts_ready=True))
    assert any(c.fused for c in fresh) and any(not c.fused for c in fresh) and not any(c.fused for c in ready)
    assert not any(c.fused for c in tt.candidate_configs(tt.Problem(9, 64, 256, 1, 128, torch.device("cpu"))))
    ws, counters = tt._workspace(torch.device("cpu"))
    assert int(ws.abs().sum()) == 0 and int(counters.abs().sum()) == 0  # split-K cleaned up after itself
    print("interpreter ok")
""")


@pytest.mark.slow
def test_triton_kernels_match_reference_in_the_interpreter():
    """The kernels' indexing, split-K bookkeeping and scales, run by triton's CPU interpreter."""
    run_in_triton_interpreter(INTERPRETER_CHECK)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_quantized_activations_give_the_same_product(granularity):
    """ternary_linear_quantized on quantize_for_kernels(x) is ternary_linear on x."""
    from bitconvert.kernels import quantize_for_kernels, ternary_linear_quantized

    g = torch.Generator().manual_seed(1)
    packed, inv = random_packed(48, 96, granularity)
    for dtype, lead, bias in [(torch.float32, (3,), None), (torch.bfloat16, (2, 5), torch.randn(48, generator=g))]:
        x = (torch.randn(*lead, 96, generator=g) * 3).to(dtype)
        b = None if bias is None else bias.to(dtype)
        codes, x_inv, x_sum = quantize_for_kernels(x)
        assert codes.dtype == torch.int8 and x_inv.shape == lead and torch.equal(x_sum, codes.sum(-1, dtype=torch.int32))
        got = ternary_linear_quantized(codes, x_inv, x_sum, packed, inv, b, granularity=granularity, group_size=32,
                                       dtype=dtype)
        want = ternary_linear_reference(x, packed, inv, b, granularity=granularity, group_size=32)
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_packed_model_compiles_as_one_graph_with_the_same_logits(tmp_path, tiny_tokenizer):
    """torch.compile sees the packed product as one custom operator: no graph break, same numbers."""
    from bitconvert.convert import convert_to_bitnet
    from bitconvert.export.packed import export_ternary, load_ternary
    from conftest import build_tiny_model

    spec = QuantSpec(weight_scale="channel")
    model = build_tiny_model("llama", 320)
    convert_to_bitnet(model, spec)
    export_ternary(model, tiny_tokenizer, tmp_path, spec, dtype=torch.float32)
    packed, _ = load_ternary(tmp_path)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(packed, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        want = packed(ids, use_cache=False).logits
        got = compiled(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the quantizer as torch ops in the graph, the product taking codes: the same numbers again
    import bitconvert.layers.packed as packed_layers

    torch._dynamo.reset()
    packed_layers.COMPILED_ACT_QUANT = True
    try:
        compiled = torch.compile(packed, backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            got = compiled(ids, use_cache=False).logits
    finally:
        packed_layers.COMPILED_ACT_QUANT = False
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _ptx_for_hopper(kernel, constants: dict, pointer_types: dict) -> str:
    """The PTX triton writes for an H100/H200 (no GPU needed: triton compiles for a named target)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import triton

    signature = {name: "constexpr" if name in constants else pointer_types.get(name, "i32")
                 for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                              options={"launch_pdl": True, "num_warps": 4})
    assert compiled.metadata.launch_pdl
    return compiled.asm["ptx"]


@pytest.mark.parametrize(("fused", "parts"), [(True, 0), (True, 4), (False, 0)])
@pytest.mark.parametrize("split", [False, True])
def test_overlapped_gemv_prefetches_weights_and_touches_nothing_else_before_it_waits(fused, parts, split):
    """With programmatic dependent launch the GEMV may start while the kernel before it still writes the
    activations (and reads buffers this one writes): before ``griddepcontrol.wait`` it may only start the
    L2 prefetch of its weights; every load, store and atomic comes after."""
    pytest.importorskip("triton")
    from bitconvert.kernels import triton_ternary as tt

    constants = dict(BM=1, BR=4, BKW=128, SPLIT=split, STAGES=3, CHAIN=True, SCALE_MODE=1, GW=1, GWT=1,
                     HAS_BIAS=True, FUSED=fused, XBLOCK=256, ON_GPU=True, PDL=True, PREFETCH=True, SWIGLU=split,
                     RESIDUAL=not split, PARTS=parts, PARTS_P2=max(1, parts))
    types = {name: "*i32" for name in ("xw_ptr", "ww_ptr", "xsum_ptr", "ws_ptr", "cnt_ptr")}
    types.update(xinv_ptr="*fp32", winv_ptr="*fp32", bias_ptr="*bf16", y_ptr="*bf16", res_ptr="*bf16")
    if fused:
        types["xw_ptr"] = "*bf16"
    lines = _ptx_for_hopper(tt._gemv_kernel, constants, types).splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    memory_ops = ("ld.global", "st.global", "atom.", "red.")
    assert not [line for line in lines[:wait] if any(op in line for op in memory_ops)]
    assert sum("cp.async.bulk.prefetch.L2.global" in line for line in lines[:wait]) == constants["BR"]
    assert any("griddepcontrol.launch_dependents" in line for line in lines[wait:])


def test_norm_quantizer_compiles_for_hopper_and_waits_before_it_reads():
    pytest.importorskip("triton")
    from bitconvert.kernels import triton_ternary as tt

    types = dict(x_ptr="*bf16", w_ptr="*bf16", n_ptr="*bf16", q_ptr="*i8", inv_ptr="*fp32", sum_ptr="*i32", eps="fp32")
    lines = _ptx_for_hopper(tt._rms_norm_quant_kernel, dict(BLOCK=4096, ON_GPU=True, PDL=True), types).splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    assert not [line for line in lines[:wait] if "ld.global" in line or "st.global" in line]
    assert any("rsqrt" in line for line in lines[wait:])


def test_launch_overlap_is_chosen_once_and_clears_the_tuned_tiles():
    pytest.importorskip("triton")
    from bitconvert.kernels import triton_ternary as tt

    tt._tuned["stale"] = tt.GemvConfig()
    previous = tt.set_launch_overlap(pdl=False, prefetch=True)
    try:
        assert "stale" not in tt._tuned
        assert tt._overlap == tt.LaunchOverlap(pdl=False, prefetch=True)
        assert tt._overlap_on(torch.device("cpu")) == tt._NO_OVERLAP  # CPU tensors (the interpreter): off
    finally:
        tt.set_launch_overlap(previous.pdl, previous.prefetch)
    assert tt._overlap == previous


@pytest.mark.parametrize(("fused_us", "picked"), [(9.5, "unfused"), (8.5, "fused")])
def test_the_fused_gemv_must_win_by_the_margin(monkeypatch, fused_us, picked):
    """Within FUSED_GEMV_MARGIN of the best quantize-then-GEMV the tuner keeps the two launches (its timings
    are that noisy, and a wrong fused pick cost the compiled decode ~3%); clearly faster, it takes the fused one."""
    pytest.importorskip("triton")
    from bitconvert.kernels import triton_ternary as tt

    fused, unfused, gemm = (tt.GemvConfig(fused=True), tt.GemvConfig(fused=False, br=4),
                            tt.GemmConfig(bm=16, br=16, bk=128, split_k=1, num_warps=4, num_stages=4))
    monkeypatch.setattr(tt, "candidate_configs", lambda p: [fused, unfused, gemm])
    monkeypatch.setattr(tt, "default_config", lambda p: None)
    monkeypatch.setattr(tt, "tuning_enabled", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tt, "_tuned", {})
    times = {fused: fused_us, unfused: 10.0, gemm: 12.0}

    class Problem:
        tuning_key = ("test", fused_us)

    assert tt.choose_config(Problem(), times.__getitem__) == (fused if picked == "fused" else unfused)


def test_which_launches_overlap(monkeypatch):
    """On a GPU that supports it: every GEMV launches with PDL and prefetches when its rows start on 16
    bytes; GEMMs of more than GEMM_PDL_MAX_M tokens launch plainly (measured slower with PDL)."""
    pytest.importorskip("triton")
    from bitconvert.kernels import triton_ternary as tt

    monkeypatch.setattr(tt, "_overlap_on", lambda device: tt.LaunchOverlap(pdl=True, prefetch=True))
    monkeypatch.setattr(tt, "_l2_bytes", lambda device: 50 << 20)  # an H100's
    tt._launch_params.cache_clear()
    try:
        cuda = torch.device("cuda", 0)
        gemv = tt._launch_params(tt.GemvConfig(), tt.Problem(1, 256, 512, 1, 128, cuda), False)[2]
        assert gemv["PDL"] and gemv["launch_pdl"] and gemv["PREFETCH"]
        assert not tt._launch_params(tt.GemvConfig(), tt.Problem(1, 256, 520, 1, 128, cuda), False)[2]["PREFETCH"]
        assert not tt._launch_params(tt.GemvConfig(), tt.Problem(1, 256, 512, 1, 128, cuda), False, False)[2]["PREFETCH"]
        huge = tt._launch_params(tt.GemvConfig(), tt.Problem(1, 28672, 8192, 1, 128, cuda), False)[2]  # 59 MB
        assert huge["PDL"] and not huge["PREFETCH"]
        small = tt._launch_params(tt.GemmConfig(), tt.Problem(8, 256, 512, 1, 128, cuda), False)[2]
        large = tt._launch_params(tt.GemmConfig(), tt.Problem(tt.GEMM_PDL_MAX_M + 1, 256, 512, 1, 128, cuda),
                                  False)[2]
        assert small["PDL"] and small["launch_pdl"] and not large["PDL"] and "launch_pdl" not in large
    finally:
        tt._launch_params.cache_clear()


def test_fused_gemv_policy_chooses_the_tuner_candidates(monkeypatch):
    pytest.importorskip("triton")
    from bitconvert.kernels import triton_ternary as tt

    problem = tt.Problem(1, 256, 1024, 1, 128, torch.device("cpu"))
    kinds = {}
    for policy in ("auto", "always", "never"):
        monkeypatch.setattr(tt, "FUSED_GEMV", policy)
        kinds[policy] = {(c.kind, c.fused) for c in tt.candidate_configs(problem)}
    assert kinds["auto"] == {("gemv", True), ("gemv", False), ("gemm", False)}
    assert kinds["always"] == {("gemv", True), ("gemm", False)}  # the GEMM stays: no fused one exists
    assert kinds["never"] == {("gemv", False), ("gemm", False)}


def test_compiled_products_never_reuse_another_layers_activations(monkeypatch):
    """Inductor hands one buffer object to several products in turn and rewrites it without a version bump:
    the custom operator must not look up activations by tensor identity."""
    from bitconvert.kernels import ternary

    seen = []
    monkeypatch.setattr(ternary, "ternary_linear", lambda *args, **kwargs: seen.append(kwargs) or args[0].clone())
    ternary.ternary_linear_op(torch.randn(2, 8), torch.zeros(2, 8, dtype=torch.uint8), torch.ones(1), None,
                              "tensor", 128)
    assert seen and seen[0]["reuse"] is False


def test_reference_kernels_context_takes_the_reference_inside_only():
    from bitconvert.kernels import TernaryCache, reference_kernels, ternary_linear

    packed, inv = random_packed(16, 32, "channel")
    x = torch.randn(3, 32)
    cache = TernaryCache("int8")
    with reference_kernels(), reference_kernels():  # nests
        y = ternary_linear(x, packed, inv, granularity="channel", cache=cache)
        assert cache.nbytes == 0  # the CPU cache was not filled: the reference ran
    assert cache.nbytes == 0
    assert torch.equal(ternary_linear(x, packed, inv, granularity="channel", cache=cache), y) and cache.nbytes > 0


def test_compile_with_pdl_sets_inductors_switch_only_where_the_kernels_use_pdl(monkeypatch):
    pytest.importorskip("triton")
    import torch._inductor.config as inductor_config

    from bitconvert.kernels import triton_ternary as tt

    if not hasattr(inductor_config.triton, "enable_pdl"):
        pytest.skip("this torch's inductor has no PDL switch")
    monkeypatch.setattr(inductor_config.triton, "enable_pdl", False)
    assert tt.compile_with_pdl(torch.device("cpu")) is False  # no PDL off Hopper: left alone
    monkeypatch.setattr(tt, "_overlap_on", lambda device: tt.LaunchOverlap(pdl=True))
    monkeypatch.setenv("BITCONVERT_INDUCTOR_PDL", "0")
    assert tt.compile_with_pdl(torch.device("cuda")) is False  # the opt-out
    monkeypatch.delenv("BITCONVERT_INDUCTOR_PDL")
    assert tt.compile_with_pdl(torch.device("cuda")) is True and inductor_config.triton.enable_pdl is True
