"""Decode attention: one query token per sequence, keys and values read once per key/value head."""

import textwrap
from types import SimpleNamespace

import pytest
import torch

from bitconvert.kernels.attention import decode_attention, decode_attention_reference
from bitconvert.layers.attention import DECODE_ATTENTION, decode_attention_forward, use_decode_attention
from bitconvert.quant import QuantSpec
from conftest import build_tiny_model, run_in_triton_interpreter


def naive_attention(query, key, value, mask, scale):
    """Every query head against its own copy of its key/value head, softmax written out."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.einsum("bhd,bhld->bhl", query, key) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("bhl,bhld->bhd", scores.softmax(-1), value)


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (8, 1)])
def test_reference_is_attention_with_every_head_its_own_copy(heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(s, generator=g) for s in ((3, heads, 16), (3, kv_heads, 9, 16), (3, kv_heads, 9, 16)))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, :2] = False  # left padding
    for m in (mask, None):
        want = naive_attention(query, key, value, m, 0.25)
        torch.testing.assert_close(decode_attention_reference(query, key, value, m, 0.25), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decode_attention(query, key, value, m, 0.25), want, rtol=1e-5, atol=1e-5)


def test_prompts_and_float_masks_go_to_transformers_sdpa():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    g = torch.Generator().manual_seed(1)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    query, key, value = (torch.randn(s, generator=g) for s in ((1, 4, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8)))
    ours, _ = decode_attention_forward(module, query, key, value, None, scaling=0.3)
    theirs, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, None, scaling=0.3)
    assert torch.equal(ours, theirs)
    additive = torch.zeros(1, 1, 1, 5)
    additive[..., 3:] = float("-inf")
    ours, _ = decode_attention_forward(module, query[:, :, :1], key, value, additive, scaling=0.3)
    theirs, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query[:, :, :1], key, value, additive, scaling=0.3)
    assert torch.equal(ours, theirs)


def test_a_model_decodes_the_same_tokens_with_it(monkeypatch):
    model = build_tiny_model("llama", 320).eval()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 320, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the mask, not the kernel, says which keys count
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert use_decode_attention(model) and model.config._attn_implementation == DECODE_ATTENTION
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    model.config._attn_implementation = "eager"
    assert not use_decode_attention(model) and model.config._attn_implementation == "eager"
    monkeypatch.setenv("BITCONVERT_DECODE_ATTENTION", "0")
    model.config._attn_implementation = "sdpa"
    assert not use_decode_attention(model) and model.config._attn_implementation == "sdpa"


INTERPRETER_CHECK = textwrap.dedent("""
    import os, torch
    os.environ["TRITON_INTERPRET"] = "1"
    from bitconvert.kernels import triton_attention as ta
    from bitconvert.kernels.attention import decode_attention_reference

    torch.manual_seed(0)
    cases = [  # batch, heads, kv heads, dim, keys, valid keys per row (None: no mask), splits (None: chosen)
        (1, 20, 4, 128, 304, [33], None), (1, 20, 4, 128, 304, [288], 1), (2, 9, 3, 64, 150, [5, 150], None),
        (2, 4, 4, 80, 70, [70, 1], 2), (1, 8, 2, 64, 40, None, None), (3, 6, 2, 32, 200, [200, 64, 65], 3),
        (1, 8, 2, 64, 1500, [700], None), (2, 4, 1, 32, 2100, [1, 2100], 5),  # long caches: empty blocks skipped
    ]
    for b, h, hkv, d, keys, valid, splits in cases:
        q, k, v = torch.randn(b, h, d).half(), torch.randn(b, hkv, keys, d).half(), torch.randn(b, hkv, keys, d).half()
        mask = None
        if valid is not None:
            mask = torch.zeros(b, keys, dtype=torch.bool)
            for row, n in enumerate(valid):
                mask[row, keys - n:] = True  # left padding
        want = decode_attention_reference(q.float(), k.float(), v.float(), mask, d ** -0.5)
        got = ta.decode_attention(q, k, v, mask, d ** -0.5, splits=splits)
        err = ((got.float() - want).norm() / want.norm()).item()
        assert got.dtype == torch.float16 and err < 2e-3, (b, h, hkv, d, keys, valid, splits, err)
    assert int(ta._counters[torch.device("cpu")].abs().sum()) == 0  # every head reset its counter

    # ROPE: rotary embedding and the cache write inside the kernel, against the torch reference
    from bitconvert.kernels.attention import decode_attention_rope_reference, group_absmax
    for b, h, hkv, d, keys, slots, splits in [(1, 20, 4, 128, 304, [40], None), (2, 9, 3, 64, 150, [149], 2),
                                               (3, 6, 2, 80, 200, [0], 3), (2, 4, 1, 32, 2100, [1500], 5)]:
        qkv = torch.randn(b, (h + 2 * hkv) * d).half()
        cos, sin = torch.randn(b, d).half(), torch.randn(b, d).half()
        caches = [torch.randn(b, hkv, keys, d).half() for _ in range(2)]
        slot = torch.tensor(slots[0])
        mask = torch.zeros(b, keys, dtype=torch.bool)
        mask[:, : slots[0] + 1] = True
        mask[0, :1] = slots[0] == 0  # a padded first key
        want_caches = [c.float() for c in caches]
        want = decode_attention_rope_reference(qkv.float(), cos.float(), sin.float(), *want_caches, slot.clone(), mask,
                                               d ** -0.5, h)
        got, absmax = ta.decode_attention_rope(qkv, cos, sin, *caches, slot, mask, d ** -0.5, h, splits=splits)
        err = ((got.float() - want).norm() / want.norm()).item()
        assert err < 2e-3, ("rope", b, h, hkv, d, keys, slots, splits, err)
        # each head group's largest |output| as stored: what the o_proj GEMV quantizes by
        assert torch.equal(absmax, group_absmax(got, hkv)), ("rope absmax", b, h, hkv, splits)
        for cache, want_cache in zip(caches, want_caches):  # the new key and value, and nothing else, written
            torch.testing.assert_close(cache.float(), want_cache, rtol=2e-3, atol=2e-3)
        assert int(slot) == slots[0]  # read, not advanced: the caller advances it
    print("interpreter ok")
""")


@pytest.mark.slow
def test_triton_decode_attention_matches_reference_in_the_interpreter():
    """The kernel's indexing, masking, block skipping and split-KV combination, run by triton's CPU
    interpreter in float16 (its bfloat16 matrix products are wrong; the GPU benchmark checks bfloat16)."""
    run_in_triton_interpreter(INTERPRETER_CHECK)


@pytest.mark.parametrize("rope", [False, True], ids=["", "rope"])
@pytest.mark.parametrize("split", [False, True])
def test_decode_attention_compiles_for_hopper_and_waits_before_it_reads(split, rope):
    """Compiled for sm_90 without a GPU: bf16 tensor-core products, and under programmatic dependent
    launch no load or store before ``griddepcontrol.wait`` (with ROPE too: the new key's store, and the
    output's absmax, which the rotary kernel writes)."""
    pytest.importorskip("triton")
    from test_kernels import _ptx_for_hopper

    from bitconvert.kernels import triton_attention as ta

    constants = dict(G=5, GP=16, D=128, DP=128, BN=64, HAS_MASK=True, SKIP=split, SP=8 if split else 1, ROPE=rope,
                     AMAX=rope, PDL=True)
    types = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", mask_ptr="*u8", out_ptr="*bf16", part_ptr="*fp32",
                 cnt_ptr="*i32", amax_ptr="*fp32", scale_log2="fp32", cos_ptr="*bf16", sin_ptr="*bf16",
                 slot_ptr="*i64")
    lines = _ptx_for_hopper(ta._decode_attention_kernel, constants, types).splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    assert not [line for line in lines[:wait] if any(op in line for op in ("ld.global", "st.global", "atom."))]
    assert any("mma" in line for line in lines)


def test_decode_attention_compiles_as_one_opaque_operator():
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    g = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(s, generator=g) for s in ((2, 6, 1, 16), (2, 2, 11, 16), (2, 2, 11, 16)))
    mask = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    mask[1, ..., :4] = False

    def attend(q, k, v, m):
        return decode_attention_forward(module, q, k, v, m, scaling=0.25)[0]

    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(query, key, value, mask), attend(query, key, value, mask))


def _static_decode(model, ids, steps=4, forward=None):
    """Greedy decode over transformers' StaticCache with bitconvert's decode attention: the logits of each step."""
    from transformers import StaticCache

    from bitconvert.layers.attention import cache_keyword, decode_attention

    forward = model if forward is None else forward
    keyword = cache_keyword(model.forward)  # `cache` from transformers 5.24, `past_key_values` before
    mask = torch.ones(ids.shape[0], ids.shape[1] + steps, dtype=torch.long)
    mask[0, :2] = 0  # left padding: positions differ between the rows
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps)
    logits = []
    with torch.no_grad(), decode_attention(model):
        out = model(input_ids=ids, attention_mask=mask[:, :ids.shape[1]], use_cache=True, **{keyword: cache})
        token = out.logits[:, -1:].argmax(-1)
        for step in range(steps):
            length = ids.shape[1] + step + 1
            logits.append(forward(input_ids=token, attention_mask=mask[:, :length], use_cache=True,
                                  **{keyword: cache}).logits)
            token = logits[-1][:, -1:].argmax(-1)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rope_attention_decodes_the_same_over_a_static_cache(tmp_path, tiny_tokenizer, arch):
    """The fused decode step (rotary embedding and cache write in the attention operator) gives the logits and
    the cache contents of transformers' own forward; prompts and caches that are not static take that forward."""
    from test_fused import packed_model

    from bitconvert.layers.attention import fuse_rope_attention, unfuse_rope_attention
    from bitconvert.layers.decoder import fuse_decoder_layers
    from bitconvert.layers.fused import fuse_projections

    model = packed_model(tmp_path, tiny_tokenizer, arch)
    fuse_projections(model)
    fuse_decoder_layers(model)
    ids = torch.randint(0, 320, (2, 6), generator=torch.Generator().manual_seed(4))
    want, want_cache = _static_decode(model, ids)
    with torch.no_grad():
        want_dynamic = model.generate(ids, max_new_tokens=4, do_sample=False)
    names = fuse_rope_attention(model)
    assert len(names) == model.config.num_hidden_layers and type(model.model.layers[0].self_attn).__name__.startswith("Rope")
    assert fuse_rope_attention(model) == []  # already done
    got, got_cache = _static_decode(model, ids)
    assert torch.equal(got, want)
    for theirs, ours in zip(want_cache.layers, got_cache.layers):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        assert int(ours.cumulative_length) == int(theirs.cumulative_length) == 10
    with torch.no_grad():  # a dynamic cache: transformers' forward
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), want_dynamic)
    assert unfuse_rope_attention(model) == model.config.num_hidden_layers
    assert not hasattr(type(model.model.layers[0].self_attn), "_bitconvert_rope_original")


def test_rope_attention_is_left_out_where_it_would_not_run(tmp_path, tiny_tokenizer, monkeypatch):
    from test_fused import packed_model

    from bitconvert.layers import attention
    from bitconvert.layers.fused import fuse_projections

    model = packed_model(tmp_path, tiny_tokenizer, "mistral")
    assert attention.fuse_rope_attention(model) == []  # q/k/v not one product
    fuse_projections(model)
    # Mistral's sliding window gives its static cache sliding layers, which the operator does not write
    assert attention.fuse_rope_attention(model) == []
    llama = packed_model(tmp_path / "llama", tiny_tokenizer, "llama")
    fuse_projections(llama)
    original = attention.decode_attention_rope_op

    def rotates_the_other_way(qkv, cos, sin, *rest):
        return original(qkv, cos, -sin, *rest)

    monkeypatch.setattr(attention, "decode_attention_rope_op", rotates_the_other_way)
    assert attention.fuse_rope_attention(llama) == []  # its logits would change: put back
    assert not hasattr(type(llama.model.layers[0].self_attn), "_bitconvert_rope_original")


def test_rope_attention_advances_every_position_in_one_operation(tmp_path, tiny_tokenizer):
    """The fused layers leave their positions to the decoder stack, which advances them together when it returns:
    one foreach add in the traced step, no add per layer; unfusing takes the hooks away again. In the same graph
    every o_proj gets the attention kernel's maxima."""
    from test_fused import packed_model

    from bitconvert.layers.attention import fuse_rope_attention, unfuse_rope_attention
    from bitconvert.layers.fused import fuse_projections

    model = packed_model(tmp_path, tiny_tokenizer)
    fuse_projections(model)
    ids = torch.randint(0, 320, (2, 6), generator=torch.Generator().manual_seed(6))
    want, _ = _static_decode(model, ids)
    assert fuse_rope_attention(model)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    got, cache = _static_decode(model, ids, forward=torch.compile(model, backend=record, fullgraph=True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(int(layer.cumulative_length) == 10 for layer in cache.layers)
    calls = [str(node.target) for node in graphs[-1].graph.nodes if node.op in ("call_function", "call_method")]
    assert sum("_foreach_add_" in c for c in calls) == 1
    assert not any(c in ("add_", "<built-in method add_ of type object>") for c in calls)
    products = [node for node in graphs[-1].graph.nodes if "ternary_linear" in str(node.target)]
    given = [node for node in products if node.kwargs.get("absmax_parts", node.args[8] if len(node.args) > 8 else None)
             is not None]
    assert len(given) == model.config.num_hidden_layers  # each o_proj takes the attention kernel's maxima
    assert model.model._forward_hooks and model.model._forward_pre_hooks
    unfuse_rope_attention(model)
    assert not model.model._forward_hooks and not model.model._forward_pre_hooks
    torch._dynamo.reset()


def test_rope_attention_hands_o_proj_the_absmax_of_its_input(tmp_path, tiny_tokenizer, monkeypatch):
    """Every fused decode step gives its o_proj the attention output's maxima per head group, whose maximum per
    token is that token's absmax (what the GPU's GEMV quantizes by); the switch turns it off."""
    from test_fused import packed_model

    import bitconvert.layers.packed as packed_layers
    from bitconvert.layers import attention
    from bitconvert.layers.fused import fuse_projections

    model = packed_model(tmp_path, tiny_tokenizer)
    fuse_projections(model)
    assert attention.fuse_rope_attention(model)
    seen = []
    original = packed_layers.ternary_linear

    def recording(x, *args, absmax_parts=None, **kwargs):
        if absmax_parts is not None:
            seen.append((x.abs().amax(-1).float().reshape(-1), absmax_parts.amax(-1).reshape(-1)))
        return original(x, *args, absmax_parts=absmax_parts, **kwargs)

    monkeypatch.setattr(packed_layers, "ternary_linear", recording)
    ids = torch.randint(0, 320, (2, 6), generator=torch.Generator().manual_seed(7))
    _static_decode(model, ids, steps=2)
    assert len(seen) == 2 * model.config.num_hidden_layers  # two decode steps, one o_proj a layer
    assert all(torch.equal(want, got) for want, got in seen)
    seen.clear()
    monkeypatch.setattr(attention, "HAND_OVER_ABSMAX", False)
    _static_decode(model, ids, steps=2)
    assert not seen


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_rope_attention_compiles_as_one_graph(tmp_path, tiny_tokenizer, backend):
    """fullgraph: the operator mutates the caches in place (no copies); under inductor the cache position is
    advanced outside it, where an operator that advanced it made inductor rotate later layers at the new one."""
    from test_fused import packed_model

    from bitconvert.layers.attention import fuse_rope_attention
    from bitconvert.layers.fused import fuse_projections

    model = packed_model(tmp_path, tiny_tokenizer, spec=QuantSpec(weight_scale="channel"))
    fuse_projections(model)
    ids = torch.randint(0, 320, (2, 6), generator=torch.Generator().manual_seed(5))
    want, _ = _static_decode(model, ids)
    assert fuse_rope_attention(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    got, _ = _static_decode(model, ids, forward=compiled)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
