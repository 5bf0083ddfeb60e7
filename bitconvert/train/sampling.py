"""Teacher-generated training text: the teacher continues prompts (data-free distillation).

:func:`generate_texts` turns a recipe's ``generate`` source into documents. Equal-length prompts go
through :func:`sample_continuations`, a static-cache decode loop of our own (on CUDA with the decode
step captured in a CUDA graph) that samples ~9x faster than transformers' ``generate()`` at batch
1024 on an H200 (docs/benchmarks.md); padded prompt lists still use ``generate()``.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Literal

import torch

from bitconvert.layers.attention import cache_keyword, decode_attention
from bitconvert.recipes.schema import GenerateSource

log = logging.getLogger(__name__)


Sampler = Literal["static", "generate"]


@torch.no_grad()
def generate_texts(teacher, tokenizer, config: GenerateSource, *, seed: int, device, sampler: Sampler = "static",
                   cuda_graph: bool = True) -> list[str]:
    """Sample text from the teacher (data-free distillation).

    Equal-length prompts (``prompts_from`` lines, random first tokens, the chat template's opening or the
    start token alone) go through :func:`sample_continuations`, a static-cache decode loop that is several
    times faster than transformers' ``generate()`` at large batches; padded ``prompts`` lists,
    ``sampler="generate"`` and teachers the loop cannot drive use ``generate()``.
    """
    from bitconvert.train.data import chat_opening, prompts_from_file  # prompts are data's business

    template_ids: set[int] = set()
    if config.prompts_from:
        prompt_ids = prompts_from_file(config, tokenizer, seed)
    elif config.random_start:
        prompt_ids = random_first_tokens(tokenizer, config.batch_size * batch_count(config), seed)
    elif config.chat:
        prompt_ids, template_ids = chat_opening(tokenizer)
    else:
        prompt_ids = None
    # A chat template's end of turn is an EOS to the model, but in a conversation the next turn follows it.
    eos_ids = [i for i in eos_token_ids(teacher, tokenizer) if i not in template_ids]
    if config.prompts or sampler == "generate":
        return _generate_with_transformers(teacher, tokenizer, config, seed=seed, device=device, prompt_ids=prompt_ids,
                                           eos_ids=eos_ids)
    from bitconvert.utils.progress import Progress

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    top_k = generation_top_k(teacher)
    batches = batch_count(config)
    progress = Progress(total_steps=batches, desc="sampling teacher text")
    texts: list[str] = []
    try:
        for batch in range(batches):
            if prompt_ids is not None:
                prompts = _batch_prompts(prompt_ids, batch, config.batch_size)
            else:
                prompts = torch.full((config.batch_size, 1), start, dtype=torch.long)
            try:
                sampled = sample_continuations(
                    teacher, prompts.to(device), new_tokens=config.sequence_length,
                    min_new_tokens=config.sequence_length // 4, temperature=config.temperature, top_k=top_k,
                    top_p=config.top_p, eos_token_ids=eos_ids, seed=seed * 100_003 + batch, cuda_graph=cuda_graph)
            except Exception as err:
                # A teacher whose forward takes no StaticCache fails on the first batch, and generate()
                # still serves it; a failure after that is something else, and propagates.
                if batch > 0:
                    raise
                log.warning("static-cache sampling failed on this teacher (%s: %s); sampling with transformers' "
                            "generate() instead, which is several times slower", type(err).__name__, err)
                progress.close()
                return _generate_with_transformers(teacher, tokenizer, config, seed=seed, device=device,
                                                   prompt_ids=prompt_ids, eos_ids=eos_ids)
            cuda_graph = sampled.used_cuda_graph  # after a fallback, the later batches go straight to eager
            # Special tokens go (the start token), except a conversation's turn markers: tokenize_blocks closes each
            # document with one EOS of its own. No clean-up: it would strip spaces before punctuation that the
            # sampled tokens hold (transformers skips it for BPE tokenizers anyway, but warns at every call).
            sequences = [p + n for p, n in zip(prompts.tolist(), truncate_at_eos(sampled.tokens.cpu(), eos_ids))]
            texts.extend(tokenizer.batch_decode(sequences, skip_special_tokens=not config.chat,
                                                clean_up_tokenization_spaces=False))
            progress.update(batch + 1, (batch + 1) * config.batch_size * config.sequence_length, 0.0)
    finally:
        progress.close()
    return texts


def batch_count(config: GenerateSource) -> int:
    """Sampling batches that cover ``config.tokens``."""
    return -(-config.tokens // (config.batch_size * config.sequence_length))


def _batch_prompts(prompt_ids: torch.Tensor, batch: int, batch_size: int) -> torch.Tensor:
    """Batch ``batch``'s rows of ``prompt_ids``, cycling through them when there are fewer than the batches need."""
    return prompt_ids[torch.arange(batch * batch_size, (batch + 1) * batch_size) % len(prompt_ids)]


def random_first_tokens(tokenizer, count: int, seed: int) -> torch.Tensor:
    """``(count, 1)`` prompts of one token each, drawn uniformly (seeded) from the vocabulary less its special
    tokens: the teacher then writes about whatever that token starts (LLM-QAT's data-free generation)."""
    vocabulary = torch.ones(len(tokenizer), dtype=torch.bool)
    vocabulary[[i for i in tokenizer.all_special_ids if i < len(vocabulary)]] = False
    ids = vocabulary.nonzero().squeeze(1)
    picks = torch.randint(len(ids), (count,), generator=torch.Generator().manual_seed(seed))
    return ids[picks][:, None]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a sample: the model's generation config may name several (chat models), and
    the tokenizer's EOS is the one tokenize_blocks writes."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def truncate_at_eos(tokens: torch.Tensor, eos_ids: list[int]) -> list[list[int]]:
    """Each row of ``tokens`` up to (not including) its first EOS: the decode loop keeps stepping every
    row to the end, so whatever follows a row's EOS is not part of the sample."""
    if not eos_ids:
        return tokens.tolist()
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, dtype=tokens.dtype))
    lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), tokens.shape[1])
    return [row[:length] for row, length in zip(tokens.tolist(), lengths.tolist())]


def _generate_with_transformers(teacher, tokenizer, config: GenerateSource, *, seed: int, device,
                                prompt_ids: torch.Tensor | None, eos_ids: list[int]) -> list[str]:
    """transformers' generate(): the path for padded prompt lists, and the reference for the decode loop."""
    from bitconvert.utils.progress import Progress

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    texts: list[str] = []
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    batches = batch_count(config)
    progress = Progress(total_steps=batches, desc="sampling teacher text")
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for batch in range(batches):
            if prompt_ids is not None:
                ids = _batch_prompts(prompt_ids, batch, config.batch_size).to(device)
                inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            elif config.prompts:
                prompts = [config.prompts[(batch * config.batch_size + i) % len(config.prompts)]
                           for i in range(config.batch_size)]
                inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
            else:
                ids = torch.full((config.batch_size, 1), start, dtype=torch.long, device=device)
                inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            # eos_ids, even empty (a chat row ends nowhere), not None: None may mean the generation config's EOS
            out = teacher.generate(**inputs, do_sample=True, temperature=config.temperature, top_p=config.top_p,
                                   max_new_tokens=config.sequence_length, min_new_tokens=config.sequence_length // 4,
                                   eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
            # Special tokens go (start token, EOS, the padding after it), except a conversation's turn markers:
            # tokenize_blocks closes each document with one EOS of its own.
            if config.chat:  # the turn markers stay, and whatever generate() padded after a row's end goes
                width = inputs["input_ids"].shape[1]
                out = [p + n for p, n in zip(out[:, :width].tolist(), truncate_at_eos(out[:, width:].cpu(), eos_ids))]
            texts.extend(tokenizer.batch_decode(out, skip_special_tokens=not config.chat,
                                                clean_up_tokenization_spaces=False))
            progress.update(batch + 1, (batch + 1) * config.batch_size * config.sequence_length, 0.0)
    finally:
        tokenizer.padding_side = previous_side
        progress.close()
        torch.random.set_rng_state(generator_state)
    return texts


# --------------------------------------------------------------------------- the decode loop

@dataclass
class SampledTokens:
    tokens: torch.Tensor  # (batch, new_tokens) on the model's device; rows run on past their first EOS
    used_cuda_graph: bool  # False when graphs were off, unavailable, or fell back to eager


def nucleus_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Exact top-p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
    (transformers' TopPLogitsWarper, tie-breaking included); the rest become -inf. No host sync."""
    if top_p >= 1.0:
        return scores
    ascending, order = torch.sort(scores, dim=-1, descending=False)
    drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    drop_sorted[..., -1:] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, new_index: int, *, min_new_tokens: int, eos_ids: torch.Tensor,
                temperature: float, top_k: int, top_p: float, greedy: bool,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from last-position logits ``(batch, vocab)``, all on the device.

    generate()'s order: EOS suppression (min_new_tokens), temperature, top-k, top-p. The draw is the
    exponential race, argmax(p / E) with E ~ Exp(1), which picks token i with probability p_i exactly
    as multinomial does, but never waits for the host.
    """
    scores = logits.to(torch.float32, copy=True)
    if new_index < min_new_tokens and eos_ids.numel():
        scores.index_fill_(-1, eos_ids, float("-inf"))
    if greedy:
        return scores.argmax(dim=-1)
    scores = scores / temperature
    candidates = None
    if 0 < top_k < scores.shape[-1]:
        # top-p within the k best equals top-p over the top-k-masked vocabulary, and sorts k values, not
        # the vocabulary (ties at the k-th value keep exactly k tokens, where generate() keeps them all)
        scores, candidates = torch.topk(scores, top_k, dim=-1)
    probs = nucleus_filter(scores, top_p).softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(torch.float32).tiny)
    choice = (probs / race).argmax(dim=-1)
    return choice if candidates is None else candidates.gather(-1, choice[:, None]).squeeze(-1)


GENERATE_DEFAULT_TOP_K = 50


def generation_top_k(model) -> int:
    """The top-k that generate() applies to this model: its generation config's, else transformers'
    default of 50. Every teacher text before the decode loop was sampled under it."""
    configured = getattr(getattr(model, "generation_config", None), "top_k", None)
    return GENERATE_DEFAULT_TOP_K if configured is None else int(configured)


# Eager decode steps before capture: cuBLAS handles, workspaces and any lazy initialisation happen
# outside the graph, as PyTorch's CUDA-graph notes require.
GRAPH_WARMUP_STEPS = 2
GRAPH_TOLERANCE = 0.05  # relative L2 distance between replayed and eager logits at a checked step


class GraphUnsupported(RuntimeError):
    """This model's decode step cannot be captured faithfully; decode eagerly."""


class GraphMismatch(RuntimeError):
    """The captured decode step disagreed with the eager one."""


@dataclass(frozen=True)
class SamplingRule:
    """How the next token is chosen (generate()'s settings of the same names)."""

    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    greedy: bool = False


@torch.no_grad()
def sample_continuations(model, prompt_ids: torch.Tensor, *, new_tokens: int, min_new_tokens: int = 0,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_ids=(),
                         greedy: bool = False, seed: int = 0, cuda_graph: bool = True) -> SampledTokens:
    """``new_tokens`` sampled tokens for every row of equal-length prompts ``(batch, prompt_length)``.

    transformers' StaticCache holds keys and values at fixed addresses, so a decode step costs the
    same at every position, allocates nothing, and can be captured in a CUDA graph (on CUDA, when
    ``cuda_graph``; any failure falls back to eager decoding with a warning). The model runs in its
    own dtype under no_grad. Rows are never stopped early (that would need a host sync per step):
    EOS is suppressed for the first ``min_new_tokens`` tokens, and :func:`truncate_at_eos` cuts each
    row after it. Deterministic for a given seed on a given device; ``greedy`` takes the argmax.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
    rule = SamplingRule(min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_ids=tuple(sorted(set(eos_token_ids))), greedy=greedy)
    with decode_attention(model):  # one query token a step: keys and values read once, never copied
        if cuda_graph and prompt_ids.device.type == "cuda" and new_tokens > GRAPH_WARMUP_STEPS + 2:
            try:
                return SampledTokens(_decode(model, prompt_ids, new_tokens, rule, seed, graph=True),
                                     used_cuda_graph=True)
            except GraphUnsupported as why:
                log.info("CUDA graph off for teacher sampling (%s); decoding eagerly", why)
            except Exception as err:  # capture is fragile across models and versions; eager is always right
                log.warning("CUDA graph for teacher sampling failed (%s: %s); sampling this batch again eagerly",
                            type(err).__name__, err)
        # A fresh cache and generator: the same tokens as if graphs had never been tried.
        return SampledTokens(_decode(model, prompt_ids, new_tokens, rule, seed, graph=False), used_cuda_graph=False)


def _decode(model, prompt_ids: torch.Tensor, new_tokens: int, rule: SamplingRule, seed: int, *,
            graph: bool) -> torch.Tensor:
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    batch, prompt_length = prompt_ids.shape
    device = prompt_ids.device
    cache = StaticCache(config=model.config, max_cache_len=prompt_length + new_tokens)
    keyword = cache_keyword(model.forward)
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def step(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, use_cache=True, **{keyword: cache}, **keep_last).logits[:, -1]

    generator = None if rule.greedy else torch.Generator(device=device).manual_seed(seed)
    eos_ids = torch.tensor(rule.eos_token_ids, dtype=torch.long, device=device)

    def pick(logits: torch.Tensor, new_index: int) -> torch.Tensor:
        return next_tokens(logits, new_index, min_new_tokens=rule.min_new_tokens, eos_ids=eos_ids,
                           temperature=rule.temperature, top_k=rule.top_k, top_p=rule.top_p, greedy=rule.greedy,
                           generator=generator)

    out = torch.empty((batch, new_tokens), dtype=torch.long, device=device)
    out[:, 0] = pick(step(prompt_ids), 0)  # prefill
    if not graph:
        for index in range(1, new_tokens):
            out[:, index] = pick(step(out[:, index - 1:index]), index)
        return out
    kinds = {type(layer) for layer in cache.layers}
    if kinds != {StaticLayer}:
        # e.g. sliding-window layers keep Python-side counters that a captured graph would freeze
        raise GraphUnsupported(f"cache layers {sorted(k.__name__ for k in kinds)}")
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for index in range(1, GRAPH_WARMUP_STEPS + 1):
            out[:, index] = pick(step(out[:, index - 1:index]), index)
    torch.cuda.current_stream(device).wait_stream(side)
    graphed = _GraphedStep(step, out[:, GRAPH_WARMUP_STEPS:GRAPH_WARMUP_STEPS + 1])
    checked = (GRAPH_WARMUP_STEPS + 1, new_tokens - 1)
    for index in range(GRAPH_WARMUP_STEPS + 1, new_tokens):
        ids = out[:, index - 1:index]
        # The first and the last replayed step are checked against eager: a graph that froze some
        # per-step state would disagree by the end.
        logits = _checked_replay(graphed, step, ids, cache) if index in checked else graphed(ids)
        out[:, index] = pick(logits, index)
    torch.cuda.current_stream(device).synchronize()  # an asynchronous failure surfaces here, inside the fallback
    return out


class _GraphedStep:
    """One decode step captured in a CUDA graph: fixed input and output buffers, replayed per token."""

    def __init__(self, step, example_ids: torch.Tensor):
        self.ids = example_ids.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records only: the cache does not advance here
            self.logits = step(self.ids)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits


def _checked_replay(graphed: _GraphedStep, step, ids: torch.Tensor, cache) -> torch.Tensor:
    """Run one position eagerly, rewind the cache's length counters, replay the graph for the same
    position (it rewrites the same key/value slot) and compare: one host sync."""
    counters = [layer.cumulative_length.clone() for layer in cache.layers]
    eager = step(ids).float()
    for layer, counter in zip(cache.layers, counters):
        layer.cumulative_length.copy_(counter)
    replayed = graphed(ids)
    # Relative to the logits' norm: bf16 rounding (or another GEMM algorithm under capture) moves
    # them by well under 1%; a graph replaying a stale position or state moves them by tens of %.
    error = ((replayed.float() - eager).norm() / eager.norm().clamp_min(1e-6)).item()
    if not error <= GRAPH_TOLERANCE:
        raise GraphMismatch(f"replayed decode step differs from eager by {error:.1%} (tolerance {GRAPH_TOLERANCE:.0%})")
    return replayed
