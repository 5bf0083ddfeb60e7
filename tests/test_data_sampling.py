"""Teacher text: the static-cache decode loop against transformers' generate(), EOS handling,
determinism, the exact top-k / top-p filters, and the cached samples that --resume reuses."""

import json

import pytest
import torch
from conftest import build_tiny_model

from bitconvert.recipes.schema import DataConfig, DataSource, GenerateSource
from bitconvert.train import data as data_module
from bitconvert.train import sampling as sampling_module
from bitconvert.train.data import build_training_data
from bitconvert.train.sampling import (
    eos_token_ids,
    generate_texts,
    next_tokens,
    nucleus_filter,
    random_first_tokens,
    sample_continuations,
    truncate_at_eos,
)

EOS = 2  # the tiny tokenizer's </s>, also the tiny configs' eos_token_id


@pytest.fixture(scope="module")
def teacher(tiny_tokenizer):
    return build_tiny_model("llama", len(tiny_tokenizer))


def prompts_of(vocab: int, rows: int = 3, length: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def with_eos_bias(model, bias: float):
    """A forward hook on the head that makes EOS likely: how a row ends early, for EOS tests."""
    def hook(module, args, output):
        output = output.clone()
        output[..., EOS] += bias
        return output
    return model.lm_head.register_forward_hook(hook)


def transformers_greedy(model, prompts, new_tokens, min_new_tokens):
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=min_new_tokens, pad_token_id=EOS)
    return out[:, prompts.shape[1]:]


def test_greedy_decode_loop_matches_generate_token_for_token(teacher):
    prompts = prompts_of(teacher.config.vocab_size)
    ours = sample_continuations(teacher, prompts, new_tokens=14, min_new_tokens=14, eos_token_ids=[EOS], greedy=True)
    assert ours.tokens.shape == (3, 14) and ours.tokens.dtype == torch.long and not ours.used_cuda_graph
    assert torch.equal(ours.tokens, transformers_greedy(teacher, prompts, 14, 14))
    # the start-token case: one-token prompts
    start = torch.full((2, 1), 1, dtype=torch.long)
    ours = sample_continuations(teacher, start, new_tokens=9, min_new_tokens=9, eos_token_ids=[EOS], greedy=True)
    assert torch.equal(ours.tokens, transformers_greedy(teacher, start, 9, 9))


def test_decode_steps_attend_per_key_value_group_without_copies(teacher, monkeypatch):
    from types import SimpleNamespace

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from bitconvert.layers import attention

    generator = torch.Generator().manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    query, key, value = (torch.randn(shape, generator=generator) for shape in ((2, 6, 1, 8), (2, 2, 7, 8), (2, 2, 7, 8)))
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 4:] = False  # the static cache's unwritten slots
    ours, _ = attention.decode_attention_forward(module, query, key, value, mask, scaling=8 ** -0.5)
    theirs, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, mask, scaling=8 ** -0.5)
    assert ours.shape == theirs.shape == (2, 1, 6, 8) and torch.allclose(ours, theirs, atol=1e-6)

    calls = []
    real = attention.decode_attention_forward

    def spy(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "decode_attention_forward", spy)
    sample_continuations(teacher, prompts_of(teacher.config.vocab_size), new_tokens=4, greedy=True)
    layers = teacher.config.num_hidden_layers
    assert calls == [5] * layers + [1] * 3 * layers  # the prefill, then three decode steps
    assert teacher.config._attn_implementation == "sdpa"  # switched back after sampling


def test_eos_is_suppressed_for_min_new_tokens_then_ends_the_row(teacher):
    prompts = prompts_of(teacher.config.vocab_size)
    handle = with_eos_bias(teacher, 50.0)
    try:
        ours = sample_continuations(teacher, prompts, new_tokens=12, min_new_tokens=4, eos_token_ids=[EOS], greedy=True)
        reference = transformers_greedy(teacher, prompts, 12, 4)
        sampled = sample_continuations(teacher, prompts, new_tokens=12, min_new_tokens=4, eos_token_ids=[EOS],
                                       top_k=50, top_p=0.95, seed=1)
    finally:
        handle.remove()
    # generate() stops a row at EOS and pads; the loop runs on and the text is cut at the first EOS
    assert truncate_at_eos(ours.tokens, [EOS]) == truncate_at_eos(reference, [EOS])
    for tokens in (ours.tokens, sampled.tokens):
        assert (tokens[:, :4] != EOS).all() and (tokens[:, 4] == EOS).all()
        assert [len(row) for row in truncate_at_eos(tokens, [EOS])] == [4, 4, 4]


def test_truncate_at_eos():
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [3, 5, 9, 1]])
    assert truncate_at_eos(tokens, [2]) == [[5], [5, 6, 7, 8], [3, 5, 9, 1]]
    assert truncate_at_eos(tokens, [1, 2]) == [[5], [5, 6, 7, 8], [3, 5, 9]]
    assert truncate_at_eos(tokens, []) == tokens.tolist()


def test_sampling_is_deterministic_for_a_seed_and_collapses_to_greedy(teacher):
    prompts = prompts_of(teacher.config.vocab_size, rows=4)
    settings = {"new_tokens": 16, "min_new_tokens": 4, "eos_token_ids": [EOS], "temperature": 1.0, "top_k": 50,
                "top_p": 0.95}
    first = sample_continuations(teacher, prompts, seed=7, **settings).tokens
    assert torch.equal(first, sample_continuations(teacher, prompts, seed=7, **settings).tokens)
    assert not torch.equal(first, sample_continuations(teacher, prompts, seed=8, **settings).tokens)
    assert first.min() >= 0 and first.max() < teacher.config.vocab_size
    greedy = sample_continuations(teacher, prompts, new_tokens=16, min_new_tokens=4, eos_token_ids=[EOS], greedy=True)
    for narrow in ({"top_k": 1}, {"top_p": 1e-6}):
        picked = sample_continuations(teacher, prompts, seed=3, **{**settings, **narrow}).tokens
        assert torch.equal(picked, greedy.tokens), narrow


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.1, 0.5, 0.95):
        ours = nucleus_filter(scores, top_p)
        theirs = TopPLogitsWarper(top_p)(None, scores.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), top_p
        assert torch.equal(ours[~torch.isinf(ours)], scores[~torch.isinf(theirs)])
    assert torch.equal(nucleus_filter(scores, 1.0), scores)
    # top-k then top-p on k values keeps the same tokens as both warpers over the whole vocabulary
    kept = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(20)(None, scores.clone()))
    values, indices = torch.topk(scores, 20)
    ours_kept = torch.zeros_like(scores, dtype=torch.bool).scatter(1, indices, ~torch.isinf(nucleus_filter(values, 0.8)))
    assert torch.equal(ours_kept, ~torch.isinf(kept))


def test_the_exponential_race_draws_with_the_softmax_probabilities():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -8.0]).expand(40_000, 5)
    drawn = next_tokens(logits, 0, min_new_tokens=0, eos_ids=torch.tensor([], dtype=torch.long), temperature=1.0,
                        top_k=0, top_p=1.0, greedy=False, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=5).float() / len(drawn)
    assert torch.allclose(frequencies, logits[0].softmax(-1), atol=0.01)
    # top-p 0.9 keeps the three most likely (0.665 + 0.245 >= 0.9 only with the third: 0.910)
    filtered = next_tokens(logits, 0, min_new_tokens=0, eos_ids=torch.tensor([], dtype=torch.long), temperature=1.0,
                           top_k=0, top_p=0.9, greedy=False, generator=torch.Generator().manual_seed(0))
    assert set(filtered.tolist()) == {0, 1, 2}
    suppressed = next_tokens(logits, 1, min_new_tokens=2, eos_ids=torch.tensor([0]), temperature=1.0, top_k=2,
                             top_p=1.0, greedy=False, generator=torch.Generator().manual_seed(0))
    assert set(suppressed.tolist()) == {1, 2}


def test_generate_texts_uses_the_decode_loop_and_ends_texts_at_eos(teacher, tiny_tokenizer, monkeypatch, caplog):
    calls = {"generate": 0, "forward": 0}
    real_generate = type(teacher).generate

    def counting_generate(self, *args, **kwargs):
        calls["generate"] += 1
        return real_generate(self, *args, **kwargs)

    def eos_at_index_4(module, args, output):
        calls["forward"] += 1
        if (calls["forward"] - 1) % 16 == 4:  # the prefill is forward 0 of each batch of 16 new tokens
            output = output.clone()
            output[..., EOS] += 50.0
        return output

    monkeypatch.setattr(type(teacher), "generate", counting_generate)
    config = GenerateSource(tokens=3 * 2 * 16, sequence_length=16, batch_size=2)  # three batches, start token only
    plain = generate_texts(teacher, tiny_tokenizer, config, seed=0, device="cpu")
    handle = teacher.lm_head.register_forward_hook(eos_at_index_4)
    try:
        ended = generate_texts(teacher, tiny_tokenizer, config, seed=0, device="cpu")
    finally:
        handle.remove()
    assert calls["generate"] == 0 and "generate() instead" not in caplog.text
    assert len(plain) == len(ended) == 6 and eos_token_ids(teacher, tiny_tokenizer) == [EOS]
    # the same draws up to the EOS at index 4 (sequence_length // 4); what the loop sampled after it is gone
    assert all(short and long.startswith(short) and len(short) < len(long) for short, long in zip(ended, plain))
    assert all("</s>" not in t and "<s>" not in t for t in plain + ended)
    # sampler="generate" keeps transformers' path (the padded prompts case always takes it)
    assert len(generate_texts(teacher, tiny_tokenizer, config, seed=0, device="cpu", sampler="generate")) == 6
    assert calls["generate"] == 3


def test_generate_texts_is_deterministic_and_falls_back_to_generate(teacher, tiny_tokenizer, corpus_file,
                                                                    monkeypatch, caplog):
    config = GenerateSource(tokens=64, sequence_length=16, batch_size=4, prompts_from=str(corpus_file), prompt_tokens=6)
    first = generate_texts(teacher, tiny_tokenizer, config, seed=5, device="cpu")
    assert first == generate_texts(teacher, tiny_tokenizer, config, seed=5, device="cpu")
    assert first != generate_texts(teacher, tiny_tokenizer, config, seed=6, device="cpu")

    def unsupported(*args, **kwargs):
        raise TypeError("forward() got an unexpected keyword argument 'cache'")

    monkeypatch.setattr(sampling_module, "sample_continuations", unsupported)
    texts = generate_texts(teacher, tiny_tokenizer, config, seed=5, device="cpu")
    assert len(texts) == 4 and "sampling with transformers' generate() instead" in caplog.text


def test_random_start_draws_first_tokens_across_the_vocabulary(teacher, tiny_tokenizer):
    """LLM-QAT's data-free text: each sample starts from a seeded random ordinary token, through the decode
    loop and through generate() alike."""
    firsts = random_first_tokens(tiny_tokenizer, 2000, seed=3)
    assert firsts.shape == (2000, 1) and torch.equal(firsts, random_first_tokens(tiny_tokenizer, 2000, seed=3))
    drawn = set(firsts.flatten().tolist())
    assert not drawn & set(tiny_tokenizer.all_special_ids)
    assert len(drawn) > 0.8 * (len(tiny_tokenizer) - len(tiny_tokenizer.all_special_ids))

    config = GenerateSource(tokens=2 * 4 * 16, sequence_length=16, batch_size=4, random_start=True)
    texts = generate_texts(teacher, tiny_tokenizer, config, seed=1, device="cpu")
    assert len(texts) == 8 and texts == generate_texts(teacher, tiny_tokenizer, config, seed=1, device="cpu")
    starts = [tiny_tokenizer.decode(ids) for ids in random_first_tokens(tiny_tokenizer, 8, seed=1).tolist()]
    assert all(text.startswith(start) for text, start in zip(texts, starts))
    assert len(generate_texts(teacher, tiny_tokenizer, config, seed=1, device="cpu", sampler="generate")) == 8
    with pytest.raises(ValueError, match="at most one of prompts, prompts_from, random_start and chat"):
        GenerateSource(random_start=True, prompts=["a"])


def test_cached_teacher_text_is_reused_on_resume(tmp_path, tiny_tokenizer, tiny_llama_dir, corpus_file, monkeypatch):
    """Ctrl-C in the first step, then --resume: the samples come from the run folder's jsonl, and the
    checkpoint accepts the data (same fingerprint)."""
    import os
    import signal

    import bitconvert
    from bitconvert.train import loop as loop_module
    from bitconvert.train.checkpoint import latest_checkpoint

    source = {"generate": {"tokens": 2 * 4 * 32, "sequence_length": 32, "batch_size": 4,
                           "prompts_from": str(corpus_file), "prompt_tokens": 6}}
    recipe = bitconvert.Recipe(model=str(tiny_llama_dir), output=str(tmp_path / "tern"), device="cpu",
                               data={"train": [{"path": str(corpus_file)}, source], "sequence_length": 32},
                               train={"mode": "distill", "steps": 3, "batch_size": 2, "log_every": 1,
                                      "mixed_precision": "no"})
    real_losses = loop_module.compute_losses

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C does: the step finishes, then a checkpoint
        return real_losses(*args, **kwargs)

    monkeypatch.setattr(loop_module, "compute_losses", interrupted)
    first = bitconvert.quantize(recipe)
    assert first.train.interrupted and first.train.steps == 1
    assert latest_checkpoint(tmp_path / "tern" / "training").name == "step-0000001"
    cached = sorted((tmp_path / "tern" / "training" / "data").glob("generated-1-*.jsonl"))
    assert len(cached) == 1
    texts = [json.loads(line)["text"] for line in cached[0].read_text().splitlines()]
    assert len(texts) == 8 and all(texts)

    def no_sampling(*args, **kwargs):
        raise AssertionError("a resumed run must read the cached samples, not sample again")

    monkeypatch.setattr(loop_module, "compute_losses", real_losses)
    monkeypatch.setattr(data_module, "generate_texts", no_sampling)
    resumed = bitconvert.quantize(recipe, resume=True)
    assert resumed.train.steps == 3 and not resumed.train.interrupted
    data = build_training_data(DataConfig(train=[DataSource(path=str(corpus_file)), DataSource(**source)],
                                          sequence_length=32), tiny_tokenizer, seed=0,
                               cache_dir=tmp_path / "tern" / "training" / "data")
    assert len(data.pool) > 0


def test_chat_samples_are_whole_conversations_from_the_templates_opening(teacher, tiny_tokenizer):
    """Magpie's text: every sample starts where the user's message goes and runs on through the template's end of
    turn (an EOS to the model), with the turn markers kept, through the decode loop and through generate() alike."""
    import copy

    from bitconvert.train.data import DataError, chat_opening

    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        chat_opening(tiny_tokenizer)
    chat_tokenizer = copy.deepcopy(tiny_tokenizer)
    chat_tokenizer.chat_template = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    opening, written = chat_opening(chat_tokenizer)
    assert chat_tokenizer.decode(opening[0]) == "<s>user\n" and EOS in written

    config = GenerateSource(tokens=2 * 4 * 16, sequence_length=16, batch_size=4, chat=True)
    hook = with_eos_bias(teacher, 30.0)  # EOS nearly every token: a run-on sample must be the turn marker's doing
    try:
        for sampler in ("static", "generate"):
            texts = generate_texts(teacher, chat_tokenizer, config, seed=1, device="cpu", sampler=sampler)
            assert len(texts) == 8 and all(text.startswith("<s>user\n") for text in texts)
            assert all(text.count("</s>") >= 12 for text in texts), texts
            assert texts == generate_texts(teacher, chat_tokenizer, config, seed=1, device="cpu", sampler=sampler)
        plain = generate_texts(teacher, chat_tokenizer, config.model_copy(update={"chat": False}), seed=1, device="cpu")
        assert not any("</s>" in text for text in plain)
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="at most one of prompts, prompts_from, random_start and chat"):
        GenerateSource(chat=True, random_start=True)
