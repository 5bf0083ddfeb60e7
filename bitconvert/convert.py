"""Model surgery: swap the linear layers of a causal LM's decoder blocks for BitLinear.

Walks ``named_modules`` of the decoder blocks and replaces children in place, as peft does. What
is converted is decided by one registry of supported layer types; anything inside a block that
holds a weight matrix but is neither supported nor known to stay in full precision (norms,
embeddings, MoE routers) is an error that names it, unless the skip list covers it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from bitconvert.layers import BitExperts, BitLinear
from bitconvert.quant import QuantSpec, is_binary

log = logging.getLogger(__name__)

# Projections whose input is the output of attention or of the MLP's nonlinearity: where
# BitDistill's SubLN puts its extra normalisation.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "dense", "c_proj", "fc2", "w2", "wo")

# Modules with weight matrices that stay in full precision inside blocks, by class-name fragment.
FULL_PRECISION_FRAGMENTS = ("Norm", "Embedding", "Router", "Rotary", "TopK")
# MoE routing linears: tiny, precision-critical, and left in full precision by every BitNet MoE recipe.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


class UnsupportedModuleError(ValueError):
    """A decoder block holds weights that bitconvert does not know how to quantize."""


@dataclass
class ConversionReport:
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    kept_full_precision: list[str] = field(default_factory=list)
    routed: list[str] = field(default_factory=list)  # blocks with a Mixture-of-Depths router

    def summary(self) -> str:
        text = (f"converted {len(self.converted)} layers to BitLinear, skipped {len(self.skipped)} by request, "
                f"kept {len(self.kept_full_precision)} in full precision")
        return text + (f", routed {len(self.routed)} blocks (Mixture-of-Depths)" if self.routed else "")


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return None
    return Conv1D


def _replacement(module: nn.Module) -> Callable[[nn.Module, QuantSpec, bool], nn.Module] | None:
    """The registry: how each supported module type becomes its quantized twin."""
    conv1d = _conv1d_type()
    if type(module) is nn.Linear:
        return BitLinear.from_linear
    if conv1d is not None and isinstance(module, conv1d):
        return BitLinear.from_conv1d
    if BitExperts.supports(module):
        return lambda m, spec, _norm: BitExperts(m, spec)
    return None


def _block_class(module: nn.Module) -> type:
    """A block's own class; a routed (Mixture-of-Depths) block counts as the class it extends."""
    return getattr(type(module), "routed_base", type(module))


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks: the outermost ModuleList whose items share one class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({_block_class(m) for m in module}) == 1:
            if best is None or name.count(".") < best[0].count("."):
                best = (name, module)
    if best is None:
        raise UnsupportedModuleError(f"{type(model).__name__} has no stack of decoder blocks (no nn.ModuleList of layers)")
    return best


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """A pattern matches a module name exactly, as a dotted suffix, or as a regex over the full name."""
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name):
            return True
    return False


def _input_sizes(module: nn.Module) -> tuple[int, ...]:
    """The inputs of each weight matrix a converted module quantizes (its last dimension)."""
    if isinstance(module, nn.Linear):
        return (module.in_features,)
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):  # GPT-2's Conv1D keeps its weight as (inputs, outputs)
        return (module.weight.shape[0],)
    return tuple(p.shape[-1] for p in module.parameters(recurse=False) if p.ndim == 3)


def _holds_weights(module: nn.Module) -> bool:
    return any(p.ndim >= 2 for p in module.parameters(recurse=False))


def plan_conversion(model: nn.Module, skip: Sequence[str] = (), spec: QuantSpec | None = None,
                    ) -> tuple[dict[str, nn.Module], ConversionReport]:
    """Decide, without changing anything, which modules get converted; raise on unsupported ones.

    ``spec`` (default: b1.58) decides the packing constraints: ternary codes pack 4 output rows to a
    byte, the 1-bit variants pack 8 inputs to a byte.
    """
    binary = spec is not None and is_binary(spec.variant)
    prefix, layers = find_decoder_layers(model)
    report, targets, unsupported = ConversionReport(), {}, []
    claimed: list[str] = []
    for local_name, module in layers.named_modules():
        name = f"{prefix}.{local_name}" if local_name else prefix
        if any(name.startswith(c + ".") for c in claimed):
            continue
        replacement = _replacement(module)
        if replacement is None and not _holds_weights(module):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name_matches(name, skip):
            report.skipped.append(name)
            claimed.append(name)
        elif leaf in ROUTER_NAMES:
            report.kept_full_precision.append(name)
        elif isinstance(module, nn.Linear) and module.out_features % 4 and not binary:
            unsupported.append(f"{name} (out_features={module.out_features} is not a multiple of 4, which packing needs)")
        elif isinstance(module, nn.Linear) and module.in_features % 8 and binary:
            unsupported.append(f"{name} (in_features={module.in_features} is not a multiple of 8, which 1-bit packing needs)")
        elif binary and BitExperts.supports(module):
            unsupported.append(f"{name} (3-D MoE experts support only variant 'b1.58', not {spec.variant!r})")
        elif replacement is not None:
            targets[name] = module
            report.converted.append(name)
            claimed.append(name)
        elif any(fragment in type(module).__name__ for fragment in FULL_PRECISION_FRAGMENTS):
            report.kept_full_precision.append(name)
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise UnsupportedModuleError(
            f"cannot convert {len(unsupported)} module(s) to BitLinear: {', '.join(unsupported[:8])}"
            f"{' ...' if len(unsupported) > 8 else ''}. Add their names to convert.skip (--skip) to keep them "
            "in full precision.")
    if spec is not None and spec.weight_scale == "group":
        # checked here, not at the first forward, which comes only after the teacher has sampled its text
        uneven = sorted({n for module in targets.values() for n in _input_sizes(module) if n % spec.group_size})
        if uneven:
            raise UnsupportedModuleError(
                f"convert.group_size={spec.group_size} does not divide the inputs of every layer "
                f"({', '.join(map(str, uneven))} inputs): choose a group_size that divides them, or "
                "weight_scale: channel")
    if not targets:
        raise UnsupportedModuleError(f"no linear layers to convert in {prefix} (everything was skipped?)")
    return targets, report


def convert_to_bitnet(model: nn.Module, spec: QuantSpec, skip: Sequence[str] = (), *,
                      mixture_of_depths=None) -> ConversionReport:
    """Replace, in place, every supported linear inside the decoder blocks by its BitLinear twin
    (quantized as ``spec.variant`` says: ternary b1.58, binary bitnet1, or onebit).

    Embeddings and the output head live outside the blocks and stay in full precision; ``skip``
    keeps more (module names, dotted suffixes such as ``mlp.down_proj``, or regexes).
    ``mixture_of_depths`` (a :class:`bitconvert.mod.MoDConfig` or dict) also routes every other block.
    """
    targets, report = plan_conversion(model, skip, spec)
    for name, module in targets.items():
        leaf = name.rsplit(".", 1)[-1]
        use_norm = spec.subln == "all" or (spec.subln == "output" and leaf in OUTPUT_PROJECTIONS)
        model.set_submodule(name, _replacement(module)(module, spec, use_norm))
    if mixture_of_depths is not None:
        from bitconvert.mod import install_mixture_of_depths

        report.routed = install_mixture_of_depths(model, mixture_of_depths)
    log.info(report.summary())
    return report


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The BitLinear and BitExperts modules of a converted model, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (BitLinear, BitExperts))}


def set_quant_strength(model: nn.Module, strength: float) -> None:
    """Blend factor for gradual quantization warmup: 0 = full precision, 1 = fully quantized."""
    for module in quantized_modules(model).values():
        module.strength.value.fill_(strength)
