"""The 1-bit variants (BitNet ``bitnet1``, ``onebit``): math against slow references, packing round
trips, OneBit's SVID initialisation, and convert -> export -> reload on a tiny Llama."""

import json

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from bitconvert.convert import UnsupportedModuleError, convert_to_bitnet, quantized_modules, set_quant_strength
from bitconvert.export.card import render_card
from bitconvert.export.packed import export_ternary, load_ternary, read_manifest
from bitconvert.kernels import binary_linear, onebit_linear
from bitconvert.layers import BitLinear, PackedBitLinear
from bitconvert.quant import (
    QuantSpec,
    binary_dequantize,
    binary_fake_quantize,
    binary_quantize,
    int8_fake_quantize,
    onebit_dequantize,
    onebit_init,
    pack_binary,
    pack_weight,
    packed_weight_shape,
    rank1_nonnegative,
    unpack_binary,
    unpack_weight,
)
from conftest import build_tiny_model, scale_blocks


def reference_binary(w: torch.Tensor, granularity: str, group: int):
    """Element by element: centre = mean of the block, code = +1 if w > centre else -1, scale = mean |w|."""
    blocks = scale_blocks(w.shape, granularity, group)
    codes = torch.zeros_like(w, dtype=torch.int8)
    inv_scales = []
    for block in blocks:
        centre = sum(float(w[r, c]) for r, c in block) / len(block)
        beta = max(sum(abs(float(w[r, c])) for r, c in block) / len(block), 1e-5)
        inv_scales.append(1.0 / beta)
        for r, c in block:
            codes[r, c] = 1 if float(w[r, c]) > centre else -1
    return codes, torch.tensor(inv_scales)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_bitnet1_matches_reference(granularity):
    torch.manual_seed(0)
    w = torch.randn(8, 32) * torch.rand(8, 1) + 0.3  # an offset, so that centring on the mean matters
    codes, inv = binary_quantize(w, granularity, group_size=8)
    ref_codes, ref_inv = reference_binary(w, granularity, 8)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(inv.flatten(), ref_inv.float(), rtol=1e-6, atol=0)
    assert inv.shape == {"tensor": (1,), "channel": (8,), "group": (8, 4)}[granularity]
    torch.testing.assert_close(binary_fake_quantize(w, granularity, 8), binary_dequantize(codes, inv, granularity, 8))


def test_bitnet1_is_balanced_around_the_mean():
    w = torch.full((4, 8), 5.0)
    w[:, :4] += 1.0  # every weight positive: plain sign() would give all +1
    codes, inv = binary_quantize(w)
    assert (codes == 1).sum() == (codes == -1).sum() == 16
    torch.testing.assert_close(inv, torch.tensor([1 / 5.5]))


def test_rank1_matches_svd_reference():
    torch.manual_seed(0)
    m = torch.rand(24, 40) * torch.rand(24, 1) * torch.rand(1, 40) + 0.01 * torch.rand(24, 40)
    a, b = rank1_nonnegative(m)
    u, s, vh = torch.linalg.svd(m.double())
    reference = (s[0] * torch.outer(u[:, 0], vh[0])).float()
    torch.testing.assert_close(torch.outer(a, b), reference, rtol=1e-5, atol=1e-6)
    assert (a >= 0).all() and (b >= 0).all()
    torch.testing.assert_close(a.norm(), b.norm(), rtol=1e-5, atol=0)  # singular value split evenly


def test_onebit_init_is_svid_of_the_absolute_weight():
    torch.manual_seed(1)
    linear = nn.Linear(32, 16)
    layer = BitLinear.from_linear(linear, QuantSpec(variant="onebit"))
    w = linear.weight.detach()
    u, s, vh = torch.linalg.svd(w.abs().double())
    rank1 = (s[0] * torch.outer(u[:, 0], vh[0])).float()
    torch.testing.assert_close(torch.outer(layer.output_scale, layer.input_scale).detach(), rank1, rtol=1e-4, atol=1e-6)
    codes, g, h = onebit_init(w)
    assert torch.equal(codes, torch.where(w > 0, 1, -1).to(torch.int8))
    # W ≈ diag(h) sign(W) diag(g): as good as the rank-1 approximation of |W| itself
    approx = onebit_dequantize(codes, g, h)
    assert torch.allclose((approx - w).norm(), (rank1 - w.abs()).norm(), rtol=1e-4)
    assert (approx - w).norm() < w.norm()


@pytest.mark.parametrize("shape", [(5, 16), (3, 4, 24)])
def test_binary_pack_round_trip_and_layout(shape):
    torch.manual_seed(2)
    codes = torch.where(torch.rand(shape) > 0.5, 1, -1).to(torch.int8)
    packed = pack_binary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 8)
    assert torch.equal(unpack_binary(packed), codes)
    # bit i of byte j holds input 8j + i, least significant bit first, 1 meaning +1
    flat = codes.reshape(-1, shape[-1])
    byte = sum(int(flat[0, i] > 0) << i for i in range(8))
    assert packed.reshape(-1, shape[-1] // 8)[0, 0].item() == byte


def test_pack_weight_dispatches_on_variant():
    codes = torch.tensor([[1, -1, 0, 1, 1, -1, -1, 1]] * 4, dtype=torch.int8)
    assert pack_weight(codes, "b1.58").shape == packed_weight_shape(4, 8, "b1.58") == (1, 8)
    signs = torch.where(codes >= 0, 1, -1).to(torch.int8)
    assert pack_weight(signs, "onebit").shape == packed_weight_shape(4, 8, "onebit") == (4, 1)
    assert torch.equal(unpack_weight(pack_weight(signs, "bitnet1"), "bitnet1"), signs)
    assert torch.equal(unpack_weight(pack_weight(codes, "b1.58"), "b1.58"), codes)


def test_spec_validates_variant_combinations():
    assert QuantSpec(variant="bitnet1", weight_scale="group", group_size=64).bits_per_weight == 1
    with pytest.raises(ValidationError, match="does not apply to variant 'onebit'"):
        QuantSpec(variant="onebit", weight_scale="channel")
    with pytest.raises(ValidationError, match="b1.58"):
        QuantSpec(variant="bitnet2")


def test_kernels_match_dequantized_products():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 32)
    codes, inv = binary_quantize(torch.randn(16, 32), "channel")
    expected = int8_fake_quantize(x) @ binary_dequantize(codes, inv, "channel").t()
    torch.testing.assert_close(binary_linear(x, pack_binary(codes), inv, granularity="channel"), expected,
                               rtol=1e-5, atol=1e-5)
    signs, g, h = onebit_init(torch.randn(16, 32))
    expected = int8_fake_quantize(x * g) @ (signs.float() * h.unsqueeze(-1)).t()
    torch.testing.assert_close(onebit_linear(x, pack_binary(signs), g, h), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["bitnet1", "onebit"])
def test_quant_strength_zero_is_the_original_linear_and_gradients_reach_every_parameter(variant):
    torch.manual_seed(4)
    linear = nn.Linear(32, 16)
    layer = BitLinear.from_linear(nn.Linear(32, 16), QuantSpec(variant=variant))
    layer.load_state_dict(linear.state_dict(), strict=False)
    if variant == "onebit":
        layer.init_onebit()
    x = torch.randn(3, 32)
    layer.strength.value.fill_(0.0)
    torch.testing.assert_close(layer(x), linear(x))
    layer.strength.value.fill_(1.0)
    layer(x).pow(2).sum().backward()
    trainable = {n: p for n, p in layer.named_parameters()}
    assert set(trainable) >= ({"weight", "bias", "input_scale", "output_scale"} if variant == "onebit" else {"weight"})
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_packed_layer_backward_is_straight_through():
    torch.manual_seed(5)
    spec = QuantSpec(variant="onebit")
    qat = BitLinear.from_linear(nn.Linear(32, 16, bias=False), spec)
    packed = PackedBitLinear(32, 16, False, spec=spec)
    codes, scales = qat.quantized_codes()
    packed.weight.copy_(pack_binary(codes))
    for key, value in scales.items():
        getattr(packed, key).copy_(value)
    x = torch.randn(4, 32, requires_grad=True)
    grad_out = torch.randn(4, 16)
    packed(x).backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ packed.dequantized_weight(), rtol=1e-5, atol=1e-6)


def _converted(spec: QuantSpec, seed: int = 0):
    model = build_tiny_model("llama", 320, seed=seed)
    convert_to_bitnet(model, spec)
    # a little training-like perturbation, so that the OneBit vectors are not their initial values
    with torch.no_grad():
        for module in quantized_modules(model).values():
            if spec.variant == "onebit":
                module.input_scale.mul_(1 + 0.1 * torch.randn_like(module.input_scale))
    return model.eval()


SPECS = [QuantSpec(variant="bitnet1"), QuantSpec(variant="bitnet1", weight_scale="channel"),
         QuantSpec(variant="bitnet1", weight_scale="group", group_size=32), QuantSpec(variant="onebit"),
         QuantSpec(variant="onebit", subln="output")]


@pytest.mark.parametrize("spec", SPECS, ids=["bitnet1", "bitnet1-channel", "bitnet1-group", "onebit", "onebit-subln"])
def test_convert_export_reload_gives_the_same_logits(tmp_path, tiny_tokenizer, spec):
    model = _converted(spec)
    ids = torch.randint(0, 320, (2, 16))
    inputs: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args, output):
            inputs[name] = args[0]
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in quantized_modules(model).items()]
    with torch.no_grad():
        expected = model(ids).logits
    for hook in hooks:
        hook.remove()

    export_ternary(model, tiny_tokenizer, tmp_path, spec, dtype=torch.float32)
    manifest = read_manifest(tmp_path)
    assert manifest["spec"]["variant"] == spec.variant and not manifest["transformers_compatible"]
    assert manifest["quantized_parameters"] == sum(m.weight.numel() for m in quantized_modules(model).values())
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitconvert" and config["spec"]["variant"] == spec.variant
    assert "1 bit each" in render_card(manifest)

    ours, _ = load_ternary(tmp_path)
    up = ours.model.layers[0].mlp.up_proj
    assert isinstance(up, PackedBitLinear) and up.weight.shape == (128, 64 // 8)
    assert hasattr(up, "input_scale") == (spec.variant == "onebit")
    # every packed layer computes what its BitLinear computed, on the same input...
    with torch.no_grad():
        for name, x in inputs.items():
            torch.testing.assert_close(ours.get_submodule(name)(x), model.get_submodule(name)(x), rtol=1e-5, atol=1e-5)
        got = ours(ids).logits
    # ... and end to end the logits agree up to the odd int8 activation code that float rounding flips
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-3)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))

    import bitconvert  # noqa: F401  (registers quant_method bitconvert with transformers)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, got, rtol=1e-5, atol=1e-5)


def test_binary_export_is_half_the_size_of_ternary(tmp_path, tiny_tokenizer):
    sizes = {}
    for variant in ("b1.58", "bitnet1"):
        spec = QuantSpec(variant=variant)
        model = _converted(spec)
        export_ternary(model, tiny_tokenizer, tmp_path / variant, spec, dtype=torch.float32)
        from safetensors import safe_open

        with safe_open(tmp_path / variant / "model.safetensors", "pt") as f:
            sizes[variant] = sum(f.get_tensor(k).numel() for k in f.keys() if f.get_tensor(k).dtype == torch.uint8)
    assert sizes["bitnet1"] * 2 == sizes["b1.58"]


def test_one_bit_variants_refuse_what_they_cannot_pack():
    model = build_tiny_model("mixtral", 320)
    with pytest.raises(UnsupportedModuleError, match="only variant 'b1.58'"):
        convert_to_bitnet(model, QuantSpec(variant="bitnet1"))
    odd = nn.Module()
    odd.layers = nn.ModuleList([nn.Sequential(nn.Linear(12, 16)) for _ in range(2)])
    with pytest.raises(UnsupportedModuleError, match="multiple of 8"):
        convert_to_bitnet(odd, QuantSpec(variant="onebit"))


def test_onebit_qat_step_learns(tiny_tokenizer):
    model = _converted(QuantSpec(variant="onebit"))
    model.train()
    set_quant_strength(model, 1.0)
    ids = torch.randint(0, 320, (4, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
