"""GGUF export for llama.cpp: ternary layers in llama.cpp's TQ2_0 or TQ1_0 types.

What llama.cpp can run is what this writes: the ``llama`` architecture (Llama, SmolLM2, Mistral,
and Mixtral's experts), ternary weights as TQ2_0 (256 weights in 66 bytes: 2 bits each plus one
fp16 scale) or TQ1_0 (256 weights in 54 bytes: five trits a byte plus one fp16 scale). Each block
of 256 inputs of a row carries its own scale, so bitconvert's per-tensor, per-row and per-group
scales (groups of a multiple of 256) fit exactly; the only rounding is of the scale to fp16.

Rows whose length is not a multiple of 256 (SmolLM2's hidden size is 576) cannot be TQ. They are
written as Q8_0 (blocks of 32: one fp16 scale and 32 int8 values, here the codes -1, 0, +1), which
holds the same values exactly at 8.5 bits a weight; failing that as F16 (also exact: a ternary
code times an fp16 scale is an fp16 number). Embeddings and the output head are F16 as in
llama.cpp's own converter, norms and MoE routers F32.

llama.cpp's ``llama`` graph applies rotary embeddings to adjacent pairs of a head's dimensions,
Hugging Face to its two halves; the rows of the Q and K projections are permuted to match, as
llama.cpp's converter does. What llama.cpp does not reproduce: bitconvert's per-token int8
activation quantization (llama.cpp quantizes activations in blocks of 32 or 256 for its integer
dot products, a little finer), and SubLN norms (no place for them in the llama graph: refused).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bitconvert.export.packed import ExportError
from bitconvert.quant import QuantSpec, dequantize_weight, unpack_ternary

log = logging.getLogger(__name__)

QTYPES = ("tq2_0", "tq1_0")
TQ_BLOCK = 256
FALLBACK_BLOCK = 32  # Q8_0


class GGUFExportError(ExportError):
    """The model (or its tokenizer) cannot be written as a GGUF that llama.cpp runs correctly."""


# --------------------------------------------------------------------------- ternary weights

@dataclass
class Ternary:
    """One ternary weight, read from its module when needed (the codes of an 8B model alone take 8 GB)."""

    read: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> (int8 codes (..., out, in), inverse scale)
    spec: QuantSpec

    def codes_and_step(self) -> tuple[np.ndarray, np.ndarray]:
        """int8 codes in {-1, 0, 1} and the float32 step (``1 / inv_scale``) of every weight."""
        with torch.no_grad():
            codes, inv = self.read()
            codes = codes.detach().cpu().to(torch.int8)
            ones = torch.ones_like(codes)
            step = dequantize_weight(ones, inv.detach().cpu().float(), self.spec)
        return codes.numpy(), step.numpy()

    def values(self) -> np.ndarray:
        """Codes times the fp16-rounded step: exactly what any GGUF type here stores."""
        codes, step = self.codes_and_step()
        return codes.astype(np.float32) * step.astype(np.float16).astype(np.float32)


def ternary_weights(model: nn.Module) -> tuple[dict[str, Ternary], dict[str, nn.Module]]:
    """Every ternary weight of a converted (BitLinear) or loaded (packed) model, by state-dict key.

    Returns the weights and the modules that own them.
    """
    from bitconvert.layers import BitExperts, BitLinear, PackedBitLinear, PackedExperts

    weights: dict[str, Ternary] = {}
    owners: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        hf_bitlinear = type(module).__module__ == "transformers.integrations.bitnet" and hasattr(module, "weight_scale")
        if not (isinstance(module, (BitLinear, BitExperts, PackedBitLinear, PackedExperts)) or hf_bitlinear):
            continue
        # transformers' own BitLinear (when not swapped out) holds one per-tensor scale, same packing
        spec = QuantSpec() if hf_bitlinear else module.spec
        if spec.variant != "b1.58":
            raise GGUFExportError(f"{name}: variant {spec.variant!r} has no GGUF type here; only b1.58 (ternary) does")
        if getattr(module, "rms_norm", None) is not None:
            raise GGUFExportError(
                f"{name} has a SubLN norm before its projection (subln={spec.subln!r}); llama.cpp's llama graph "
                "has no place for it. Export GGUF from a model converted with subln: none.")
        if getattr(module, "transposed_source", False):
            raise GGUFExportError(f"{name} comes from a GPT-2 Conv1D; GPT-2 is not a GGUF export target")
        if isinstance(module, BitLinear):
            parts = {"weight": module.ternary}
        elif isinstance(module, BitExperts):
            parts = {proj: (lambda m=module, p=proj: m.ternary_of(p))
                     for proj in ("gate_up_proj", "down_proj")}
        elif isinstance(module, PackedExperts):
            parts = {proj: (lambda m=module, p=proj: (unpack_ternary(getattr(m, p)), getattr(m, f"{p}_scale")))
                     for proj in ("gate_up_proj", "down_proj")}
        else:
            parts = {"weight": lambda m=module, hf=hf_bitlinear: (
                unpack_ternary(m.weight), m.weight_scale.float().reshape(-1) if hf else m.weight_scale)}
        owners[name] = module
        for suffix, read in parts.items():
            weights[f"{name}.{suffix}"] = Ternary(read, spec)
    return weights, owners


# --------------------------------------------------------------------------- encoding

def permute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face Q/K rows (rotary on the two halves of a head) to llama.cpp's (on adjacent pairs)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))


def unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_rope_rows`."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))


def _uniform_blocks(step: np.ndarray, block: int) -> bool:
    """Does every block of ``block`` consecutive inputs of a row share one step?"""
    blocks = step.reshape(-1, block)
    return bool((blocks == blocks[:, :1]).all())


def choose_type(step16: np.ndarray, requested):
    """The GGML type for one ternary tensor: the requested TQ type where its blocks fit, else Q8_0, else F16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    row = step16.shape[-1]
    for qtype in (requested, GGMLQuantizationType.Q8_0):
        block = GGML_QUANT_SIZES[qtype][0]
        if row % block == 0 and _uniform_blocks(step16, block):
            return qtype
    return GGMLQuantizationType.F16


def _encode_q8_0(codes: np.ndarray, step16: np.ndarray) -> np.ndarray:
    """Q8_0 blocks holding the codes themselves with the step as the block scale (exact)."""
    shape = codes.shape
    scales = step16.reshape(-1, FALLBACK_BLOCK)[:, :1].copy().view(np.uint8)
    values = codes.astype(np.int8).reshape(-1, FALLBACK_BLOCK).view(np.uint8)
    blocks = np.concatenate([scales, values], axis=1)
    return blocks.reshape(*shape[:-1], shape[-1] // FALLBACK_BLOCK * (FALLBACK_BLOCK + 2))


def encode_ternary(codes: np.ndarray, step16: np.ndarray, qtype) -> np.ndarray:
    """Bytes (or fp16 values) of a ternary tensor in ``qtype``; lossless given the fp16 steps."""
    from gguf import GGMLQuantizationType, quants

    if qtype == GGMLQuantizationType.Q8_0:
        return _encode_q8_0(codes, step16)
    values = codes.astype(np.float32) * step16.astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return values.astype(np.float16)
    # TQ blocks take their scale from max|x| of the block: with one step per block that is the step
    # itself, and x / step rounds back to the code.
    return quants.quantize(values, qtype)


# --------------------------------------------------------------------------- architecture

@dataclass(frozen=True)
class Layout:
    """How a Hugging Face model maps onto one llama.cpp architecture."""

    arch: str  # general.architecture
    permute_qk: bool
    experts: bool = False


LAYOUTS = {
    "llama": Layout("llama", permute_qk=True),
    "mistral": Layout("llama", permute_qk=True),
    "mixtral": Layout("llama", permute_qk=True, experts=True),
}

_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
    # Mixtral (transformers 5 keeps every expert of a block in one 3-D tensor)
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
}
_BLOCK_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
FUSED_EXPERTS = "mlp.experts.gate_up_proj"  # split into ffn_gate_exps and ffn_up_exps


def layout_for(config) -> Layout:
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        raise GGUFExportError(
            f"GGUF export supports the llama architecture family ({', '.join(sorted(LAYOUTS))}); "
            f"{model_type!r} is not supported. Use the packed export for it.")
    return LAYOUTS[model_type]


def gguf_names(key: str) -> list[str]:
    """GGUF tensor name(s) of a Hugging Face state-dict key (two for Mixtral's fused gate/up experts)."""
    if key in _GLOBAL_TENSORS:
        return [_GLOBAL_TENSORS[key]]
    match = _BLOCK_KEY.match(key)
    if match:
        block, rest = match.groups()
        if rest == FUSED_EXPERTS:
            return [f"blk.{block}.ffn_gate_exps.weight", f"blk.{block}.ffn_up_exps.weight"]
        if rest in _BLOCK_TENSORS:
            return [f"blk.{block}.{_BLOCK_TENSORS[rest]}"]
    raise GGUFExportError(f"no GGUF tensor for {key!r}: this model has a tensor llama.cpp's llama graph does not know")


def _rope_parameters(config) -> tuple[float, dict[str, Any]]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_factors(config) -> np.ndarray:
    """Per-frequency divisors of Llama 3's rope scaling, as llama.cpp's ``rope_freqs`` tensor holds them."""
    base, params = _rope_parameters(config)
    dim = head_dim(config)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = params["factor"]
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    divisor = 1.0 / ((1 - smooth) / factor + smooth)
    divisor = np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, divisor))
    return divisor.astype(np.float32)


def _write_hparams(writer, config, layout: Layout) -> list[tuple[str, np.ndarray]]:
    """Architecture metadata. Returns extra tensors the metadata needs (Llama 3's rope factors)."""
    import gguf

    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    dim = head_dim(config)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    writer.add_rope_dimension_count(dim)
    theta, params = _rope_parameters(config)
    writer.add_rope_freq_base(theta)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    extra = []
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif rope_type == "llama3":
        extra.append(("rope_freqs.weight", llama3_rope_factors(config)))
    elif rope_type != "default":
        raise GGUFExportError(f"rope_type {rope_type!r} is not supported by the GGUF export (default, linear, llama3)")
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        log.warning("%s uses a sliding window of %d tokens; llama.cpp's llama graph attends to the whole context, "
                    "which only matches for contexts up to %d tokens", config.model_type, window, window)
    if layout.experts:
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    return extra


# --------------------------------------------------------------------------- tokenizer

# Hugging Face pre-tokenizers that match one of llama.cpp's named pre-tokenizers (tokenizer.ggml.pre).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    if not pre:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and not steps[1].get("use_regex", True)):
        return "llama-bpe"
    return None


@dataclass
class Vocab:
    """What llama.cpp needs to tokenize: GGUF ``tokenizer.*`` keys, as (value, type, sub_type)."""

    fields: dict[str, tuple[Any, Any, Any]] = field(default_factory=dict)
    source: str = ""

    def add_to(self, writer) -> None:
        for key, (value, vtype, sub_type) in self.fields.items():
            writer.add_key_value(key, value, vtype, sub_type=sub_type)


def vocab_from_gguf(path: str | os.PathLike, vocab_size: int) -> Vocab:
    """Reuse the tokenizer of the GGUF the model came from (exactly what llama.cpp ran before)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    vocab = Vocab(source=f"GGUF {path}")
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = GGUFValueType(f.types[0])
        sub_type = GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None
        vocab.fields[key] = (f.contents(), vtype, sub_type)
    tokens = vocab.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFExportError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens)")
    if len(tokens[0]) != vocab_size:
        raise GGUFExportError(f"{path} has {len(tokens[0])} tokens but the model's embedding has {vocab_size} rows")
    return vocab


def vocab_from_hf(tokenizer, vocab_size: int) -> Vocab:
    """Byte-level BPE from a fast tokenizer's tokenizer.json (GPT-2 style: Llama 3, SmolLM2, ...)."""
    from gguf import GGUFValueType, TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast tokenizer (tokenizer.json); this tokenizer has none")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFExportError(
            f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')} "
            f"(byte_fallback={model.get('byte_fallback')}), a SentencePiece-style vocabulary it does not convert. "
            "Convert from the original GGUF to reuse its tokenizer.")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise GGUFExportError(
            f"the tokenizer's pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} matches none of the "
            "llama.cpp pre-tokenizers bitconvert knows (gpt-2, smollm, llama-bpe)")
    if spec.get("normalizer"):
        log.warning("the tokenizer has a normalizer (%s) that llama.cpp does not apply", spec["normalizer"].get("type"))

    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    entries = [(tok, idx, TokenType.NORMAL) for tok, idx in model["vocab"].items()]
    entries += [(a["content"], a["id"], TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
                for a in spec.get("added_tokens", [])]
    for token, idx, kind in entries:
        if idx >= vocab_size:
            raise GGUFExportError(f"token {token!r} has id {idx}, beyond the model's {vocab_size} embedding rows")
        tokens[idx], types[idx] = token, int(kind)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    if len(set(tokens)) != len(tokens):
        raise GGUFExportError("the tokenizer maps one token string to two ids, which llama.cpp cannot represent")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    vocab = Vocab(source="tokenizer.json")
    add = vocab.fields.__setitem__
    add("tokenizer.ggml.model", ("gpt2", GGUFValueType.STRING, None))
    add("tokenizer.ggml.pre", (pre, GGUFValueType.STRING, None))
    add("tokenizer.ggml.tokens", (tokens, GGUFValueType.ARRAY, GGUFValueType.STRING))
    add("tokenizer.ggml.token_type", (types, GGUFValueType.ARRAY, GGUFValueType.INT32))
    if merges:
        add("tokenizer.ggml.merges", (merges, GGUFValueType.ARRAY, GGUFValueType.STRING))
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if value is not None:
            add(f"tokenizer.ggml.{key}_token_id", (int(value), GGUFValueType.UINT32, None))
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    add_eos = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
    add("tokenizer.ggml.add_bos_token", (add_bos, GGUFValueType.BOOL, None))
    add("tokenizer.ggml.add_eos_token", (add_eos, GGUFValueType.BOOL, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        add("tokenizer.chat_template", (template, GGUFValueType.STRING, None))
    return vocab


# --------------------------------------------------------------------------- export

@dataclass
class GGUFReport:
    path: Path
    qtype: str
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF name -> GGML type
    fallbacks: dict[str, list[str]] = field(default_factory=dict)  # reason -> GGUF names
    tokenizer_source: str = ""
    bytes: int = 0

    def summary(self) -> str:
        counts: dict[str, int] = defaultdict(int)
        for t in self.tensor_types.values():
            counts[t] += 1
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
        return f"{self.path} ({self.bytes / 2**20:.1f} MiB): {kinds}; tokenizer from {self.tokenizer_source}"


def _fallback_reason(shape: tuple[int, ...], chosen, requested) -> str:
    row = shape[-1]
    if row % TQ_BLOCK:
        why = f"row length {row} is not a multiple of {TQ_BLOCK}"
    else:
        why = f"its scales change inside a block of {TQ_BLOCK} inputs (group_size below {TQ_BLOCK})"
    return f"{why}: stored as {chosen.name} instead of {requested.name} (lossless for ternary codes)"


def export_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, qtype: str = "tq2_0", *,
                tokenizer_gguf: str | os.PathLike | None = None, name: str | None = None) -> GGUFReport:
    """Write a converted (BitLinear) or loaded packed ternary model as one GGUF file for llama.cpp.

    ``tokenizer_gguf``: a GGUF whose ``tokenizer.*`` metadata to reuse (the model's source file);
    otherwise the vocabulary comes from ``tokenizer``'s tokenizer.json.
    """
    import gguf

    if qtype not in QTYPES:
        raise GGUFExportError(f"unknown GGUF type {qtype!r}; expected one of {', '.join(QTYPES)}")
    requested = gguf.GGMLQuantizationType[qtype.upper()]
    config = model.config
    layout = layout_for(config)
    weights, owners = ternary_weights(model)
    if not weights:
        raise GGUFExportError("the model has no ternary layers; convert it first (convert_to_bitnet)")
    vocab = (vocab_from_gguf(tokenizer_gguf, config.vocab_size) if tokenizer_gguf is not None
             else vocab_from_hf(tokenizer, config.vocab_size))

    # Full-precision tensors: everything in the state dict that no ternary module owns, plus biases.
    owned = tuple(f"{n}." for n in owners)
    plain: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith(owned) and not key.endswith(".bias"):
            continue
        plain[key] = value
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        plain.pop("lm_head.weight", None)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, layout.arch)
    writer.add_name(name or str(getattr(config, "_name_or_path", "") or config.model_type) or "bitconvert")
    writer.add_quantized_by("bitconvert")
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype.upper()}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    extra = _write_hparams(writer, config, layout)
    vocab.add_to(writer)
    report = GGUFReport(path=path, qtype=qtype, tokenizer_source=vocab.source)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head

    def rope_rows(key: str, array: np.ndarray) -> np.ndarray:
        if layout.permute_qk and re.search(r"self_attn\.q_proj\.(weight|bias)$", key):
            return permute_rope_rows(array, n_head)
        if layout.permute_qk and re.search(r"self_attn\.k_proj\.(weight|bias)$", key):
            return permute_rope_rows(array, n_kv)
        return array

    tensors: list[tuple[str, np.ndarray, Any]] = []
    for key, weight in weights.items():
        codes, step = weight.codes_and_step()
        step16 = step.astype(np.float16)
        if not np.isfinite(step16).all():
            raise GGUFExportError(f"{key}: a scale overflows fp16")
        if ((step16 == 0) & (step != 0)).any() or (np.abs(step16[step16 != 0]) < np.finfo(np.float16).tiny).any():
            log.warning("%s: some scales are below fp16's normal range and lose precision in GGUF", key)
        del step
        codes, step16 = rope_rows(key, codes), rope_rows(key, step16)
        names = gguf_names(key)
        if len(names) == 2:  # fused gate/up experts: first half gate, second half up
            half = codes.shape[-2] // 2
            parts = [(codes[..., :half, :], step16[..., :half, :]), (codes[..., half:, :], step16[..., half:, :])]
        else:
            parts = [(codes, step16)]
        for gguf_name, (c, s) in zip(names, parts):
            chosen = choose_type(s, requested)
            if chosen != requested:
                report.fallbacks.setdefault(_fallback_reason(c.shape, chosen, requested), []).append(gguf_name)
            data = encode_ternary(np.ascontiguousarray(c), np.ascontiguousarray(s), chosen)
            tensors.append((gguf_name, data, chosen))
    for key, value in plain.items():
        array = rope_rows(key, value.detach().cpu().float().numpy())
        (gguf_name,) = gguf_names(key)
        if array.ndim == 1 or gguf_name.endswith("ffn_gate_inp.weight"):
            tensors.append((gguf_name, array.astype(np.float32), gguf.GGMLQuantizationType.F32))
        else:
            tensors.append((gguf_name, array.astype(np.float16), gguf.GGMLQuantizationType.F16))
    tensors += [(n, a, gguf.GGMLQuantizationType.F32) for n, a in extra]

    for reason, names in report.fallbacks.items():
        log.info("GGUF: %d tensor(s) %s, e.g. %s", len(names), reason, names[0])
    for gguf_name, data, ggml_type in sorted(tensors, key=lambda t: _tensor_order(t[0])):
        if ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(gguf_name, data)
        else:
            writer.add_tensor(gguf_name, data, raw_dtype=ggml_type)
        report.tensor_types[gguf_name] = ggml_type.name
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    report.bytes = path.stat().st_size
    log.info("wrote GGUF %s", report.summary())
    return report


def _tensor_order(name: str) -> tuple[int, str]:
    match = re.match(r"blk\.(\d+)\.", name)
    return (int(match.group(1)) if match else (-1 if name.startswith(("token_embd", "rope")) else 1 << 30), name)


# --------------------------------------------------------------------------- entry points

def source_gguf(export_dir: str | os.PathLike) -> Path | None:
    """The GGUF file a bitconvert export was converted from, if it was one (from its manifest)."""
    from bitconvert.export.packed import MANIFEST
    from bitconvert.sources import ModelSourceError, resolve

    manifest = Path(export_dir) / MANIFEST
    if not manifest.is_file():
        return None
    spec = json.loads(manifest.read_text()).get("provenance", {}).get("source")
    if not spec:
        return None
    try:
        source = resolve(spec)
    except ModelSourceError:
        return None
    if source.kind in ("embedded", "gguf") and source.gguf_file:
        path = source.path / source.gguf_file
        return path if path.is_file() else None
    return None


def gguf_filename(qtype: str) -> str:
    return f"model-{qtype}.gguf"


def _refresh_manifest_entry(folder: Path, written: Path) -> None:
    """Keep the packed manifest whole when re-exporting into a folder whose manifest already lists the GGUF.

    The packed export hashes every file in its folder, so a GGUF from an earlier run gets listed;
    rewriting that GGUF would otherwise make the folder fail its checksum.
    """
    from bitconvert.export.packed import MANIFEST, write_manifest

    if not (folder / MANIFEST).is_file():
        return
    manifest = json.loads((folder / MANIFEST).read_text())
    rel = written.relative_to(folder).as_posix() if written.is_relative_to(folder) else None
    if rel is not None and rel in manifest.get("files", {}):
        write_manifest(folder, manifest)


def _exporter(qtype: str):
    def export(model: nn.Module, tokenizer, out_dir: str | os.PathLike, spec: QuantSpec) -> Path:
        if spec.subln != "none":
            raise GGUFExportError(f"subln={spec.subln!r} adds norms llama.cpp's llama graph does not have; "
                                  "GGUF export needs subln: none")
        report = export_gguf(model, tokenizer, Path(out_dir) / gguf_filename(qtype), qtype,
                             tokenizer_gguf=source_gguf(out_dir))
        _refresh_manifest_entry(Path(out_dir), report.path)
        return report.path

    export.__name__ = f"export_gguf_{qtype}"
    export.__doc__ = f"Write ``{gguf_filename(qtype)}`` ({qtype.upper()}) into the export folder."
    return export


EXPORTERS = {f"gguf-{qtype}": _exporter(qtype) for qtype in QTYPES}


def export_folder_to_gguf(folder: str | os.PathLike, qtype: str = "tq2_0", out: str | os.PathLike | None = None,
                          *, verify: bool = True) -> GGUFReport:
    """Turn an existing packed export folder into a GGUF (default: ``<folder>/model-<qtype>.gguf``)."""
    from bitconvert.export.packed import load_ternary

    folder = Path(folder)
    model, tokenizer = load_ternary(folder, dtype=torch.float32, verify=verify)
    out = Path(out) if out is not None else folder / gguf_filename(qtype)
    if out.is_dir():
        out = out / gguf_filename(qtype)
    report = export_gguf(model, tokenizer, out, qtype, tokenizer_gguf=source_gguf(folder))
    _refresh_manifest_entry(folder.resolve(), report.path.resolve())
    return report
