"""Packed projections that read the same input, multiplied as one matrix at inference.

Decoding a token runs every linear layer once, and at batch 1 each packed product costs a kernel
launch and a memory round trip more than its bytes: attention's q, k and v and the MLP's gate and
up projections each read the same activations, so one product with their rows stacked does the
work of three (or two) in one launch. This is what serving engines do with full-precision weights;
here the stacked weight is repacked once at load time.

:func:`fuse_projections` replaces each such group by views of one :class:`FusedProjections`; the
first view called with an input computes every output, the others return theirs. A SwiGLU MLP
(``down(silu(gate(x)) * up(x))``) goes one step further and becomes a :class:`FusedSwiGLU`: its
gate/up product applies ``silu(gate) * up`` in the kernel's epilogue and writes only that, so the
elementwise kernel between the two products disappears. Only for frozen inference (LoRA and
training keep the separate layers).
"""

from __future__ import annotations

import torch
from torch import nn

from bitconvert.kernels import reference_kernels
from bitconvert.layers.packed import PackedBitLinear
from bitconvert.quant import pack_ternary, unpack_ternary

# Sibling layers that modelling code calls on one and the same tensor, in the order it calls them.
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedProjections(nn.Module):
    """One packed product for several projections of the same input; remembers the last one.

    The memory is keyed by the identity of the input tensor (and its version counter in eager
    mode), and forgotten once every projection has taken its output, so it holds nothing between
    forward passes and a different input is always multiplied afresh.
    """

    def __init__(self, fused: PackedBitLinear, sizes: tuple[int, ...]):
        super().__init__()
        self.fused, self.sizes = fused, sizes
        self._last: tuple | None = None  # (input, version, outputs, taken flags)

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        last = self._last
        version = 0 if torch.compiler.is_compiling() else x._version  # dynamo cannot read versions
        if last is None or last[0] is not x or last[1] != version or last[3][index]:
            last = (x, version, self.fused(x).split(self.sizes, dim=-1), [False] * len(self.sizes))
        last[3][index] = True
        self._last = None if all(last[3]) else last
        return last[2][index]


class ProjectionView(nn.Module):
    """Stands in for one fused projection: ``q_proj(x)`` is the q rows of the fused product."""

    def __init__(self, group: FusedProjections, index: int, in_features: int, out_features: int):
        super().__init__()
        # Not a submodule: the group is registered once, on the parent, under a name of its own.
        object.__setattr__(self, "group", group)
        self.index, self.in_features, self.out_features = index, in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, part {self.index} of a fused product"


def projection_group(module: nn.Module, names: tuple[str, ...]) -> list[ProjectionView] | None:
    """``module``'s projections ``names`` if :func:`fuse_projections` made them views of one group, else None."""
    views = [getattr(module, name, None) for name in names]
    if all(isinstance(v, ProjectionView) for v in views) and len({id(v.group) for v in views}) == 1:
        return views
    return None


def outputs_match(got: torch.Tensor, want: torch.Tensor) -> bool:
    """The check every fusion makes before it keeps a change: the same shape, and within float rounding
    (relative error 1e-3) of what the model computed before."""
    return want.shape == got.shape and bool((got - want).float().norm() <= 1e-3 * want.float().norm() + 1e-6)


def _fusable(layers: list) -> bool:
    first = layers[0]
    return (all(isinstance(layer, PackedBitLinear) for layer in layers)
            and all(layer.spec == first.spec and layer.in_features == first.in_features for layer in layers)
            and first.spec.variant == "b1.58" and all(layer.rms_norm is None for layer in layers))


@torch.no_grad()
def stack_packed(layers: list[PackedBitLinear]) -> PackedBitLinear:
    """One PackedBitLinear whose output rows are those of ``layers`` in order (per-tensor scales
    become per-row scales, which hold the same numbers)."""
    first = layers[0]
    granularity = "channel" if first.spec.weight_scale == "tensor" else first.spec.weight_scale
    spec = first.spec.model_copy(update={"weight_scale": granularity})
    out_features = sum(layer.out_features for layer in layers)
    has_bias = any(layer.bias is not None for layer in layers)
    device, dtype = first.weight.device, next((layer.bias.dtype for layer in layers if layer.bias is not None), None)
    stacked = PackedBitLinear(first.in_features, out_features, has_bias, spec=spec, device=device, dtype=dtype)
    stacked.weight.copy_(pack_ternary(torch.cat([unpack_ternary(layer.weight) for layer in layers])))
    scales = [layer.weight_scale.expand(layer.out_features) if first.spec.weight_scale == "tensor"
              else layer.weight_scale for layer in layers]
    stacked.weight_scale.copy_(torch.cat(scales))
    if has_bias:
        stacked.bias.copy_(torch.cat([layer.bias if layer.bias is not None
                                      else torch.zeros(layer.out_features, dtype=dtype, device=device)
                                      for layer in layers]))
    return stacked


class FusedSwiGLU(nn.Module):
    """A SwiGLU MLP as two packed products: ``down_proj(gate_up(x, swiglu=True))``.

    Takes the place of the MLP module it was made from, which it keeps as ``original`` (its gate and up
    projections are views of ``gate_up`` by then, so nothing is stored twice).
    """

    def __init__(self, original: nn.Module, gate_up: PackedBitLinear):
        super().__init__()
        self.original, self.gate_up = original, gate_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.original.down_proj(self.gate_up(x, swiglu=True))


def _is_silu(module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


@torch.no_grad()
def _swiglu_mlp(mlp: nn.Module, gate_up: PackedBitLinear) -> FusedSwiGLU | None:
    """``mlp`` as a :class:`FusedSwiGLU` if it is one: a SiLU ``act_fn`` and a ``down_proj``, and (since its
    forward is the modelling code's own) the same output on a random input; else None."""
    if not (_is_silu(getattr(mlp, "act_fn", None)) and isinstance(getattr(mlp, "down_proj", None), nn.Module)):
        return None
    fused = FusedSwiGLU(mlp, gate_up)
    x = torch.randn(2, gate_up.in_features, generator=torch.Generator().manual_seed(0)).to(gate_up.weight.device)
    try:
        with reference_kernels():  # the check is of the code's structure: no kernel tuning for this input
            want, got = mlp(x), fused(x)
    except Exception:  # a forward that is not down(act(gate(x)) * up(x)) may want other arguments
        return None
    return fused if outputs_match(got, want) else None


def fuse_projections(model: nn.Module, swiglu: bool = True) -> list[str]:
    """Fuse every group of :data:`PROJECTION_GROUPS` whose layers are packed alike; returns one name per
    fused group (``model.layers.0.self_attn.{q_proj,k_proj,v_proj}``, ``model.layers.0.mlp.{gate_proj,up_proj}``,
    with ``+swiglu`` where the MLP became a :class:`FusedSwiGLU`, as ``swiglu`` allows). Idempotent: fused
    groups are views afterwards and are left alone."""
    fused = []
    for name, parent in list(model.named_modules()):
        for group in PROJECTION_GROUPS:
            layers = [getattr(parent, child, None) for child in group]
            if any(layer is None for layer in layers) or not _fusable(layers):
                continue
            shared = FusedProjections(stack_packed(layers), tuple(layer.out_features for layer in layers))
            parent.add_module("_".join(child.split("_")[0] for child in group) + "_fused", shared)
            for index, (child, layer) in enumerate(zip(group, layers)):
                setattr(parent, child, ProjectionView(shared, index, layer.in_features, layer.out_features))
            label = f"{name}.{{{','.join(group)}}}" if name else "{" + ",".join(group) + "}"
            mlp = _swiglu_mlp(parent, shared.fused) if swiglu and group == ("gate_proj", "up_proj") and name else None
            if mlp is not None:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, attr, mlp)
                label += "+swiglu"
            fused.append(label)
    return fused
