"""LoRA on top of packed layers: peft's adapter math around a frozen ``PackedBitLinear``.

peft knows nothing of packed ternary or 1-bit weights, but lets a ``LoraConfig`` map extra layer
types to adapter classes (``LoraConfig._register_custom_module``, peft >= 0.13). The mapping is not
saved in ``adapter_config.json``, so it must be registered again on every config that peft builds:
:func:`register_packed_lora` does that, for training and for loading.

``y = packed(x) + scaling · B(A(dropout(x)))``: the base product stays in the packed kernel and the
packed buffers never change, so the adapter is only ever added beside them, never merged into them.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraConfig, LoraLayer
from torch import nn

from bitconvert.layers.packed import PackedBitLinear


class PackedLoraLinear(nn.Module, LoraLayer):
    """peft LoRA layer whose base layer is a :class:`PackedBitLinear`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        if config.use_dora or config.lora_bias:
            raise ValueError("LoRA on packed layers supports plain LoRA only (use_dora=False, lora_bias=False)")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        return None

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError("a LoRA adapter cannot be merged into packed weights: keep it as an adapter "
                                  "(PeftModel), or merge into the full-precision model before quantizing")

    def unmerge(self) -> None:
        raise NotImplementedError("packed layers are never merged")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise NotImplementedError("mixed-adapter batches are not supported on packed layers")
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            # adapters stay in their own (usually float32) dtype while the base runs in bf16 on GPUs
            delta = lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype))))
            result = result + (delta * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_packed_lora(config: LoraConfig) -> LoraConfig:
    """Teach ``config`` to wrap ``PackedBitLinear`` with :class:`PackedLoraLinear`; returns it."""
    config._register_custom_module({PackedBitLinear: PackedLoraLinear})
    return config


def packed_target_modules(model: nn.Module) -> list[str]:
    """Leaf names of every packed linear (``q_proj``, ``up_proj`` ...): the default LoRA targets."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, PackedBitLinear)})
