"""The chunked head loss: the same loss and gradients as full logits, and where it applies."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from bitconvert.recipes.schema import TrainConfig
from bitconvert.train.head_loss import ChunkedHead, head_loss_support, head_losses
from bitconvert.train.loop import compute_losses


def reference_terms(hidden, weight, teacher_logits, ids, temperature):
    """The obvious way: full logits, log-softmax, KL over every position, CE over positions with a next token."""
    logits = hidden @ weight.t()
    log_s = F.log_softmax(logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature**2
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return kl, ce


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kl_weight,ce_weight", [(1.0, 0.5), (0.0, 1.0), (0.7, 0.0)])
@pytest.mark.parametrize("teacher_as", ["hidden", "logits"])
def test_head_losses_match_full_logits_in_float64(temperature, kl_weight, ce_weight, teacher_as):
    g = torch.Generator().manual_seed(0)
    batch, tokens, width, vocab, teacher_width = 3, 7, 16, 50, 12
    hidden = torch.randn(batch, tokens, width, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(batch, tokens, teacher_width, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(vocab, teacher_width, generator=g, dtype=torch.float64)
    ids = torch.randint(0, vocab, (batch, tokens), generator=g)
    teacher = ({"teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight} if teacher_as == "hidden"
               else {"teacher_logits": teacher_hidden @ teacher_weight.t()})
    # 5 rows a chunk: chunks cross sequence boundaries and the last one is short
    loss, kl, ce = head_losses(hidden, weight, ids, temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight,
                               chunk_tokens=5, **teacher)
    grads = torch.autograd.grad(loss * 1.7, (hidden, weight))
    ref_kl, ref_ce = reference_terms(hidden, weight, teacher_hidden @ teacher_weight.t(), ids, temperature)
    ref_loss = kl_weight * ref_kl + ce_weight * ref_ce
    ref_grads = torch.autograd.grad(ref_loss * 1.7, (hidden, weight))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12, abs=1e-12)
    if kl_weight:
        assert kl.item() == pytest.approx(ref_kl.item(), rel=1e-12)
    if ce_weight:
        assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-12)
    for mine, ref in zip(grads, ref_grads):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)


def test_compiled_chunk_arithmetic_matches_eager():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    teacher = {"teacher_hidden": torch.randn(2, 9, 16, generator=g), "teacher_weight": torch.randn(40, 16, generator=g)}
    ids = torch.randint(0, 40, (2, 9), generator=g)
    results = []
    for compiled in (False, True):
        loss, kl, ce = head_losses(hidden, weight, ids, temperature=1.5, kl_weight=1.0, ce_weight=0.5, chunk_tokens=8,
                                   compiled=compiled, **teacher)
        results.append((loss, kl, ce, *torch.autograd.grad(loss, (hidden, weight))))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_head_losses_without_grad_keeps_nothing():
    hidden, weight = torch.randn(2, 5, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    ids = torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        loss, _, ce = head_losses(hidden, weight, ids, kl_weight=0.0, ce_weight=1.0)
    assert not loss.requires_grad
    assert ce.item() == pytest.approx(F.cross_entropy((hidden @ weight.t())[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item(), rel=1e-5)


def tied_pair(tiny_tokenizer):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from bitconvert.convert import convert_to_bitnet
    from bitconvert.quant import QuantSpec

    config = tiny_config("llama", len(tiny_tokenizer))
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config).eval()
    torch.manual_seed(1)
    student = AutoModelForCausalLM.from_config(config)
    convert_to_bitnet(student, QuantSpec(weight_scale="channel"))
    assert student.lm_head.weight is student.model.embed_tokens.weight
    return student.train(), teacher


@pytest.mark.parametrize("mode,loss", [("distill", {"kl": 1.0, "ce": 0.3, "temperature": 2.0}),
                                       ("distill", {"kl": 1.0, "ce": 0.0, "hidden": 0.5}),
                                       ("pretrain", {"kl": 0.0, "ce": 1.0})])
def test_compute_losses_chunked_equals_full_logits(tiny_tokenizer, mode, loss):
    """Through a converted tiny Llama with tied embeddings: the same terms and the same gradient on every
    parameter (the embedding gets the head's share) as the plain path's full logits."""
    student, teacher = tied_pair(tiny_tokenizer)
    cfg = TrainConfig(mode=mode, steps=1, loss=loss, mixed_precision="no")
    ids = torch.randint(0, len(tiny_tokenizer), (3, 24), generator=torch.Generator().manual_seed(0))
    results = {}
    for fused in (False, True):
        student.zero_grad(set_to_none=True)
        head = ChunkedHead(student, teacher) if fused else None
        with head if head is not None else contextlib.nullcontext():
            terms = compute_losses(student, teacher if mode == "distill" else None, ids, cfg, head)
            terms["loss"].backward()
        results[fused] = ({k: v.item() for k, v in terms.items()},
                          {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    (plain_terms, plain_grads), (fused_terms, fused_grads) = results[False], results[True]
    assert fused_terms.keys() == plain_terms.keys()
    for key, value in plain_terms.items():
        assert fused_terms[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert fused_grads.keys() == plain_grads.keys() and "model.embed_tokens.weight" in fused_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_head_loss_support_says_why_not(tiny_tokenizer):
    from conftest import build_tiny_model, tiny_config
    from transformers import AutoConfig, AutoModelForCausalLM

    probe = torch.randint(0, len(tiny_tokenizer), (1, 8))
    llama = build_tiny_model("llama", len(tiny_tokenizer))
    assert head_loss_support(llama, probe) is None
    assert head_loss_support(build_tiny_model("gpt2", len(tiny_tokenizer)), probe) is None

    common = tiny_config("llama", len(tiny_tokenizer)).to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings")
    gemma2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", head_dim=16, final_logit_softcapping=30.0,
                                                                   **{k: common[k] for k in keep}))
    assert "final_logit_softcapping" in head_loss_support(gemma2, probe)

    biased = build_tiny_model("llama", len(tiny_tokenizer))
    biased.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tiny_tokenizer)))
    assert "bias" in head_loss_support(biased, probe)

    scaled = build_tiny_model("llama", len(tiny_tokenizer))
    plain_forward = scaled.forward

    def forward(input_ids=None, logits_to_keep=0, **kwargs):  # a transform that no config key names
        out = plain_forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits / 4
        return out

    scaled.forward = forward
    assert "not final_hidden @ lm_head.weight.T" in head_loss_support(scaled, probe)
    assert head_loss_support(scaled) is None  # without a probe only the structure is checked


def make_run(tiny_tokenizer, corpus_file, **train_overrides):
    from test_train import make_run as base

    return base(tiny_tokenizer, corpus_file, **train_overrides)


def test_training_with_the_chunked_loss_matches_full_logits(tmp_path, tiny_tokenizer, corpus_file, caplog):
    losses = {}
    for fused in (False, True):
        student, teacher, data, cfg, acc = make_run(tiny_tokenizer, corpus_file, steps=4, fused_loss=fused,
                                                    loss={"kl": 1.0, "ce": 0.5, "temperature": 1.5})
        caplog.clear()
        with caplog.at_level("DEBUG", logger="bitconvert.train.loop"):
            result = train_run(student, teacher, data, cfg, tmp_path / str(fused), acc)
        losses[fused] = [(r["loss"], r["kl"], r["ce"]) for r in result.metrics if "loss" in r]
        said = "chunked head loss on (teacher: final hidden states)" if fused else "train.fused_loss is false"
        assert said in caplog.text
    assert len(losses[True]) == 4 and all(math.isfinite(x) for row in losses[True] for x in row)
    for fused_row, plain_row in zip(losses[True], losses[False]):
        assert fused_row == pytest.approx(plain_row, rel=1e-4, abs=1e-5)


def train_run(student, teacher, data, cfg, run_dir, acc):
    from bitconvert.train.loop import train

    return train(student, teacher, data, cfg, run_dir, accelerator=acc)
