"""LoRA fine-tuning on a frozen packed export: data encoding, the packed LoRA layer, train -> save ->
reload, and the CLI."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from bitconvert.cli import main
from bitconvert.convert import convert_to_bitnet
from bitconvert.export.packed import export_ternary, load_ternary
from bitconvert.layers.lora import PackedLoraLinear, packed_target_modules
from bitconvert.quant import QuantSpec
from bitconvert.train.finetune import (
    IGNORE,
    FinetuneConfig,
    FinetuneDataError,
    encode_row,
    finetune,
    load_adapter,
    load_examples,
)
from conftest import build_tiny_model

CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")

ROWS = [{"prompt": "The river ran", "response": " past the old mill"},
        {"prompt": "Numbers such as", "response": " 12, 345 and 6789"},
        {"prompt": "A ternary weight takes", "response": " one of three values"}]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("export") / "tern"
    model = build_tiny_model("llama", len(tiny_tokenizer))
    spec = QuantSpec(weight_scale="channel")
    convert_to_bitnet(model, spec)
    export_ternary(model, tiny_tokenizer, path, spec, dtype=torch.float32)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


def _decoded_labels(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


def test_prompt_response_rows_put_the_loss_on_the_response_and_eos(tiny_tokenizer):
    example = encode_row(ROWS[0], tiny_tokenizer, template="plain")
    assert tiny_tokenizer.decode(example.input_ids).startswith("The river ran past the old mill")
    assert _decoded_labels(tiny_tokenizer, example) == " past the old mill</s>"
    assert example.labels[0] == IGNORE and example.labels[-1] == tiny_tokenizer.eos_token_id


def test_chat_rows_put_the_loss_on_every_assistant_turn_only(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = CHATML
    row = {"messages": [{"role": "user", "content": "The river"}, {"role": "assistant", "content": "ran past"},
                        {"role": "user", "content": "the old"}, {"role": "assistant", "content": "mill"}]}
    example = encode_row(row, tokenizer)
    learned = _decoded_labels(tokenizer, example)
    assert learned == "ran past</s>\nmill</s>\n"
    # auto template: prompt/response goes through the chat template when there is one
    pair = encode_row({"prompt": "The river", "response": "ran past"}, tokenizer)
    assert _decoded_labels(tokenizer, pair) == "ran past</s>\n"
    assert tokenizer.decode(pair.input_ids).startswith("<s>user\nThe river</s>\n<s>assistant\n")


def test_text_rows_learn_everything_and_bad_rows_name_their_line(tiny_tokenizer, tmp_path):
    example = encode_row({"text": "A ternary weight"}, tiny_tokenizer)
    assert all(label != IGNORE for label in example.labels if label != tiny_tokenizer.bos_token_id)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"question": "?"}) + "\n")
    with pytest.raises(FinetuneDataError, match=r"bad.jsonl:2.*'prompt' and 'response'"):
        load_examples(bad, tiny_tokenizer)
    with pytest.raises(FinetuneDataError, match="chat template"):
        encode_row({"messages": [{"role": "user", "content": "hi"}]}, tiny_tokenizer)


def test_packed_lora_layer_adds_the_low_rank_update(export_dir):
    from peft import LoraConfig, get_peft_model

    from bitconvert.layers.lora import register_packed_lora

    model, _ = load_ternary(export_dir)
    assert packed_target_modules(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    base = model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        before = base(x)
    peft_model = get_peft_model(model, register_packed_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj"])))
    layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, PackedLoraLinear) and layer.base_layer is base
    with torch.no_grad():
        torch.testing.assert_close(layer(x), before)  # B starts at zero
        layer.lora_B["default"].weight.normal_()
        expected = before + 2.0 * layer.lora_B["default"](layer.lora_A["default"](x))
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        layer.merge()


def test_finetune_trains_saves_and_reloads_identically(export_dir, data_file, tmp_path):
    packed_before = {k: v.clone() for k, v in load_ternary(export_dir)[0].state_dict().items()}
    out = tmp_path / "adapter"
    config = FinetuneConfig(steps=12, lr=1e-2, batch_size=3, warmup_steps=2, rank=4, dropout=0.0)
    result, trained = finetune(export_dir, data_file, out, config, device="cpu")
    assert result.steps == 12 and result.examples == 3
    assert result.losses[-1] < result.losses[0]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "finetune.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    # the packed weights were not touched
    base_state = {k.replace(".base_layer", ""): v for k, v in trained.get_base_model().state_dict().items()}
    packed = [k for k, v in packed_before.items() if v.dtype == torch.uint8 or k.endswith("weight_scale")]
    assert len(packed) == 2 * 14
    for key in packed:
        assert torch.equal(base_state[key], packed_before[key]), key

    ids = torch.randint(0, 320, (2, 10))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        reloaded = load_adapter(load_ternary(export_dir)[0], out)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
        # the same through peft's own entry point, given the registered config
        from peft import PeftConfig, PeftModel

        from bitconvert.layers.lora import register_packed_lora
        from bitconvert.sources import load_model

        config = register_packed_lora(PeftConfig.from_pretrained(str(out)))
        plain = PeftModel.from_pretrained(load_model(export_dir)[0], str(out), config=config)
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=0, atol=0)
        assert not torch.equal(load_ternary(export_dir)[0](input_ids=ids).logits, expected)  # the adapter matters


def test_cli_finetune_then_generate_with_adapter(export_dir, data_file, tmp_path):
    out = tmp_path / "cli-adapter"
    runner = CliRunner()
    result = runner.invoke(main, ["finetune", str(export_dir), "--data", str(data_file), "--out", str(out),
                                  "--steps", "2", "--rank", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "adapter saved to" in result.output and (out / "adapter_model.safetensors").is_file()
    result = runner.invoke(main, ["generate", str(export_dir), "The river", "--adapter", str(out),
                                  "--max-new-tokens", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    bad = runner.invoke(main, ["finetune", str(export_dir), "--data", str(data_file), "--out", str(out), "--rank", "0"])
    assert bad.exit_code != 0 and "rank" in bad.output


def test_finetune_on_a_mixture_of_depths_export_keeps_causal_routing(tmp_path, tiny_tokenizer, data_file):
    from bitconvert.mod import routed_blocks

    model = build_tiny_model("llama", len(tiny_tokenizer), seed=2)
    convert_to_bitnet(model, QuantSpec(), mixture_of_depths={"capacity": 0.25})
    export_ternary(model, tiny_tokenizer, tmp_path / "mod", QuantSpec(), dtype=torch.float32)
    result, trained = finetune(tmp_path / "mod", data_file, tmp_path / "adapter",
                               FinetuneConfig(steps=2, rank=2, batch_size=2), device="cpu")
    blocks = list(routed_blocks(trained).values())
    assert blocks and all(b.aux_loss is None for b in blocks)  # no top-k training routing happened
    reloaded = load_adapter(load_ternary(tmp_path / "mod")[0], tmp_path / "adapter")
    ids = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)
