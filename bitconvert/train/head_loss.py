"""Distillation and cross-entropy straight from final hidden states, chunk by chunk over tokens.

The plain path materialises the logits of student and teacher (tokens x vocabulary, 16k x 49k for
SmolLM2 at batch 32 x 512) and keeps several float32 copies of them for the backward pass. Here the
language-model head is applied to a chunk of tokens at a time, the loss terms and their gradients
with respect to that chunk's logits are computed at once (``softmax_s - softmax_t`` and
``softmax - onehot``), and turned into gradients for the hidden states and the head weight before the
next chunk: no full-vocabulary tensor outlives its chunk. The gradients are computed in the forward
pass (that saves recomputing the logits), so the backward pass only scales them.

This applies to causal LMs whose logits are exactly ``final_hidden @ lm_head.weight.T``;
:func:`head_loss_support` checks a model and says why not when it does not.
"""

from __future__ import annotations

import contextlib
import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # as F.cross_entropy: targets equal to it count for nothing
CHUNK_ELEMENTS = 1 << 26  # logits per chunk (256 MiB in float32): a few such buffers live at a time

# Config keys of transformers models whose logits are not a plain product with the head weight
# (soft-capping, scaling). Not a complete list: the probe in head_loss_support catches the rest.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling",
                    "output_logits_scale", "logit_scale_init")


def default_chunk_tokens(vocab_size: int) -> int:
    """Rows per chunk: a power of two (it divides batch x tokens, so every chunk has one shape, which a
    compiled chunk function likes), at most CHUNK_ELEMENTS logits."""
    return max(64, 1 << (max(CHUNK_ELEMENTS // max(vocab_size, 1), 1).bit_length() - 1))


def chunk_terms(z: torch.Tensor, zt: torch.Tensor | None, targets: torch.Tensor, valid: torch.Tensor,
                temperature: float, kl_coef: float, ce_coef: torch.Tensor, ce_on: bool, want_grad: bool,
                grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk's ``(sum of KL terms, sum of CE terms, d loss / d logits)`` from its student logits ``z``
    (C, V) and teacher logits ``zt`` (None: no KL), both in the statistics dtype.

    ``targets`` and ``valid`` are (C, 1); ``kl_coef`` and ``ce_coef`` scale the two gradients (weight over
    row count, and T for the KL). Pure, so that it can be compiled into a few fused kernels.
    """
    distill = zt is not None
    ce_sum = kl_sum = z.new_zeros(())
    log_p = torch.log_softmax(z, dim=-1) if ce_on or (distill and temperature == 1) else None
    if ce_on:
        ce_sum = -(log_p.gather(1, targets) * valid).sum()
    if distill:
        log_ps = log_p if temperature == 1 else torch.log_softmax(z / temperature, dim=-1)
        log_pt = torch.log_softmax(zt / temperature if temperature != 1 else zt, dim=-1)
        p_t = log_pt.exp()
        kl_sum = log_pt.sub_(log_ps).mul_(p_t).sum()  # sum of p_t * (log p_t - log p_s)
        del log_pt
    if not want_grad:
        return kl_sum, ce_sum, None
    if distill:
        dz = log_ps.exp_()  # softmax(z / T); when T == 1 this is log_p's buffer, now softmax(z)
        if ce_on and temperature == 1:
            dz.mul_(kl_coef + ce_coef * valid)
        else:
            dz.mul_(kl_coef)
            if ce_on:
                dz.add_(log_p.exp_().mul_(ce_coef * valid))
        dz.sub_(p_t.mul_(kl_coef))
    else:
        dz = log_p.exp_().mul_(ce_coef * valid)
    if ce_on:  # minus the one-hot of the target, in rows that have one
        dz.scatter_add_(1, targets, (-ce_coef * valid).to(dz.dtype))
    return kl_sum, ce_sum, dz.to(grad_dtype)


_compiled_chunk_terms = None


def compiled_chunk_terms():
    """:func:`chunk_terms` torch.compiled (static shapes: a full chunk and the last one), made once."""
    global _compiled_chunk_terms
    if _compiled_chunk_terms is None:
        _compiled_chunk_terms = torch.compile(chunk_terms, dynamic=False)
    return _compiled_chunk_terms


class _HeadDistillation(torch.autograd.Function):
    """``kl_weight * KL(teacher || student) * T² + ce_weight * CE`` from the student's final hidden states.

    Inputs are flattened to rows: ``hidden`` (N, H), ``weight`` (V, H), ``targets`` (N,) with
    IGNORE_INDEX where a row has no next token. The teacher is either ``teacher_hidden`` (N, Ht) with
    ``teacher_weight`` (V, Ht) or ``teacher_logits`` (N, V); with ``kl_weight == 0`` it may be absent.
    Returns the weighted loss (differentiable) and the unweighted KL and CE (for logging).
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, teacher_logits, targets, temperature: float,
                kl_weight: float, ce_weight: float, chunk_tokens: int, dtype: torch.dtype, teacher_dtype: torch.dtype,
                want_grad: bool, compiled: bool):
        rows = hidden.shape[0]
        math_dtype = torch.promote_types(dtype, torch.float32)  # softmax statistics: float32, or float64 in tests
        distill = kl_weight > 0
        terms = compiled_chunk_terms() if compiled else chunk_terms
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            wt = teacher_weight.to(teacher_dtype) if distill and teacher_logits is None else None
            valid = targets != IGNORE_INDEX
            ce_rows = valid.sum().clamp(min=1).to(math_dtype)
            # d(loss)/d(logits) = kl_coef * (softmax(z/T) - softmax(t/T)) + ce_coef * (softmax(z) - onehot)
            kl_coef = kl_weight * temperature / rows
            ce_coef = ce_weight / ce_rows
            kl_sum = torch.zeros((), device=hidden.device, dtype=math_dtype)
            ce_sum = torch.zeros((), device=hidden.device, dtype=math_dtype)
            grad_hidden = torch.empty_like(hidden) if want_grad else None
            grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=math_dtype) if want_grad else None
            for start in range(0, rows, chunk_tokens):
                end = min(start + chunk_tokens, rows)
                h = hidden[start:end].to(dtype)
                z = (h @ w.t()).to(math_dtype)  # this chunk's logits (C, V)
                zt = None
                if distill and teacher_logits is not None:
                    zt = teacher_logits[start:end].to(math_dtype)
                elif distill:
                    zt = (teacher_hidden[start:end].to(teacher_dtype) @ wt.t()).to(math_dtype)
                kl_part, ce_part, dz = terms(z, zt, targets[start:end].clamp(min=0).unsqueeze(1),
                                             valid[start:end].unsqueeze(1), temperature, kl_coef, ce_coef,
                                             ce_weight > 0, want_grad, dtype)
                del z, zt
                kl_sum += kl_part
                ce_sum += ce_part
                if want_grad:
                    grad_hidden[start:end] = (dz @ w).to(hidden.dtype)
                    grad_weight += (dz.t() @ h).to(math_dtype)
                del dz
        kl = kl_sum / rows * temperature**2
        ce = ce_sum / ce_rows
        loss = kl_weight * kl + ce_weight * ce
        ctx.want_grad = want_grad
        if want_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        none = (None,) * 12
        if not ctx.want_grad:
            return (None, None) + none
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype)) + none


def head_losses(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor, *,
                teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                teacher_logits: torch.Tensor | None = None, temperature: float = 1.0, kl_weight: float = 1.0,
                ce_weight: float = 0.0, chunk_tokens: int | None = None, dtype: torch.dtype | None = None,
                teacher_dtype: torch.dtype | None = None, compiled: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, kl, ce)`` of one batch from final hidden states (batch, tokens, hidden) and head weights.

    ``kl`` equals :func:`bitconvert.train.losses.logit_kl` of the logits (every position, times T²),
    ``ce`` equals :func:`~bitconvert.train.losses.next_token_ce` (positions with a next token);
    ``loss = kl_weight * kl + ce_weight * ce`` is the one that carries gradients, to ``hidden`` and
    ``weight`` (a tied embedding gets its share through it). ``dtype`` is what the head's products run
    in (the autocast dtype, as the model's own head would); statistics are float32 at least.
    ``compiled`` runs each chunk's softmax arithmetic as one torch.compiled function (a few fused
    kernels instead of a dozen passes over the chunk's logits).
    """
    if kl_weight > 0 and teacher_logits is None and (teacher_hidden is None or teacher_weight is None):
        raise ValueError("the KL term needs teacher_logits or teacher_hidden with teacher_weight")
    if not (kl_weight > 0 or ce_weight > 0):
        raise ValueError("kl_weight and ce_weight are both 0: nothing to compute")
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    flat = hidden.flatten(0, -2)
    vocab = weight.shape[0]
    return _HeadDistillation.apply(
        flat, weight,
        teacher_hidden.flatten(0, -2) if teacher_hidden is not None else None, teacher_weight,
        teacher_logits.flatten(0, -2) if teacher_logits is not None else None, targets.flatten(),
        float(temperature), float(kl_weight), float(ce_weight), int(chunk_tokens or default_chunk_tokens(vocab)),
        dtype or flat.dtype, teacher_dtype or (teacher_hidden.dtype if teacher_hidden is not None else flat.dtype),
        torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad), compiled)


# --------------------------------------------------------------------------- the model side

class FinalHidden(contextlib.AbstractContextManager):
    """Keeps the base model's last hidden state (after the final norm) of each forward pass while the
    context is open, and the dtype the head would have multiplied it in (autocast's, when on).

    The hook stays registered for the whole context, not per step: adding and removing hooks would make a
    compiled model recompile. Call the model with :func:`no_logits` so that its head computes nothing.
    """

    def __init__(self, model: nn.Module):
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        self.hidden: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None
        self._handle = None

    def _hook(self, module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        device = hidden.device.type
        self.hidden = hidden
        self.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.head.weight.dtype

    def take(self) -> tuple[torch.Tensor, torch.dtype]:
        """The last forward pass's hidden state and head dtype; forgets them (the tensor holds a graph)."""
        if self.hidden is None:
            raise RuntimeError(f"no forward pass of {type(self.base).__name__} was seen since the last take()")
        hidden, self.hidden = self.hidden, None
        return hidden, self.dtype

    def __enter__(self) -> "FinalHidden":
        self.hidden = None
        self._handle = self.base.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None
        self.hidden = None


def no_logits(input_ids: torch.Tensor) -> torch.Tensor:
    """``logits_to_keep`` that keeps no position: the head multiplies an empty slice."""
    return torch.zeros(0, dtype=torch.long, device=input_ids.device)


def head_loss_support(model: nn.Module, probe_ids: torch.Tensor | None = None) -> str | None:
    """None when the chunked head loss computes this model's logits exactly; otherwise the reason.

    The structure is checked first (a plain linear head without bias, a separate base model, a forward
    taking ``logits_to_keep``, no logit soft-capping or scaling in the config); then, given
    ``probe_ids`` (1, tokens), one small forward pass compares the model's logits with the head applied
    to the captured hidden states, which catches transforms that no config key names.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return f"the output head is {type(head).__name__}, not a plain nn.Linear"
    if head.bias is not None:
        return "the output head has a bias"
    base = getattr(model, "base_model", model)
    if base is model:
        return "no separate base model to take the final hidden states from"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward takes no logits_to_keep"
    configs = [getattr(model, "config", None)]
    configs.append(getattr(configs[0], "text_config", None))
    for config in filter(None, configs):
        for key in LOGIT_TRANSFORMS:
            value = getattr(config, key, None)
            if value not in (None, 0, 1, 1.0, False):
                return f"config.{key} = {value!r} transforms the logits"
    if probe_ids is None:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FinalHidden(model) as final:
            full = model(input_ids=probe_ids, use_cache=False).logits
            empty = model(input_ids=probe_ids, use_cache=False, logits_to_keep=no_logits(probe_ids)).logits
            if final.hidden is None:
                return "the base model's forward hook saw no hidden states"
            hidden, dtype = final.take()
            mine = F.linear(hidden.to(dtype), head.weight.to(dtype)).float()
        if empty.numel() != 0:
            return "the model computes logits despite logits_to_keep"
    finally:
        model.train(was_training)
    full = full.float()
    if mine.shape != full.shape or not torch.allclose(mine, full, rtol=2e-2, atol=2e-2 * full.abs().max().item()):
        return "its logits are not final_hidden @ lm_head.weight.T (a transform in the model's forward)"
    return None


class ChunkedHead(contextlib.AbstractContextManager):
    """The final hidden states that :func:`head_losses` needs: the student's, and the teacher's when its
    head allows (``teacher`` None: the teacher's full logits are used instead). Open for a whole run.
    ``compiled``: the per-chunk arithmetic runs torch.compiled."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, compiled: bool = False):
        self.compiled = compiled
        self.student = FinalHidden(student)
        self.teacher = FinalHidden(teacher) if teacher is not None else None

    def __enter__(self) -> "ChunkedHead":
        self.student.__enter__()
        if self.teacher is not None:
            self.teacher.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.student.__exit__(*exc)
        if self.teacher is not None:
            self.teacher.__exit__(*exc)
