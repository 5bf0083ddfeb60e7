"""The learned fit (``ternary_fit: learned``): LSQ's gradient, TWN's start, and an export of the trained step."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader, quants

from bitconvert.convert import convert_to_bitnet
from bitconvert.export.card import render_card
from bitconvert.export.gguf import export_gguf, ternary_weights
from bitconvert.export.packed import export_ternary, load_ternary, read_manifest
from bitconvert.layers import BitExperts, BitLinear
from bitconvert.quant import (
    QuantSpec,
    fake_quantize_weight,
    learned_step_ste,
    quantize_weight,
    ternary_codes_at,
    ternary_quantize,
)
from conftest import build_tiny_model

LEARNED = QuantSpec(weight_scale="channel", ternary_fit="learned")


def lsq_reference(weight, step, upstream):
    """LSQ (Esser et al. 2019) with levels {-1, 0, 1}, written out: the value and d loss / d step per row."""
    u = weight / step[:, None]
    codes = u.round().clamp(-1, 1)
    inside = u.abs() <= 1
    d_step = (upstream * torch.where(inside, codes - u, codes)).sum(dim=1)
    return codes * step[:, None], d_step


@pytest.mark.parametrize("strength", [1.0, 0.25])
def test_learned_step_gets_lsqs_gradient_and_the_weight_a_straight_through_one(strength):
    torch.manual_seed(0)
    weight = torch.randn(6, 16, requires_grad=True)
    log_step = torch.randn(6).mul(0.3).requires_grad_()
    upstream = torch.randn(6, 16)
    out = learned_step_ste(weight, log_step, torch.tensor(strength), "channel", 16)
    (out * upstream).sum().backward()

    step = log_step.detach().exp()
    value, d_step = lsq_reference(weight.detach(), step, upstream)
    torch.testing.assert_close(out.detach(), weight.detach() + strength * (value - weight.detach()))
    torch.testing.assert_close(weight.grad, upstream)  # straight through, everywhere
    torch.testing.assert_close(log_step.grad, strength * d_step * step)  # chain rule through exp


def test_groups_share_one_step_and_codes_match_the_export():
    torch.manual_seed(1)
    weight = torch.randn(4, 32)
    log_step = torch.randn(4, 4).mul(0.2)
    out = learned_step_ste(weight, log_step, 1.0, "group", 8)
    inv = (-log_step).exp()
    codes = ternary_codes_at(weight, inv, "group", 8)
    torch.testing.assert_close(out, codes.float() / inv.repeat_interleave(8, dim=-1))


def test_the_learned_fit_has_no_closed_form():
    with pytest.raises(ValueError, match="trained parameter"):
        quantize_weight(torch.randn(4, 8), LEARNED)
    with pytest.raises(ValueError, match="trained parameter"):
        fake_quantize_weight(torch.randn(4, 8), LEARNED)
    with pytest.raises(ValueError, match="ternary_fit"):
        QuantSpec(variant="bitnet1", ternary_fit="learned")


def converted(spec=LEARNED, arch="llama", seed=0):
    model = build_tiny_model(arch, 320, seed=seed)
    convert_to_bitnet(model, spec)
    return model.eval()


def nudge_steps(model, seed=3):
    """Move every learned step off TWN's, as training would, so that an export that refits would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_log_step"):
                param.add_(torch.rand(param.shape, generator=generator) * 0.6 - 0.3)


def test_conversion_starts_at_twns_step():
    model = converted(QuantSpec(weight_scale="group", group_size=32, ternary_fit="learned"))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, BitLinear) and layer.weight_log_step.dtype == torch.float32
    assert layer.weight_log_step.shape == (layer.out_features, layer.in_features // 32)
    _, twn_inv = ternary_quantize(layer.weight, "group", 32, "twn")
    torch.testing.assert_close(layer.ternary()[1], twn_inv)


@pytest.mark.parametrize("spec", [QuantSpec(ternary_fit="learned"), LEARNED,
                                  QuantSpec(weight_scale="group", group_size=32, ternary_fit="learned")],
                         ids=["tensor", "channel", "group32"])
def test_export_holds_the_trained_step_and_reloads_with_the_same_logits(tmp_path, tiny_tokenizer, spec):
    model = converted(spec)
    nudge_steps(model)
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
    export_ternary(model, tiny_tokenizer, tmp_path, spec, dtype=torch.float32)
    manifest = read_manifest(tmp_path)
    # one step per tensor is the layout of transformers' bitnet format, whatever fitted it
    assert manifest["transformers_compatible"] == (spec.weight_scale == "tensor")
    assert "trained alongside the weights" in render_card(manifest)
    loaded, _ = load_ternary(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-4, atol=1e-4)
    if spec.weight_scale == "tensor":
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_gguf_holds_the_trained_step(tmp_path, tiny_tokenizer):
    model = converted(LEARNED)
    nudge_steps(model)
    export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "tq2_0")  # rows of 128: the exact Q8_0 fallback
    layer = model.model.layers[0].mlp.down_proj
    weights, _ = ternary_weights(model)
    codes, step = weights["model.layers.0.mlp.down_proj.weight"].codes_and_step()
    assert np.array_equal(codes, layer.ternary()[0].numpy())
    np.testing.assert_allclose(step[:, 0], layer.weight_log_step.detach().exp().numpy(), rtol=1e-6)
    tensor = next(t for t in GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.0.ffn_down.weight")
    stored = quants.dequantize(tensor.data, tensor.tensor_type).reshape(codes.shape)
    assert np.array_equal(stored, weights["model.layers.0.mlp.down_proj.weight"].values())


def test_experts_train_and_export_their_steps(tmp_path, tiny_tokenizer):
    model = converted(LEARNED, arch="mixtral")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, BitExperts) and experts.down_proj_log_step.shape == experts.down_proj.shape[:-1]
    model.train()
    ids = torch.randint(0, 320, (2, 16))
    model(ids, labels=ids).loss.backward()
    assert experts.gate_up_proj_log_step.grad.abs().sum() > 0
    nudge_steps(model)
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    export_ternary(model, tiny_tokenizer, tmp_path, LEARNED, dtype=torch.float32)
    loaded, _ = load_ternary(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
