"""Training objectives: next-token cross-entropy, logit distillation, hidden-state distillation and
attention-relation distillation."""

from __future__ import annotations

import contextlib
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
             chunk_tokens: int = 4096) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of temperature-softened distributions, times T².

    Computed in float32 over chunks of tokens, so that a large vocabulary never needs several
    full float32 copies of the logits at once.
    """
    s = student_logits.flatten(0, -2)
    t = teacher_logits.flatten(0, -2)
    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, s.shape[0], chunk_tokens):
        log_p_s = F.log_softmax(s[start:start + chunk_tokens].float() / temperature, dim=-1)
        log_p_t = F.log_softmax(t[start:start + chunk_tokens].float() / temperature, dim=-1)
        total = total + F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")
    return total / s.shape[0] * temperature**2


def hidden_mse(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over layers of the MSE between RMS-normalised hidden states (scale-free, as in BitDistill)."""
    losses = []
    for s, t in zip(student_hidden[1:], teacher_hidden[1:]):
        s32, t32 = s.float(), t.float()
        s32 = s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + 1e-6)
        t32 = t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + 1e-6)
        losses.append(F.mse_loss(s32, t32))
    return torch.stack(losses).mean()


class AttentionInputs(contextlib.AbstractContextManager):
    """The query, key and value projections' outputs of one decoder layer, captured by forward hooks
    while the context is open (``.states``: (q, k, v), each (batch, tokens, width)); ``.head_dim`` is
    that layer's attention head size.

    ``layer`` counts from 0; negative counts from the end. Models whose blocks have no
    ``layers.N.self_attn`` with ``{q,k,v}_proj`` and ``head_dim`` (Llama, Mistral, Qwen, Gemma and their
    kin have them) get a clear error rather than a silent zero loss.
    """

    def __init__(self, model: nn.Module, layer: int):
        found: dict[int, nn.Module] = {}
        for name, module in model.named_modules():
            hit = re.search(r"layers\.(\d+)\.self_attn$", name)
            if hit and all(isinstance(getattr(module, p, None), nn.Module) for p in PROJECTIONS):
                found[int(hit.group(1))] = module
        if not found:
            raise ValueError("attention-relation distillation needs decoder layers with self_attn.q_proj, "
                             "k_proj and v_proj; this model has none (set train.loss.attention to 0)")
        count = max(found) + 1
        index = layer + count if layer < 0 else layer
        if index not in found:
            raise ValueError(f"train.loss.attention_layer {layer} is not one of this model's {count} decoder layers "
                             f"with q/k/v projections")
        attention = found[index]
        if not isinstance(getattr(attention, "head_dim", None), int):
            raise ValueError(f"layer {index}'s self_attn does not say its head_dim; attention-relation "
                             "distillation cannot split its projections into heads")
        self.head_dim = attention.head_dim
        self.modules = [getattr(attention, name) for name in PROJECTIONS]
        self.layer = index
        self.states: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> "AttentionInputs":
        self.states = [None] * len(self.modules)

        def keep(slot):
            def hook(module, args, output):
                self.states[slot] = output
            return hook

        self._handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def attention_relation_kl(student: list[torch.Tensor], teacher: list[torch.Tensor], head_dim: int) -> torch.Tensor:
    """MiniLM's self-attention relation distillation (BitDistill uses it at one layer), causal.

    For each of the query, key and value states, split into heads of ``head_dim``, the relation of a
    token to the tokens up to it is ``softmax(a_i · a_j / sqrt(head_dim))`` over j <= i; the loss is
    the mean over Q, K, V, heads and tokens of KL(teacher's relation || student's). It matches how
    tokens relate to each other rather than the vectors themselves; the two models need the same
    number of heads of each kind.
    """
    terms = []
    for s, t in zip(student, teacher):
        batch, tokens, width = s.shape
        heads = width // head_dim
        s = s.float().reshape(batch, tokens, heads, head_dim).transpose(1, 2)
        t = t.float().reshape(batch, tokens, heads, head_dim).transpose(1, 2)
        future = torch.ones(tokens, tokens, dtype=torch.bool, device=s.device).triu(1)

        def log_relations(a):
            scores = (a @ a.transpose(-1, -2)) / math.sqrt(head_dim)
            return F.log_softmax(scores.masked_fill(future, float("-inf")), dim=-1)

        log_s, log_t = log_relations(s), log_relations(t)
        # masked entries are -inf in both: kl_div would give nan for them, so they are left out by hand
        kl = (log_t.exp() * (log_t - log_s)).masked_fill(future, 0.0).sum(-1)
        terms.append(kl.mean())
    return torch.stack(terms).mean()
