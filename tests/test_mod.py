"""Mixture-of-Depths: token selection, routed blocks (training top-k, causal inference), decoding
with a KV cache, export -> reload of the routers, recipes, compute accounting and the benchmark."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitconvert.convert import convert_to_bitnet, find_decoder_layers
from bitconvert.export.packed import export_ternary, load_ternary, read_manifest
from bitconvert.mod import (
    MixtureOfDepthsError,
    MoDConfig,
    calibrate_decisions,
    capacity_schedule,
    chosen_tokens,
    forward_flops,
    install_mixture_of_depths,
    routed_blocks,
    set_mod_capacity,
    topk_tokens,
)
from bitconvert.quant import QuantSpec
from bitconvert.train.loop import auxiliary_loss
from conftest import CORPUS, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def routed_model(layers: int = 4, capacity: float = 0.25, attn: str = "sdpa", decision: str = "router", seed: int = 0):
    model = build_tiny_model("llama", 320, seed=seed)
    if layers != 2:
        from transformers import AutoModelForCausalLM

        from conftest import tiny_config

        config = tiny_config("llama", 320)
        config.num_hidden_layers = layers
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
    model.config._attn_implementation = attn
    install_mixture_of_depths(model, MoDConfig(capacity=capacity, decision=decision))
    # routers that send about half the tokens through at inference, so both paths are exercised
    torch.manual_seed(seed + 1)
    for block in routed_blocks(model).values():
        torch.nn.init.normal_(block.mod_router.weight, std=1.0)
        block.mod_router.bias.data.zero_()
        if decision == "predictor":
            block.mod_router.predictor_out_bias.data.zero_()
    return model


def test_token_selection_matches_references():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, -2.0, 1.5, 0.0]])
    assert topk_tokens(logits, 0.25).tolist() == [[1, 3]]  # top 2 of 8, in position order
    assert topk_tokens(logits, 0.3).tolist() == [[1, 3, 6]]  # ceil(2.4) = 3
    chosen = torch.tensor([[True, False, True, False], [False, False, False, True]])
    idx, valid = chosen_tokens(chosen)
    assert idx[0].tolist() == [0, 2] and idx[1, 0].item() == 3
    assert valid.tolist() == [[True, True], [True, False]]
    idx, valid = chosen_tokens(torch.tensor([[False, True, True]]))
    assert idx.tolist() == [[1, 2]] and valid is None


def test_install_keeps_names_and_adds_routers():
    plain = build_tiny_model("llama", 320)
    keys = set(plain.state_dict())
    model = routed_model(layers=4)
    names = sorted(routed_blocks(model))
    assert names == ["model.layers.1", "model.layers.3"]  # every other block, block 0 never
    new_keys = set(model.state_dict()) - keys - {k for k in model.state_dict() if k.startswith("model.layers.2.")
                                                  or k.startswith("model.layers.3.")}
    assert all(".mod_router." in k for k in new_keys) and new_keys
    block = model.model.layers[1]
    assert isinstance(block, type(plain.model.layers[1])) and type(block).__name__ == "RoutedLlamaDecoderLayer"
    assert find_decoder_layers(model)[0] == "model.layers"
    with pytest.raises(MixtureOfDepthsError, match="already installed"):
        install_mixture_of_depths(model, MoDConfig())
    with pytest.raises(MixtureOfDepthsError, match="routes no block"):
        install_mixture_of_depths(build_tiny_model("llama", 320), MoDConfig(every=3))


def test_full_capacity_training_forward_is_the_original_model():
    """Gate value 1: with every token routed through, the model computes exactly what it did."""
    plain = build_tiny_model("llama", 320)
    model = build_tiny_model("llama", 320)
    install_mixture_of_depths(model, MoDConfig(capacity=1.0))
    ids = torch.randint(0, 320, (2, 12))
    model.train()
    plain.train()
    torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, plain(input_ids=ids, use_cache=False).logits,
                               rtol=1e-5, atol=1e-5)


def test_nothing_routed_skips_the_block():
    model = build_tiny_model("llama", 320)
    install_mixture_of_depths(model, MoDConfig())
    model.model.layers[1].mod_router.bias.data.fill_(-1e4)
    shallow = build_tiny_model("llama", 320)
    shallow.model.layers = shallow.model.layers[:1]
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, shallow(input_ids=ids).logits)
    assert model.model.layers[1].mod_last_fraction == 0.0


def test_capacity_warmup_falls_geometrically_from_every_token_to_the_capacity():
    config = MoDConfig(capacity=0.125, capacity_warmup=0.5)
    assert capacity_schedule(config, 0.0) == 1.0
    assert capacity_schedule(config, 0.25) == pytest.approx(0.125 ** 0.5)
    assert capacity_schedule(config, 0.5) == capacity_schedule(config, 0.9) == 0.125
    assert capacity_schedule(MoDConfig(capacity=0.125, capacity_warmup=0), 0.0) == 0.125


def test_warmup_capacity_routes_every_token_as_the_original_model():
    """At the start of the capacity warmup a routed pretrained model computes exactly what it did."""
    plain = build_tiny_model("llama", 320)
    model = build_tiny_model("llama", 320)
    install_mixture_of_depths(model, MoDConfig(capacity=0.125))
    ids = torch.randint(0, 320, (2, 16))
    model.train()
    plain.train()
    set_mod_capacity(model, 1.0)
    torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, plain(input_ids=ids, use_cache=False).logits,
                               rtol=1e-5, atol=1e-5)
    assert model.model.layers[1].mod_last_fraction == 1.0
    set_mod_capacity(model, 0.25)
    model(input_ids=ids, use_cache=False)
    assert model.model.layers[1].mod_last_fraction == 4 / 16


def test_language_model_loss_only_ranks_the_router_logits():
    """The gate is centred over the sequence: the LM loss cannot shift all of a block's logits
    together (top-k does not see a shift), so the bias, which sets the causal threshold, is left
    to the decision loss."""
    model = routed_model(layers=2, capacity=0.25)
    model.train()
    ids = torch.randint(0, 320, (3, 16))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    router = model.model.layers[1].mod_router
    assert router.weight.grad.abs().sum() > 0
    assert router.bias.grad is None or router.bias.grad.abs().item() < 1e-6


@pytest.mark.parametrize("decision", ["router", "predictor"])
def test_calibration_makes_the_causal_decision_route_the_capacity(decision):
    """The decision bias follows the threshold top-k implied, so that at inference about the
    training capacity goes through, whatever the BCE has learned so far; training is unaffected."""
    model = routed_model(layers=2, capacity=0.25, decision=decision)
    router = model.model.layers[1].mod_router
    (router.bias if decision == "router" else router.predictor_out_bias).data.fill_(20.0)  # routes most tokens
    ids = torch.randint(0, 320, (4, 32))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert model.model.layers[1].mod_last_fraction > 0.6
    model.train()
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
        for _ in range(60):
            model(input_ids=ids, use_cache=False)
            calibrate_decisions(model)
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, before)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert model.model.layers[1].mod_last_fraction == pytest.approx(0.25, abs=0.02)


@pytest.mark.parametrize("decision", ["router", "predictor"])
def test_training_routes_capacity_and_trains_router_and_decision(decision):
    model = routed_model(layers=2, capacity=0.25, decision=decision)
    model.train()
    ids = torch.randint(0, 320, (3, 16))
    out = model(input_ids=ids, labels=ids, use_cache=False)
    block = model.model.layers[1]
    assert block.mod_last_fraction == 4 / 16  # ceil(0.25 * 16) tokens of every row
    aux = auxiliary_loss(model)
    assert aux is not None and aux.item() > 0
    (out.loss + aux).backward()
    router = block.mod_router
    assert router.weight.grad.abs().sum() > 0  # through the gate (and the BCE for decision 'router')
    if decision == "predictor":
        assert router.predictor_in.grad.abs().sum() > 0 and router.predictor_out.grad.abs().sum() > 0
    # the decision loss does not reach the residual stream: only the LM loss trains the blocks
    model.zero_grad()
    model(input_ids=ids, use_cache=False)
    auxiliary_loss(model).backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is None or model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() == 0
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert block.aux_loss is None and auxiliary_loss(model) is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_inference_is_causal_decoding_matches_the_full_forward(attn):
    model = routed_model(layers=4, attn=attn)
    ids = torch.randint(0, 320, (1, 14))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        fractions = [b.mod_last_fraction for b in routed_blocks(model).values()]
        assert all(0 < f < 1 for f in fractions)
        # token by token with a KV cache: the routed blocks cache only the tokens they processed
        out = model(input_ids=ids[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 14):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
        assert out.past_key_values.get_seq_length(1) < out.past_key_values.get_seq_length(0) == 14
        # a prefix's logits do not depend on what follows it
        torch.testing.assert_close(model(input_ids=ids[:, :7]).logits, full[:, :7], rtol=1e-5, atol=1e-5)
        # and generate() decodes the same tokens as greedy argmax over full forwards
        generated = model.generate(ids[:, :6], max_new_tokens=4, do_sample=False, pad_token_id=2)
        sequence = ids[:, :6]
        for _ in range(4):
            sequence = torch.cat([sequence, model(input_ids=sequence).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(generated, sequence)


def test_batches_route_each_row_alone_and_batched_decoding_is_refused():
    model = routed_model(layers=2)
    ids = torch.randint(0, 320, (3, 12))
    with torch.no_grad():
        batch = model(input_ids=ids).logits  # one-shot forward with the default cache
        rows = torch.cat([model(input_ids=ids[i:i + 1]).logits for i in range(3)])
        torch.testing.assert_close(batch, rows, rtol=1e-5, atol=1e-5)
        # right padding leaves the real tokens' logits alone
        padded = torch.cat([ids[:1, :8], torch.full((1, 4), 2)], 1)
        mask = torch.tensor([[1] * 8 + [0] * 4])
        both = model(input_ids=torch.cat([padded, ids[1:2]]), attention_mask=torch.cat([mask, torch.ones(1, 12, dtype=torch.long)])).logits
        torch.testing.assert_close(both[0, :8], model(input_ids=ids[:1, :8]).logits[0], rtol=1e-5, atol=1e-5)
        with pytest.raises(MixtureOfDepthsError, match="batch size 1"):
            model.generate(ids[:2, :4], max_new_tokens=2, do_sample=False, pad_token_id=2)


def test_hidden_states_keep_their_shape():
    model = routed_model(layers=4)
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 320, (2, 10)), output_hidden_states=True)
    assert len(out.hidden_states) == 5 and all(h.shape == (2, 10, 64) for h in out.hidden_states)


@pytest.mark.parametrize("spec", [QuantSpec(weight_scale="tensor"), QuantSpec(variant="onebit")], ids=["b1.58", "onebit"])
def test_export_and_reload_rebuild_the_routers(tmp_path, tiny_tokenizer, spec):
    model = build_tiny_model("llama", 320, seed=1)
    report = convert_to_bitnet(model, spec, mixture_of_depths={"capacity": 0.25})
    assert report.routed == ["model.layers.1"] and "routed 1 blocks" in report.summary()
    router = model.model.layers[1].mod_router
    torch.nn.init.normal_(router.weight, std=1.0)
    router.bias.data.zero_()
    model.eval()
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    fraction = model.model.layers[1].mod_last_fraction
    export_ternary(model, tiny_tokenizer, tmp_path, spec, dtype=torch.bfloat16)
    manifest = read_manifest(tmp_path)
    assert manifest["mixture_of_depths"]["capacity"] == 0.25 and not manifest["transformers_compatible"]
    from bitconvert.export.card import render_card

    assert "| Mixture-of-Depths | every 2 blocks, training capacity 0.25" in render_card(manifest)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitconvert" and config["mixture_of_depths"]["every"] == 2

    ours, _ = load_ternary(tmp_path)
    block = ours.model.layers[1]
    assert type(block).__name__ == "RoutedLlamaDecoderLayer"
    assert block.mod_router.weight.dtype == torch.float32
    assert torch.equal(block.mod_router.weight, router.weight.detach())  # stored in float32 in a bf16 export
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    assert block.mod_last_fraction == fraction  # the same tokens went through
    # bf16 embeddings and norms in the export: close, not equal
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05)


def test_recipe_and_cli_select_mixture_of_depths(tmp_path, tiny_llama_dir, corpus_file):
    from click.testing import CliRunner

    from bitconvert.cli import main
    from bitconvert.recipes.loading import recipe_from_dict

    recipe = recipe_from_dict({}, ["convert.mixture_of_depths.capacity=0.5", "train.steps=1"])
    assert recipe.convert.mixture_of_depths == MoDConfig(capacity=0.5)
    assert "mixture_of_depths" not in recipe.convert.quant_spec().model_dump()
    out = tmp_path / "tern"
    result = CliRunner().invoke(main, ["quantize", str(tiny_llama_dir), "--out", str(out), "--mode", "pretrain",
                                       "--steps", "2", "--data", str(corpus_file), "--seq-len", "32", "--batch-size", "2",
                                       "--device", "cpu", "--variant", "bitnet1", "--mod-capacity", "0.25"])
    assert result.exit_code == 0, result.output
    assert "routed 1 blocks" in result.output
    manifest = read_manifest(out)
    assert manifest["mixture_of_depths"]["capacity"] == 0.25 and manifest["spec"]["variant"] == "bitnet1"
    rows = [json.loads(line) for line in (out / "training" / "metrics.jsonl").read_text().splitlines()]
    capacities = [row["mod_capacity"] for row in rows if "mod_capacity" in row]
    assert capacities == [1.0, 0.25]  # step 0 of 2 routes every token; by half the budget, the capacity
    model, _ = load_ternary(out)
    assert routed_blocks(model)


def test_forward_flops_follow_the_formula():
    model = routed_model(layers=2, capacity=0.25)
    seq, d = 16, 64
    block_weights = (64 * 64 + 2 * 64 * 32 + 64 * 64) + 3 * 64 * 128  # q, k, v, o + gate, up, down
    head = 2 * 64 * 320 * seq
    linear = 2 * block_weights * seq
    attention = 4 * d * seq * (seq + 1) / 2
    flops = forward_flops(model, seq)
    assert flops["dense_flops"] == head + 2 * (linear + attention)
    assert flops["routed_flops"] == head + linear + attention + 0.25 * linear + 0.0625 * attention
    measured = forward_flops(model, seq, {"model.layers.1": 0.5})
    assert math.isclose(measured["routed_flops"], head + linear + attention + 0.5 * linear + 0.25 * attention)
    assert 0 < flops["saved_fraction"] < measured["saved_fraction"] + 1


def test_benchmark_smoke_on_cpu(tmp_path, tiny_llama_dir, corpus_file):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mod_smollm2.py"), "--model", str(tiny_llama_dir), "--train-data",
         str(corpus_file), "--eval-data", str(corpus_file), "--steps", "2", "--seq-len", "32", "--batch-size", "2",
         "--device", "cpu", "--timing-reps", "1", "--capacity", "0.25", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert [arm["arm"] for arm in report["arms"]] == ["dense", "mod"]
    mod = report["arms"][1]
    assert mod["routed_fraction_per_block"] and mod["flops_saved_at_training_capacity"] > 0
    assert report["arms"][0]["flops_saved_at_measured_routing"] == 0
    assert "Quality cost of MoD" in (out / "results.md").read_text()
    assert CORPUS  # the same text the fixtures use


def test_predictor_decision_survives_export(tmp_path, tiny_tokenizer):
    model = routed_model(layers=2, decision="predictor")
    spec = QuantSpec()
    convert_to_bitnet(model, spec)
    model.eval()
    ids = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_ternary(model, tiny_tokenizer, tmp_path, spec, dtype=torch.float32)
    ours, _ = load_ternary(tmp_path)
    router = ours.model.layers[1].mod_router
    assert router.config.decision == "predictor" and router.predictor_in.shape == (128, 64)
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    assert ours.model.layers[1].mod_last_fraction == model.model.layers[1].mod_last_fraction
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-3)


def test_recipes_refuse_gguf_for_what_llama_cpp_cannot_run():
    from bitconvert.recipes.loading import RecipeError, recipe_from_dict

    for sets in (["convert.variant=onebit"], ["convert.mixture_of_depths.capacity=0.25"]):
        with pytest.raises(RecipeError, match="b1.58 models without Mixture-of-Depths only"):
            recipe_from_dict({"export": {"formats": ["packed", "gguf-tq2_0"]}}, [*sets, "train.steps=1"])
    recipe_from_dict({"export": {"formats": ["gguf-tq2_0"]}}, ["train.steps=1"])


@pytest.mark.slow
def test_smollm2_routed_decoding_matches_the_full_forward(smollm2):
    import copy

    model = copy.deepcopy(smollm2[0])
    install_mixture_of_depths(model, MoDConfig())
    assert len(routed_blocks(model)) == 15
    torch.manual_seed(0)
    for block in routed_blocks(model).values():
        torch.nn.init.normal_(block.mod_router.weight, std=1.0)
        block.mod_router.bias.data.zero_()
    ids = smollm2[1]("The river ran past the old mill, where children counted boats", return_tensors="pt").input_ids
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    # 30 float32 blocks summed in another order: ~1e-4 apart; a token routed differently would be far more
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=2e-3)
