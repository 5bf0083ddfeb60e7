"""Fused projections: q/k/v and gate/up of a packed model as one product each, same numbers."""

import pytest
import torch

from bitconvert.convert import convert_to_bitnet
from bitconvert.export.packed import export_ternary, load_ternary
from bitconvert.layers import PackedBitLinear
from bitconvert.layers.fused import FusedSwiGLU, ProjectionView, fuse_projections
from bitconvert.quant import QuantSpec
from conftest import build_tiny_model


def packed_model(tmp_path, tokenizer, arch="llama", spec=QuantSpec()):
    model = build_tiny_model(arch, 320)
    convert_to_bitnet(model, spec)
    export_ternary(model, tokenizer, tmp_path, spec, dtype=torch.float32)
    return load_ternary(tmp_path)[0]


# Architectures and scale kinds a fused packed model must decode exactly as the unfused one does.
PACKED_CASES = pytest.mark.parametrize(
    "arch,spec", [("llama", QuantSpec()), ("qwen2", QuantSpec(weight_scale="channel")),
                  ("mistral", QuantSpec(weight_scale="group", group_size=32))],
    ids=["llama-tensor", "qwen2-bias-channel", "mistral-group"])


@torch.no_grad()
def logits_and_tokens(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of ``ids`` and six greedy tokens after its first row."""
    return model(ids).logits, model.generate(ids[:1], max_new_tokens=6, do_sample=False)


@PACKED_CASES
def test_fused_model_gives_the_same_logits_and_generation(tmp_path, tiny_tokenizer, arch, spec):
    model = packed_model(tmp_path, tiny_tokenizer, arch, spec)
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(1))
    want, want_tokens = logits_and_tokens(model, ids)
    fused = fuse_projections(model)
    assert len(fused) == 2 * model.config.num_hidden_layers
    assert sum(name.endswith("+swiglu") for name in fused) == model.config.num_hidden_layers
    assert isinstance(model.model.layers[0].mlp, FusedSwiGLU)  # silu(gate) * up inside the gate/up product
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, ProjectionView) and isinstance(attn.q_k_v_fused.fused, PackedBitLinear)
    assert attn.q_k_v_fused.fused.out_features == sum(attn.get_submodule(n).out_features for n in ("q_proj", "k_proj", "v_proj"))
    assert fuse_projections(model) == []  # already fused
    got, got_tokens = logits_and_tokens(model, ids)
    assert torch.equal(got, want)  # integer sums per row, the same scale per row: identical
    assert torch.equal(got_tokens, want_tokens)
    assert attn.q_k_v_fused._last is None  # nothing kept between forward passes


def assert_compiles_as_one_graph(model):
    """``model`` compiles with fullgraph (aot_eager) and gives its eager logits."""
    ids = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)


def test_fused_model_compiles_as_one_graph(tmp_path, tiny_tokenizer):
    model = packed_model(tmp_path, tiny_tokenizer, spec=QuantSpec(weight_scale="channel"))
    fuse_projections(model)
    assert_compiles_as_one_graph(model)


def test_a_different_input_is_multiplied_afresh(tmp_path, tiny_tokenizer):
    model = packed_model(tmp_path, tiny_tokenizer)
    mlp = model.model.layers[0].mlp
    x, y = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        want_gate, want_up = mlp.gate_proj(x), mlp.up_proj(y)
        fuse_projections(model)
        assert torch.equal(mlp.gate_proj(x), want_gate) and torch.equal(mlp.up_proj(y), want_up)
        x.mul_(2)  # an in-place change between two projections of "the same" tensor
        first = mlp.gate_proj(x)
        assert torch.equal(mlp.up_proj(x), PackedBitLinear.forward(mlp.gate_up_fused.fused, x)[..., 128:])
        assert first.shape == (3, 128)


def test_swiglu_fusion_can_be_left_out_and_needs_a_silu_mlp(tmp_path, tiny_tokenizer):
    model = packed_model(tmp_path, tiny_tokenizer)
    names = fuse_projections(model, swiglu=False)
    assert not any(name.endswith("+swiglu") for name in names)
    assert not isinstance(model.model.layers[0].mlp, FusedSwiGLU)

    other = packed_model(tmp_path / "gelu", tiny_tokenizer)
    for layer in other.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()  # not SwiGLU: gate and up are still fused, the MLP stays itself
    ids = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = other(ids).logits
        names = fuse_projections(other)
        assert len(names) == 2 * other.config.num_hidden_layers and not any(n.endswith("+swiglu") for n in names)
        torch.testing.assert_close(other(ids).logits, want)  # GELU of a split view may differ in the last bit


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_swiglu_product_is_silu_of_gate_times_up(granularity):
    from bitconvert.kernels import TernaryCache, ternary_linear, ternary_linear_op
    from bitconvert.quant import pack_ternary, ternary_quantize

    g = torch.Generator().manual_seed(4)
    codes, inv = ternary_quantize(torch.randn(64, 96, generator=g), granularity, 32)
    packed = pack_ternary(codes)
    x = torch.randn(3, 96, generator=g)
    full = ternary_linear(x, packed, inv, granularity=granularity, group_size=32)
    want = torch.nn.functional.silu(full[:, :32]) * full[:, 32:]
    for cache in (None, TernaryCache("int8")):
        got = ternary_linear(x, packed, inv, granularity=granularity, group_size=32, cache=cache, swiglu=True)
        assert torch.equal(got, want)
    assert torch.equal(ternary_linear_op(x, packed, inv, None, granularity, 32, True), want)
