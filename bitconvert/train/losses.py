"""Training objectives: next-token cross-entropy, logit distillation, hidden-state distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
