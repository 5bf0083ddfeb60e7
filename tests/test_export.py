"""Packed export: round trip through plain transformers and through bitconvert's loader."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from bitconvert.convert import convert_to_bitnet
from bitconvert.export.packed import ExportError, export_ternary, load_ternary, read_manifest
from bitconvert.layers import PackedBitLinear
from bitconvert.quant import QuantSpec
from conftest import build_tiny_model


def converted(arch="llama", spec=QuantSpec(), seed=0):
    model = build_tiny_model(arch, 320, seed=seed)
    convert_to_bitnet(model, spec)
    return model.eval()


def test_per_tensor_export_loads_in_plain_transformers_with_same_logits(tmp_path, tiny_tokenizer):
    model = converted()
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
    export_ternary(model, tiny_tokenizer, tmp_path, QuantSpec(), dtype=torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert config["quantization_config"]["modules_to_not_convert"] == ["lm_head"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # transformers' own bitnet BitLinear
    assert type(plain.model.layers[0].mlp.up_proj).__module__ == "transformers.integrations.bitnet"
    with torch.no_grad():
        got = plain(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    ours, _ = load_ternary(tmp_path)
    assert isinstance(ours.model.layers[0].mlp.up_proj, PackedBitLinear)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_twn_fit_with_one_scale_per_tensor_still_loads_in_plain_transformers(tmp_path, tiny_tokenizer):
    """A TWN fit changes which codes and which scale, not the layout: transformers' bitnet format holds it."""
    spec = QuantSpec(ternary_fit="twn")
    model = converted(spec=spec)
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
    export_ternary(model, tiny_tokenizer, tmp_path, spec, dtype=torch.float32)
    assert read_manifest(tmp_path)["transformers_compatible"]
    from bitconvert.export.card import render_card

    assert "TWN scales" in render_card(read_manifest(tmp_path))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", [QuantSpec(weight_scale="channel"), QuantSpec(weight_scale="group", group_size=32),
                                  QuantSpec(subln="output"),
                                  QuantSpec(weight_scale="group", group_size=32, ternary_fit="twn")],
                         ids=["channel", "group", "subln", "twn"])
def test_finer_scales_round_trip_through_bitconvert_loader(tmp_path, tiny_tokenizer, spec):
    model = converted(spec=spec)
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
    export_ternary(model, tiny_tokenizer, tmp_path, spec, dtype=torch.float32)
    manifest = read_manifest(tmp_path)
    assert not manifest["transformers_compatible"]
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "bitconvert"
    ours, _ = load_ternary(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)
    # `import bitconvert` registers the method, so transformers' from_pretrained works too
    import bitconvert  # noqa: F401

    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, expected,
                                   rtol=1e-4, atol=1e-4)


def test_gpt2_export_reloads(tmp_path, tiny_tokenizer):
    model = converted("gpt2")
    ids = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        expected = model(ids).logits
    export_ternary(model, tiny_tokenizer, tmp_path, QuantSpec(), dtype=torch.float32)
    assert not read_manifest(tmp_path)["transformers_compatible"]  # transformers only converts nn.Linear
    ours, _ = load_ternary(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_export_is_small_and_tied_embeddings_stored_once(tmp_path, tiny_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM as Auto

    config = AutoConfig.for_model("llama", vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    model = Auto.from_config(config)
    convert_to_bitnet(model, QuantSpec())
    export_ternary(model, tiny_tokenizer, tmp_path, QuantSpec(), dtype=torch.bfloat16)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert packed.dtype == torch.uint8 and packed.shape == (128, 256)
    linear_params = 2 * (4 * 256 * 256 + 3 * 256 * 512)
    manifest = read_manifest(tmp_path)
    assert manifest["quantized_parameters"] == linear_params


def test_corrupt_or_unfinished_exports_are_refused(tmp_path, tiny_tokenizer):
    model = converted()
    export_ternary(model, tiny_tokenizer, tmp_path, QuantSpec(), dtype=torch.float32)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="corrupt or half-written"):
        load_ternary(tmp_path)
    (tmp_path / "bitconvert.json").unlink()
    with pytest.raises(ExportError, match="not a finished bitconvert export"):
        load_ternary(tmp_path)
