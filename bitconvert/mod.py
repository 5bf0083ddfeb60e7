"""Mixture-of-Depths (Raposo et al. 2024): route only some tokens through every other decoder block.

A routed block scores each token with a linear router. In training, the top ``capacity`` share of
each sequence's tokens (by router score) go through the block and the rest skip it on the residual
stream; the block's update is multiplied by a gate carrying the router score, so the language-model
loss teaches the router which tokens benefit. Top-k over a sequence looks at future tokens, which
decoding cannot, so a causal decision is trained beside it (the paper's first fix): a binary
cross-entropy loss teaches the router logit itself (``decision: router``), or a small MLP
predictor on the detached input (``decision: predictor``), to say whether a token would be in the
top-k. Outside training, each token goes through the block exactly when that logit is above 0:
no future tokens are needed, and a KV cache holds only the tokens that went through.

Installation keeps module names unchanged: each routed block keeps its own class as a base (a
generated subclass ``Routed<Block>`` overrides ``forward``) and gains a ``mod_router`` child. So
state-dict keys, skip lists, export name maps and transformers' per-layer output hooks see the
same model as before, plus ``<block>.mod_router.*`` parameters.

Gate: the block's update enters as ``x + g · f(x)`` with ``g = 1 + r - stopgrad(r)``: its value is 1,
so a pretrained block's output is unchanged for the tokens it processes, and its gradient with
respect to the router logit ``r`` is that of the paper's ``r · f(x)``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class MoDConfig(BaseModel):
    """Which blocks are routed, how many tokens they take, and how the causal decision is learned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    every: int = Field(default=2, ge=1, description="route every N-th block (blocks N-1, 2N-1, ...; block 0 never)")
    capacity: float = Field(default=0.125, gt=0, le=1, description="share of each sequence's tokens a routed block processes in training")
    aux_weight: float = Field(default=0.01, ge=0, description="weight of the mean causal-decision BCE over routed blocks")
    decision: Literal["router", "predictor"] = Field(
        default="router", description="what decides per token at inference: the router logit, or a small MLP predictor")
    predictor_hidden: int = Field(default=128, gt=0, description="hidden width of the predictor MLP")
    capacity_warmup: float = Field(
        default=0.5, ge=0, le=1,
        description="share of the training budget over which the training capacity falls geometrically from 1 "
                    "(every token: the pretrained model unchanged) to capacity; 0 = capacity from the first step")


class MixtureOfDepthsError(ValueError):
    """A model or call that Mixture-of-Depths routing cannot handle."""


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMS normalisation in float32: router scores should not depend on the scale of
    the residual stream, which grows with depth."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)


class DepthRouter(nn.Module):
    """The router of one block: a linear score per token, optionally an MLP that predicts top-k
    membership. Parameters are raw tensors (not nn.Linear children) so that conversion to BitLinear
    never touches them, and they stay in float32."""

    def __init__(self, hidden: int, config: MoDConfig, routed_blocks: int, device=None):
        super().__init__()
        self.config = config
        self.routed_blocks = routed_blocks
        # Training capacity now; the training loop anneals it to config.capacity (capacity_schedule).
        self.capacity = config.capacity
        self.weight = nn.Parameter(torch.randn(1, hidden, device=device) * hidden ** -0.5)
        # Start at the logit of the capacity, so that the causal decision selects about that share.
        self.bias = nn.Parameter(torch.full((1,), math.log(config.capacity / (1 - config.capacity))
                                            if config.capacity < 1 else 4.0, device=device))
        if config.decision == "predictor":
            width = config.predictor_hidden
            self.predictor_in = nn.Parameter(torch.randn(width, hidden, device=device) * hidden ** -0.5)
            self.predictor_in_bias = nn.Parameter(torch.zeros(width, device=device))
            self.predictor_out = nn.Parameter(torch.randn(1, width, device=device) * width ** -0.5)
            self.predictor_out_bias = nn.Parameter(self.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits, (batch, seq), float32."""
        return F.linear(_rms(x), self.weight.float(), self.bias.float()).squeeze(-1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the causal decision, (batch, seq). Input detached: learning to predict the
        routing must not change the representations being routed."""
        if self.config.decision == "router":
            return F.linear(_rms(x.detach()), self.weight.float(), self.bias.float()).squeeze(-1)
        h = F.silu(F.linear(_rms(x.detach()), self.predictor_in.float(), self.predictor_in_bias.float()))
        return F.linear(h, self.predictor_out.float(), self.predictor_out_bias.float()).squeeze(-1)


# --------------------------------------------------------------------------- selection and masks (pure)

def capacity_schedule(config: MoDConfig, progress: float) -> float:
    """Training capacity at ``progress`` (0 -> 1) of the budget: ``capacity ** (progress / capacity_warmup)``,
    i.e. 1 at the start and ``capacity`` from ``capacity_warmup`` on. Routing a pretrained model's
    blocks at 12.5% from step 0 wrecks it (SmolLM2-135M: loss 2.96 -> 12.4 before any training,
    and it never recovers); a gradual fall lets the blocks and routers adapt. Geometric, because the
    damage grows as the capacity halves, not as it falls by a fixed amount."""
    if config.capacity_warmup == 0 or progress >= config.capacity_warmup:
        return config.capacity
    return config.capacity ** (max(progress, 0.0) / config.capacity_warmup)


def set_mod_capacity(model: nn.Module, capacity: float) -> None:
    """Set the training capacity of every routed block (the loop calls this each step)."""
    for block in routed_blocks(model).values():
        block.mod_router.capacity = capacity


def decision_threshold(decision: torch.Tensor, chosen: int) -> torch.Tensor:
    """The logit above which ``chosen`` of the decision logits lie (midway between the two
    neighbours), so that "logit > threshold" picks as many tokens as top-k did."""
    flat = decision.flatten()
    if chosen >= flat.numel():
        return flat.min() - 1.0
    top = flat.topk(chosen + 1).values
    return (top[-1] + top[-2]) / 2 if chosen > 0 else top[0] + 1.0


# Share of the measured threshold moved into the decision bias per step: an average over about
# ten batches, steady as the capacity warmup moves the target.
DECISION_CALIBRATION_RATE = 0.1


@torch.no_grad()
def calibrate_decisions(model: nn.Module, reduce=None, rate: float = DECISION_CALIBRATION_RATE) -> None:
    """Move each routed block's decision bias so that "logit > 0" routes the training capacity.

    The BCE alone does not get there: under Adam a bias moves about ``lr`` per step, and the
    300-step SmolLM2 benchmark ended routing 0-6% in some blocks and 50-74% in others at 12.5%
    capacity. The bias shifts every token's logit alike, which neither top-k nor the centred gate
    sees, so this calibrates the inference decision without touching training. ``reduce``
    (e.g. a mean over processes) keeps data-parallel replicas identical.
    """
    blocks = [b for b in routed_blocks(model).values() if getattr(b, "mod_decision_shift", None) is not None]
    if not blocks:
        return
    shifts = torch.stack([b.mod_decision_shift.float() for b in blocks])
    shifts = reduce(shifts) if reduce is not None else shifts
    for block, shift in zip(blocks, shifts):
        router = block.mod_router
        bias = router.bias if router.config.decision == "router" else router.predictor_out_bias
        if bias.numel():  # an FSDP shard may hold none of it
            bias.data -= rate * shift.to(bias.device, bias.dtype)
        block.mod_decision_shift = None


def topk_tokens(logits: torch.Tensor, capacity: float) -> torch.Tensor:
    """Indices (batch, k) of the top ``ceil(capacity · seq)`` tokens per row, in position order."""
    k = max(1, min(logits.shape[1], math.ceil(capacity * logits.shape[1])))
    return logits.topk(k, dim=1).indices.sort(dim=1).values


def chosen_tokens(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For a (batch, seq) bool mask: indices (batch, kmax) of the chosen tokens in position order,
    padded with unchosen positions, and a (batch, kmax) validity mask (None when nothing is padded)."""
    batch, seq = chosen.shape
    positions = torch.arange(seq, device=chosen.device)
    order = torch.argsort((~chosen).long() * seq + positions, dim=1)  # chosen first, each group in order
    counts = chosen.sum(dim=1)
    kmax = int(counts.max())
    valid = torch.arange(kmax, device=chosen.device) < counts.unsqueeze(1)
    return order[:, :kmax], (None if bool(valid.all()) else valid)


def _gather_seq(t: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather ``idx`` (batch, k) along the sequence dimension ``dim`` of ``t`` (batch may be 1)."""
    t = t.expand(idx.shape[0], *t.shape[1:]) if t.shape[0] == 1 and idx.shape[0] > 1 else t
    shape = [idx.shape[0]] + [1] * (t.ndim - 1)
    shape[dim] = idx.shape[1]
    index = idx.reshape(shape).expand(*[s if d != dim else idx.shape[1] for d, s in enumerate(t.shape)])
    return t.gather(dim, index)


def _causal_mask(queries: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor | None, past: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """Additive float mask (batch, 1, q, past + k): every cached key, plus the new keys at earlier
    or equal positions that are valid. A query always sees itself, so no row is fully masked."""
    allowed = keys.unsqueeze(1) <= queries.unsqueeze(2)
    if key_valid is not None:
        allowed &= key_valid.unsqueeze(1)
    allowed |= torch.eye(queries.shape[1], dtype=torch.bool, device=queries.device)
    if past:
        allowed = torch.cat([allowed.new_ones(*allowed.shape[:2], past), allowed], dim=2)
    zero = torch.zeros((), dtype=dtype, device=queries.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min).unsqueeze(1)


def _select_mask(mask: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The rows and columns of a (batch|1, heads|1, seq, seq) mask for the selected tokens."""
    sub = _gather_seq(_gather_seq(mask, idx, dim=2), idx, dim=3)
    eye = torch.eye(idx.shape[1], dtype=torch.bool, device=idx.device)
    if mask.dtype == torch.bool:
        if valid is not None:
            sub = sub & valid[:, None, None, :]
        return sub | eye
    if valid is not None:
        sub = sub.masked_fill(~valid[:, None, None, :], torch.finfo(sub.dtype).min)
    return sub.masked_fill(eye, 0)


# --------------------------------------------------------------------------- the routed block

class RoutedBlock:
    """Mixin that turns a decoder block into a routed one (see the module docstring)."""

    routed_base: type  # the block class this one extends; set on each generated subclass
    mod_router: DepthRouter
    mod_layer_idx: int
    mod_model_config: Any  # the model's config, read for the attention implementation in use
    aux_loss: torch.Tensor | None
    mod_decision_shift: torch.Tensor | None  # threshold that matched top-k in the last training forward
    mod_last_fraction: float

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        base_forward = super().forward  # the block's own forward (transformers may wrap it for checkpointing)
        signature = inspect.signature(self.routed_base.forward)
        bound = signature.bind(self, hidden_states, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        params = list(signature.parameters.values())
        extra = next((arguments[p.name] for p in params if p.kind is p.VAR_KEYWORD), {})

        def get(name):
            return arguments[name] if name in arguments else extra.get(name)

        def put(name, value):
            if name in arguments:
                arguments[name] = value
            elif name in extra or value is not None:
                extra[name] = value

        batch, seq = hidden_states.shape[:2]
        router = self.mod_router
        logits = router(hidden_states)
        # transformers renamed the decoder layers' cache argument (past_key_values, then cache in 5.2x)
        cache_key = next((k for k in ("cache", "past_key_values") if k in signature.parameters or k in extra),
                         "past_key_values")
        cache = get(cache_key)
        past = cache.get_seq_length(self.mod_layer_idx) if cache is not None else 0
        if router.training:  # the router's own flag: fine-tuning can keep inference routing while the rest trains
            idx, valid = topk_tokens(logits, router.capacity), None
            targets = torch.zeros_like(logits).scatter_(1, idx, 1.0)
            decision = router.predict(hidden_states)
            bce = F.binary_cross_entropy_with_logits(decision, targets)
            self.aux_loss = bce * (router.config.aux_weight / router.routed_blocks)
            self.mod_decision_shift = decision_threshold(decision.detach(), idx.numel())
        else:
            self.aux_loss = None
            idx, valid = chosen_tokens(router.predict(hidden_states) > 0)
        self.mod_last_fraction = (idx.numel() if valid is None else int(valid.sum())) / (batch * seq)
        if idx.shape[1] == 0:  # nothing goes through: the block is skipped, its cache untouched
            return hidden_states

        # Block 0 is never routed and has already cached this call's tokens: more than that means decoding.
        if cache is not None and batch > 1 and (past > 0 or cache.get_seq_length(0) > seq):
            raise MixtureOfDepthsError("Mixture-of-Depths decoding with a KV cache supports batch size 1 "
                                       "(each sequence routes different tokens, so their caches differ in length)")
        if cache is not None and batch > 1:
            put(cache_key, None)  # one-shot forward of a batch: nothing is decoded after it
            past = 0

        sub = _gather_seq(hidden_states, idx)
        positions = get("position_ids")
        if isinstance(positions, torch.Tensor) and positions.ndim == 2 and positions.shape[1] == seq:
            put("position_ids", _gather_seq(positions, idx))
        embeddings = get("position_embeddings")
        if isinstance(embeddings, tuple) and embeddings and embeddings[0].shape[1] == seq:
            put("position_embeddings", tuple(_gather_seq(e, idx) for e in embeddings))
        mask = get("attention_mask")
        attn_implementation = getattr(self.mod_model_config, "_attn_implementation", None) or ""
        flash = attn_implementation.startswith("flash")
        if flash and (valid is not None or (isinstance(mask, torch.Tensor) and mask.ndim == 2 and not bool(mask.all()))):
            raise MixtureOfDepthsError("Mixture-of-Depths with flash attention needs unpadded batches")
        if flash:
            mask = None  # flash attention aligns causal masks bottom-right, which is what the cache needs
        elif isinstance(mask, torch.Tensor) and mask.ndim == 4 and past == 0 and mask.shape[-1] == seq:
            mask = _select_mask(mask, idx, valid)
        elif mask is None and past == 0 and valid is None and attn_implementation != "eager":
            mask = None  # plain causal attention over the selected tokens, in position order
        else:
            mask = _causal_mask(idx, idx, valid, past, sub.dtype if sub.is_floating_point() else torch.float32)
        put("attention_mask", mask)

        arguments[params[1].name] = sub
        out = base_forward(*bound.args[1:], **bound.kwargs)
        first = out[0] if isinstance(out, tuple) else out
        # Centred over the sequence: top-k only ranks, so the language-model loss may only move the
        # logits relative to each other. Uncentred, its gradient shifts all logits of a block
        # together (through the bias and the residual stream's common direction), far more than the
        # decision loss does, and the causal threshold (logit > 0) ends up routing 0% or 70%.
        gate = (logits - logits.mean(dim=1, keepdim=True)).gather(1, idx)
        gate = (1.0 + gate - gate.detach()).unsqueeze(-1)
        update = (first - sub) * gate.to(first.dtype)
        if valid is not None:
            update = update * valid.unsqueeze(-1).to(update.dtype)
        index = idx.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
        result = hidden_states + torch.zeros_like(hidden_states).scatter_add(1, index, update.to(hidden_states.dtype))
        return (result, *out[1:]) if isinstance(out, tuple) else result


_ROUTED_CLASSES: dict[type, type] = {}


def routed_class(block_class: type) -> type:
    """``Routed<Block>``: the block's class with :class:`RoutedBlock`'s forward in front."""
    if issubclass(block_class, RoutedBlock):
        return block_class
    if block_class not in _ROUTED_CLASSES:
        name = f"Routed{block_class.__name__}"
        routed = type(name, (RoutedBlock, block_class), {"routed_base": block_class, "__module__": __name__,
                                                         "__qualname__": name})
        globals()[name] = routed  # findable by name, so pickling a routed model works
        _ROUTED_CLASSES[block_class] = routed
    return _ROUTED_CLASSES[block_class]


def routed_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The routed blocks of a model, by name (empty when Mixture-of-Depths is not installed)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RoutedBlock)}


def mod_config(model: nn.Module) -> MoDConfig | None:
    blocks = routed_blocks(model)
    return next(iter(blocks.values())).mod_router.config if blocks else None


def install_mixture_of_depths(model: nn.Module, config: MoDConfig | dict) -> list[str]:
    """Route every ``config.every``-th decoder block of ``model`` in place; returns the routed names.

    Works on a full-precision, converted (BitLinear) or packed model alike, and on the meta device
    (the loader installs routers before weights are read).
    """
    from bitconvert.convert import find_decoder_layers

    config = config if isinstance(config, MoDConfig) else MoDConfig(**config)
    if routed_blocks(model):
        raise MixtureOfDepthsError("Mixture-of-Depths is already installed on this model")
    prefix, layers = find_decoder_layers(model)
    chosen = [i for i in range(len(layers)) if i % config.every == config.every - 1 and i > 0]
    if not chosen:
        raise MixtureOfDepthsError(f"every={config.every} routes no block of a {len(layers)}-block model")
    hidden = getattr(model.config, "hidden_size", None) if hasattr(model, "config") else None
    names = []
    for i in chosen:
        block = layers[i]
        width = hidden or next(p for p in block.parameters() if p.ndim >= 1).shape[-1]
        device = next(iter(block.parameters()), torch.empty(0)).device
        block.__class__ = routed_class(type(block))
        block.mod_router = DepthRouter(width, config, len(chosen), device=device).train(block.training)
        block.mod_layer_idx = i
        block.mod_model_config = getattr(model, "config", None)
        block.aux_loss = None
        block.mod_decision_shift = None
        block.mod_last_fraction = 1.0
        names.append(f"{prefix}.{i}")
    return names


# --------------------------------------------------------------------------- compute accounting

def _matmul_weights(block: nn.Module) -> int:
    """Weights that every token multiplies in a block (linear layers, packed or not; routers excluded)."""
    total = 0
    for name, m in block.named_modules():
        if ".mod_router" in f".{name}" or isinstance(m, DepthRouter):
            continue
        if hasattr(m, "in_features") and hasattr(m, "out_features"):
            total += m.in_features * m.out_features
    return total


def forward_flops(model: nn.Module, seq_len: int, fractions: dict[str, float] | None = None) -> dict[str, float]:
    """Forward FLOPs per sequence of ``seq_len`` tokens, with and without routing.

    Linear layers cost 2 FLOPs per weight per token; attention scores and values cost
    ``2 · 2 · d_model`` per query-key pair of the causal triangle. A routed block that processes a
    share ``c`` of the tokens does ``c`` of its linear work and ``c²`` of its attention work.
    ``fractions`` gives the measured share per routed block (default: its training capacity).
    Embedding lookups are free; the output head is counted.
    """
    from bitconvert.convert import find_decoder_layers

    _, layers = find_decoder_layers(model)
    d_model = model.config.hidden_size
    head = model.get_output_embeddings()
    head_flops = 2 * head.in_features * head.out_features * seq_len if head is not None else 0
    pairs = seq_len * (seq_len + 1) / 2
    dense = routed = float(head_flops)
    names = {id(m): n for n, m in model.named_modules()}
    for block in layers:
        linear = 2 * _matmul_weights(block) * seq_len
        attention = 4 * d_model * pairs
        dense += linear + attention
        if isinstance(block, RoutedBlock):
            share = (fractions or {}).get(names[id(block)], block.mod_router.config.capacity)
            routed += share * linear + share * share * attention
        else:
            routed += linear + attention
    return {"dense_flops": dense, "routed_flops": routed, "saved_fraction": 1 - routed / dense}
