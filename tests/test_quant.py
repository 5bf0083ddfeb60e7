"""Quantizer math against slow obvious references; packing against transformers' own packer."""

import itertools

import pytest
import torch
from conftest import scale_blocks

from bitconvert.quant import (
    QuantSpec,
    binary_dequantize,
    binary_fake_quantize,
    binary_quantize,
    dequantize_weight,
    fake_quantize_weight,
    int8_absmax_quantize,
    int8_fake_quantize,
    pack_binary,
    pack_ternary,
    quantize_weight,
    straight_through,
    ternary_dequantize,
    ternary_fake_quantize,
    ternary_quantize,
    unpack_binary,
    unpack_ternary,
)


def reference_ternary(w: torch.Tensor, granularity: str, group: int):
    """Element by element: scale = mean |w| over the block, code = clamp(round(w / scale), -1, 1)."""
    codes = torch.zeros_like(w, dtype=torch.int8)
    blocks = scale_blocks(w.shape, granularity, group)
    scales = []
    for block in blocks:
        mean = max(sum(abs(float(w[r, c])) for r, c in block) / len(block), 1e-5)
        scales.append(1.0 / mean)
        for r, c in block:
            codes[r, c] = int(max(-1, min(1, round(float(w[r, c]) * (1.0 / mean)))))
    return codes, torch.tensor(scales)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_ternary_matches_reference(granularity):
    torch.manual_seed(0)
    w = torch.randn(8, 32) * torch.rand(8, 1)
    codes, inv = ternary_quantize(w, granularity, group_size=8)
    ref_codes, ref_inv = reference_ternary(w, granularity, 8)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(inv.flatten(), ref_inv.float(), rtol=1e-6, atol=0)
    assert inv.shape == {"tensor": (1,), "channel": (8,), "group": (8, 4)}[granularity]
    fake = ternary_fake_quantize(w, granularity, 8)
    torch.testing.assert_close(fake, ternary_dequantize(codes, inv, granularity, 8))


def reference_twn(w: torch.Tensor, granularity: str, group: int):
    """Element by element: zero under 0.7 mean |w| of the block, scale = mean |w| of the rest."""
    codes = torch.zeros_like(w, dtype=torch.int8)
    scales = []
    for block in scale_blocks(w.shape, granularity, group):
        threshold = 0.7 * sum(abs(float(w[r, c])) for r, c in block) / len(block)
        kept = [(r, c) for r, c in block if abs(float(w[r, c])) > threshold]
        scales.append(1.0 / max(sum(abs(float(w[r, c])) for r, c in kept) / len(kept), 1e-5))
        for r, c in kept:
            codes[r, c] = 1 if float(w[r, c]) > 0 else -1
    return codes, torch.tensor(scales)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_twn_fit_matches_reference_and_beats_absmean(granularity):
    torch.manual_seed(3)
    w = torch.randn(8, 32) * torch.rand(8, 1)
    codes, inv = ternary_quantize(w, granularity, 8, fit="twn")
    ref_codes, ref_inv = reference_twn(w, granularity, 8)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(inv.flatten(), ref_inv.float(), rtol=1e-5, atol=0)
    fake = ternary_fake_quantize(w, granularity, 8, fit="twn")
    torch.testing.assert_close(fake, ternary_dequantize(codes, inv, granularity, 8))
    absmean = ternary_fake_quantize(w, granularity, 8)
    assert (fake - w).pow(2).sum() < (absmean - w).pow(2).sum()
    # the scale is the least-squares one for its codes: no other step does better
    for factor in (0.95, 1.05):
        assert (fake - w).pow(2).sum() <= (fake * factor - w).pow(2).sum()


def test_twn_fit_of_an_all_zero_block_is_zero_with_a_finite_scale():
    codes, inv = ternary_quantize(torch.zeros(4, 8), "channel", fit="twn")
    assert not codes.any() and torch.isfinite(inv).all()
    assert not ternary_fake_quantize(torch.zeros(4, 8), "channel", fit="twn").any()


def test_ternary_fit_is_for_b158_only():
    with pytest.raises(ValueError, match="ternary_fit"):
        QuantSpec(variant="bitnet1", ternary_fit="twn")


SPECS = [QuantSpec(variant=v, weight_scale=ws, group_size=8, ternary_fit=fit)
         for v, fit in (("b1.58", "absmean"), ("b1.58", "twn"), ("bitnet1", "absmean"))
         for ws in ("tensor", "channel", "group")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.variant}-{s.weight_scale}-{s.ternary_fit}")
def test_spec_level_weight_quantizer_is_the_low_level_one(spec):
    torch.manual_seed(4)
    w = (torch.randn(8, 32) * torch.rand(8, 1)).to(torch.bfloat16)
    args = (spec.weight_scale, spec.group_size)
    if spec.variant == "bitnet1":
        codes, inv = binary_quantize(w, *args)
        fake = binary_fake_quantize(w, *args)
        dequant = binary_dequantize(codes, inv, *args, torch.bfloat16)
    else:
        codes, inv = ternary_quantize(w, *args, spec.ternary_fit)
        fake = ternary_fake_quantize(w, *args, spec.ternary_fit)
        dequant = ternary_dequantize(codes, inv, *args, torch.bfloat16)
    got_codes, got_inv = quantize_weight(w, spec)
    assert torch.equal(got_codes, codes) and torch.equal(got_inv, inv)
    assert torch.equal(fake_quantize_weight(w, spec), fake)
    assert torch.equal(dequantize_weight(codes, inv, spec, torch.bfloat16), dequant)


def test_spec_level_weight_quantizer_refuses_onebit():
    with pytest.raises(ValueError, match="onebit"):
        quantize_weight(torch.randn(8, 32), QuantSpec(variant="onebit"))


def test_ternary_leading_dims_quantize_each_matrix_alone():
    torch.manual_seed(1)
    experts = torch.randn(3, 8, 16) * torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1)
    codes, inv = ternary_quantize(experts, "tensor")
    for e in range(3):
        c, i = ternary_quantize(experts[e], "tensor")
        assert torch.equal(codes[e], c) and torch.allclose(inv[e], i)


def test_int8_absmax_matches_reference():
    torch.manual_seed(2)
    x = torch.randn(3, 5, 16) * 4
    codes, inv = int8_absmax_quantize(x)
    for idx in itertools.product(range(3), range(5)):
        scale = 127 / max(float(x[idx].abs().max()), 1e-5)
        expected = torch.tensor([max(-128, min(127, round(float(v) * scale))) for v in x[idx]], dtype=torch.int8)
        assert torch.equal(codes[idx], expected)
        assert abs(float(inv[idx][0]) - scale) < 1e-3
    assert codes.abs().max() == 127  # the absmax element of every token maps to +-127
    torch.testing.assert_close(int8_fake_quantize(x), codes.float() / inv)


def test_zero_inputs_do_not_divide_by_zero():
    codes, inv = ternary_quantize(torch.zeros(4, 8), "channel")
    assert torch.isfinite(inv).all() and (codes == 0).all()
    assert torch.isfinite(int8_fake_quantize(torch.zeros(2, 8))).all()


def test_straight_through_blends_forward_and_passes_gradient():
    x = torch.randn(6, requires_grad=True)
    q = x.detach().round()
    y = straight_through(x, q, 0.25)
    torch.testing.assert_close(y, x + 0.25 * (q - x))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(6))
    assert torch.equal(straight_through(x, q, 0.0), x)


def test_pack_ternary_round_trip_and_matches_transformers_packer():
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    torch.manual_seed(3)
    codes = torch.randint(-1, 2, (16, 24), dtype=torch.int8)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 24)
    assert torch.equal(unpack_ternary(packed), codes)
    assert torch.equal(packed, pack_weights(codes.clone().float()))  # the second reader: transformers' own layout
    assert torch.equal(unpack_weights(packed, dtype=torch.float32), codes.float())
    experts = torch.randint(-1, 2, (3, 8, 4), dtype=torch.int8)
    assert torch.equal(unpack_ternary(pack_ternary(experts)), experts)


def test_pack_ternary_rejects_rows_not_multiple_of_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        pack_ternary(torch.zeros(6, 4, dtype=torch.int8))


def test_pack_binary_round_trip():
    codes = torch.where(torch.rand(5, 32) > 0.5, 1, -1).to(torch.int8)
    packed = pack_binary(codes)
    assert packed.shape == (5, 4)
    assert torch.equal(unpack_binary(packed), codes)
