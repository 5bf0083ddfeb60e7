"""Model surgery on tiny random models of every supported architecture."""

import pytest
import torch
from torch import nn

from bitconvert.convert import UnsupportedModuleError, convert_to_bitnet, plan_conversion, set_quant_strength
from bitconvert.layers import BitExperts, BitLinear
from bitconvert.quant import QuantSpec
from conftest import TINY_ARCHS, build_tiny_model

# converted modules per decoder block
EXPECTED_PER_LAYER = {"llama": 7, "qwen2": 7, "mistral": 7, "gemma": 7, "phi3": 4, "gpt2": 4, "mixtral": 5, "qwen2_moe": 8}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_architecture_converts_and_trains(arch):
    model = build_tiny_model(arch, 320)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    report = convert_to_bitnet(model, QuantSpec())
    assert len(report.converted) == 2 * EXPECTED_PER_LAYER[arch]
    assert not any("embed" in n or "lm_head" in n or "wte" in n for n in report.converted)
    assert isinstance(model.get_output_embeddings(), nn.Linear) and not isinstance(model.get_output_embeddings(), BitLinear)
    # strength 0 is the original model exactly: the surgery itself changes nothing
    set_quant_strength(model, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    set_quant_strength(model, 1.0)
    logits = model(ids).logits
    assert not torch.allclose(logits, before, atol=1e-3)
    logits.float().pow(2).mean().backward()
    quantized = [m for m in model.modules() if isinstance(m, (BitLinear, BitExperts))]
    assert all(p.grad is not None for m in quantized for p in m.parameters(recurse=False) if p.requires_grad)


def test_moe_routers_stay_full_precision():
    model = build_tiny_model("mixtral", 320)
    report = convert_to_bitnet(model, QuantSpec())
    assert report.kept_full_precision == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert isinstance(model.model.layers[0].mlp.experts, BitExperts)


def test_skip_list_keeps_layers_in_full_precision():
    model = build_tiny_model("llama", 320)
    report = convert_to_bitnet(model, QuantSpec(), skip=["mlp.down_proj", r"model\.layers\.1\.self_attn\..*"])
    assert "model.layers.0.mlp.down_proj" in report.skipped
    assert "model.layers.1.self_attn.q_proj" in report.skipped
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, BitLinear)
    assert len(report.converted) == 14 - 2 - 4


def test_unsupported_module_is_named_in_the_error():
    model = build_tiny_model("llama", 320)
    model.model.layers[1].mlp.conv = nn.Conv1d(4, 4, 3)
    with pytest.raises(UnsupportedModuleError, match=r"model\.layers\.1\.mlp\.conv \(Conv1d\).*convert\.skip"):
        plan_conversion(model)
    report = convert_to_bitnet(model, QuantSpec(), skip=["mlp.conv"])  # the skip list is the way out
    assert "model.layers.1.mlp.conv" in report.skipped


def test_output_dim_not_multiple_of_four_is_rejected():
    model = build_tiny_model("llama", 320)
    model.model.layers[0].self_attn.extra = nn.Linear(64, 6)
    with pytest.raises(UnsupportedModuleError, match="out_features=6"):
        plan_conversion(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_a_group_size_that_does_not_divide_the_inputs_fails_before_conversion(arch):
    model = build_tiny_model(arch, 320)
    group = 8 * 1009  # larger than any tiny layer's inputs, so it divides none of them
    with pytest.raises(UnsupportedModuleError, match=rf"group_size={group} does not divide.*weight_scale: channel"):
        plan_conversion(model, spec=QuantSpec(weight_scale="group", group_size=group))
    assert not any(isinstance(m, (BitLinear, BitExperts)) for m in model.modules())
    plan_conversion(model, spec=QuantSpec(weight_scale="group", group_size=8))  # one that divides every layer


def test_subln_output_adds_norm_only_before_output_projections():
    model = build_tiny_model("llama", 320)
    convert_to_bitnet(model, QuantSpec(subln="output"))
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.rms_norm is not None and layer.mlp.down_proj.rms_norm is not None
    assert layer.self_attn.q_proj.rms_norm is None and layer.mlp.up_proj.rms_norm is None


def test_gpt2_conv1d_becomes_linear_with_transposed_weight():
    model = build_tiny_model("gpt2", 320)
    conv = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 64)
    expected = conv(x)
    convert_to_bitnet(model, QuantSpec())
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, BitLinear) and layer.weight.shape == (192, 64) and layer.transposed_source
    set_quant_strength(model, 0.0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
