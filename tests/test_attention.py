"""Decode attention: one query token per sequence, keys and values read once per key/value head."""

import textwrap
from types import SimpleNamespace

import pytest
import torch

from bitconvert.kernels.attention import decode_attention, decode_attention_reference
from bitconvert.layers.attention import DECODE_ATTENTION, decode_attention_forward, use_decode_attention
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
    print("interpreter ok")
""")


@pytest.mark.slow
def test_triton_decode_attention_matches_reference_in_the_interpreter():
    """The kernel's indexing, masking, block skipping and split-KV combination, run by triton's CPU
    interpreter in float16 (its bfloat16 matrix products are wrong; the GPU benchmark checks bfloat16)."""
    run_in_triton_interpreter(INTERPRETER_CHECK)


@pytest.mark.parametrize("split", [False, True])
def test_decode_attention_compiles_for_hopper_and_waits_before_it_reads(split):
    """Compiled for sm_90 without a GPU: bf16 tensor-core products, and under programmatic dependent
    launch no load or store before ``griddepcontrol.wait``."""
    pytest.importorskip("triton")
    from test_kernels import _ptx_for_hopper

    from bitconvert.kernels import triton_attention as ta

    constants = dict(G=5, GP=16, D=128, DP=128, BN=64, HAS_MASK=True, SKIP=split, SP=8 if split else 1, PDL=True)
    types = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", mask_ptr="*u8", out_ptr="*bf16", part_ptr="*fp32",
                 cnt_ptr="*i32", scale_log2="fp32")
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
