"""Mixture-of-experts checkpoints (Mixtral, Qwen2-MoE in transformers 5: experts as 3-D tensors).

Conversion turns the experts into BitExperts and keeps the routers in full precision; QAT trains
through them; the packed export reloads (PackedExperts) with the converted model's logits.
"""

import pytest
import torch
from safetensors import safe_open
from torch import nn

from bitconvert.convert import convert_to_bitnet, quantized_modules, set_quant_strength
from bitconvert.export.packed import export_ternary, load_ternary, read_manifest
from bitconvert.layers import BitExperts, BitLinear, PackedBitLinear, PackedExperts
from bitconvert.quant import QuantSpec, ternary_fake_quantize, unpack_ternary
from conftest import build_tiny_model

MOE_ARCHS = ("mixtral", "qwen2_moe")
SPECS = [QuantSpec(), QuantSpec(weight_scale="channel"), QuantSpec(weight_scale="group", group_size=32)]
SPEC_IDS = ["tensor", "channel", "group32"]


def converted(arch: str, spec: QuantSpec = QuantSpec(), seed: int = 0):
    model = build_tiny_model(arch, 320, seed=seed)
    report = convert_to_bitnet(model, spec)
    return model, report


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """The routing linears of every MoE block: ``mlp.gate`` and Qwen's ``mlp.shared_expert_gate``."""
    return {name: m for name, m in model.named_modules() if name.endswith(("mlp.gate", "mlp.shared_expert_gate"))}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_experts_become_bitexperts_and_routers_stay_full_precision(arch):
    original = build_tiny_model(arch, 320)
    router_weights = {n: m.weight.detach().clone() for n, m in routers(original).items()}
    model, report = converted(arch)
    for layer in model.model.layers:
        assert isinstance(layer.mlp.experts, BitExperts)
        assert layer.mlp.experts.gate_up_proj.ndim == 3
        assert not isinstance(layer.mlp.gate, (BitLinear, BitExperts))
    found = routers(model)
    assert set(found) == set(router_weights) and found
    for name, module in found.items():
        assert name in report.kept_full_precision
        assert name not in report.converted
        assert not isinstance(module, (BitLinear, BitExperts))
        torch.testing.assert_close(module.weight, router_weights[name], rtol=0, atol=0)
    if arch == "qwen2_moe":  # the always-on shared expert is a plain MLP and is converted
        assert isinstance(model.model.layers[0].mlp.shared_expert.down_proj, BitLinear)
        assert isinstance(model.model.layers[0].mlp.shared_expert_gate, nn.Linear)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_bitexperts_forward_is_the_experts_forward_on_quantized_weights(arch):
    """Same routing, same experts; only weights (ternary) and activations (int8) are quantized."""
    model, _ = converted(arch)
    experts = model.model.layers[0].mlp.experts
    torch.manual_seed(1)
    tokens = torch.randn(10, experts.gate_up_proj.shape[-1])
    top_k_index = torch.stack([torch.randperm(experts.num_experts)[:2] for _ in range(10)])
    top_k_weights = torch.rand(10, 2).softmax(-1)
    set_quant_strength(model, 0.0)  # strength 0 = full precision: BitExperts must equal the plain experts
    reference = build_tiny_model(arch, 320).model.layers[0].mlp.experts
    with torch.no_grad():
        torch.testing.assert_close(experts(tokens, top_k_index, top_k_weights),
                                   reference(tokens, top_k_index, top_k_weights))
    set_quant_strength(model, 1.0)
    with torch.no_grad():
        quantized = experts(tokens, top_k_index, top_k_weights)
        for name in ("gate_up_proj", "down_proj"):
            getattr(reference, name).copy_(ternary_fake_quantize(getattr(experts, name)))
        # the reference sees ternary weights but float activations: close, not equal
        loose = reference(tokens, top_k_index, top_k_weights)
    assert not torch.equal(quantized, loose)
    assert torch.nn.functional.cosine_similarity(quantized.flatten(), loose.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_qat_step_trains_experts_and_routers(arch):
    model, _ = converted(arch)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 320, (2, 16))
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        experts = model.model.layers[0].mlp.experts
        for param in (experts.gate_up_proj, experts.down_proj, model.model.layers[0].mlp.gate.weight):
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "model.layers.0.mlp.experts.gate_up_proj" in changed
    assert "model.layers.0.mlp.gate.weight" in changed


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_packed_export_reloads_with_the_converted_logits(tmp_path, tiny_tokenizer, arch, spec):
    model, _ = converted(arch, spec)
    model.eval()
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
    export_ternary(model, tiny_tokenizer, tmp_path, spec, dtype=torch.float32)
    manifest = read_manifest(tmp_path)
    assert not manifest["transformers_compatible"]  # transformers' bitnet format has no 3-D experts
    kinds = {name: entry["kind"] for name, entry in manifest["modules"].items()}
    assert kinds["model.layers.0.mlp.experts"] == "experts"
    assert not any(name.endswith(("mlp.gate", "shared_expert_gate")) for name in kinds)

    loaded, _ = load_ternary(tmp_path)
    for layer in loaded.model.layers:
        assert isinstance(layer.mlp.experts, PackedExperts)
        assert not isinstance(layer.mlp.gate, (PackedBitLinear, PackedExperts))
        assert layer.mlp.gate.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)

    # The file holds packed experts (2 bits a weight) that unpack to the converted model's codes,
    # and full-precision routers.
    source = quantized_modules(model)["model.layers.0.mlp.experts"].ternary()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for proj, (codes, inv) in source.items():
            packed = f.get_tensor(f"model.layers.0.mlp.experts.{proj}")
            assert packed.dtype == torch.uint8 and packed.shape[-2] * 4 == codes.shape[-2]
            assert torch.equal(unpack_ternary(packed), codes)
            torch.testing.assert_close(f.get_tensor(f"model.layers.0.mlp.experts.{proj}_scale"), inv)
        router = f.get_tensor("model.layers.0.mlp.gate.weight")
        assert router.dtype == torch.float32
        torch.testing.assert_close(router, model.model.layers[0].mlp.gate.weight.detach(), rtol=0, atol=0)


def test_bf16_export_keeps_experts_exact(tmp_path, tiny_tokenizer):
    """The export dtype only touches full-precision tensors; ternary experts and scales stay exact."""
    model, _ = converted("mixtral", QuantSpec(weight_scale="channel"))
    export_ternary(model, tiny_tokenizer, tmp_path, QuantSpec(weight_scale="channel"))
    loaded, _ = load_ternary(tmp_path)
    codes, inv = model.model.layers[1].mlp.experts.ternary()["down_proj"]
    packed = loaded.model.layers[1].mlp.experts
    assert torch.equal(unpack_ternary(packed.down_proj), codes)
    assert torch.equal(packed.down_proj_scale, inv)
    assert loaded.model.layers[1].mlp.gate.weight.dtype == torch.float32  # loaded in float32 from bf16
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        expected, got = model.eval()(ids).logits, loaded(ids).logits
    assert (expected.argmax(-1) == got.argmax(-1)).float().mean() > 0.8
