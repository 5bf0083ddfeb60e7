"""Decoder layers whose norms quantize for the next product and whose products add the residual."""

import torch
from test_fused import PACKED_CASES, assert_compiles_as_one_graph, logits_and_tokens, packed_model

from bitconvert.kernels import (
    quantize_for_kernels,
    rms_norm_quantize,
    ternary_linear,
    ternary_linear_quantized,
)
from bitconvert.layers import decoder
from bitconvert.layers.decoder import (
    QuantizingRMSNorm,
    fuse_decoder_layers,
    unfuse_decoder_layers,
)
from bitconvert.layers.fused import fuse_projections
from bitconvert.quant import QuantSpec, pack_ternary


@PACKED_CASES
def test_fused_layers_give_the_same_logits_and_generation(tmp_path, tiny_tokenizer, arch, spec):
    model = packed_model(tmp_path, tiny_tokenizer, arch, spec)
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(1))
    want, want_tokens = logits_and_tokens(model, ids)
    keys = set(model.state_dict())
    fuse_projections(model)
    names = fuse_decoder_layers(model)
    assert len(names) == model.config.num_hidden_layers
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, QuantizingRMSNorm) and type(layer).__name__.startswith("Residual")
    assert fuse_decoder_layers(model) == []  # already done
    got, got_tokens = logits_and_tokens(model, ids)
    assert torch.equal(got, want)  # the same torch operations in the same order on CPU
    assert torch.equal(got_tokens, want_tokens)
    assert layer.self_attn.o_proj._residual is None and layer.self_attn.o_proj._given is None  # nothing kept
    assert {k for k in model.state_dict() if "norm" in k} == {k for k in keys if "norm" in k}
    norm = layer.input_layernorm.original
    assert unfuse_decoder_layers(model) == model.config.num_hidden_layers
    assert layer.input_layernorm is norm and not hasattr(type(layer), "_bitconvert_original")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_layers_stay_without_fused_projections(tmp_path, tiny_tokenizer):
    model = packed_model(tmp_path, tiny_tokenizer)
    assert fuse_decoder_layers(model) == []  # q/k/v not one product: nothing to hand the codes to
    assert not isinstance(model.model.layers[0].input_layernorm, QuantizingRMSNorm)


def test_a_layer_that_does_not_compute_the_same_is_put_back(tmp_path, tiny_tokenizer, monkeypatch):
    model = packed_model(tmp_path, tiny_tokenizer)
    fuse_projections(model)

    def wrong(self, hidden_states, **kwargs):  # forgets the attention's residual
        hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        decoder._down_proj(self.mlp).add_residual(hidden_states)
        return self.mlp(self.post_attention_layernorm(hidden_states))

    decoder._residual_class.cache_clear()
    monkeypatch.setattr(decoder, "_residual_forward", wrong)
    try:
        assert fuse_decoder_layers(model) == []
    finally:
        decoder._residual_class.cache_clear()
    layer = model.model.layers[0]
    assert not isinstance(layer.input_layernorm, QuantizingRMSNorm) and not hasattr(type(layer), "_bitconvert_original")


def test_fused_layers_compile_as_one_graph(tmp_path, tiny_tokenizer):
    model = packed_model(tmp_path, tiny_tokenizer, spec=QuantSpec(weight_scale="channel"))
    fuse_projections(model)
    assert fuse_decoder_layers(model)
    assert_compiles_as_one_graph(model)
    assert model.model.layers[0].self_attn.o_proj._residual is None


def test_norm_quantize_reference_is_transformers_rmsnorm_then_the_quantizer():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(48, eps=1e-5).to(torch.bfloat16)
    norm.weight.data.normal_()
    x = torch.randn(2, 3, 48, dtype=torch.bfloat16)
    normed, codes, inv, total = rms_norm_quantize(x, norm.weight.detach(), 1e-5)
    assert torch.equal(normed, norm(x).detach())
    want = quantize_for_kernels(normed)
    assert torch.equal(codes, want[0]) and torch.equal(inv, want[1]) and torch.equal(total, want[2])
    assert inv.shape == (2, 3) and total.dtype == torch.int32


def test_products_add_the_residual_and_take_given_activations():
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(-1, 2, (16, 32), generator=gen).to(torch.int8)
    packed, inv_w = pack_ternary(w), torch.rand(16, generator=gen) + 0.5
    x, residual = torch.randn(3, 32, generator=gen), torch.randn(3, 16, generator=gen)
    plain = ternary_linear(x, packed, inv_w, granularity="channel")
    assert torch.equal(ternary_linear(x, packed, inv_w, granularity="channel", residual=residual), residual + plain)
    given = ternary_linear_quantized(*quantize_for_kernels(x), packed, inv_w, granularity="channel",
                                     dtype=torch.float32, residual=residual)
    assert torch.equal(given, residual + plain)
    swiglu = ternary_linear_quantized(*quantize_for_kernels(x), packed, inv_w, granularity="channel",
                                      dtype=torch.float32, swiglu=True)
    assert torch.equal(swiglu, ternary_linear(x, packed, inv_w, granularity="channel", swiglu=True))
