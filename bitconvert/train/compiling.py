"""torch.compile for training: the whole student, or each decoder block on its own (regional).

A BitLinear's fake quantizers are a dozen small elementwise kernels each, launched for every
projection of every block; compiled, they fuse into a few. Compiling the blocks one by one instead of
the whole model gives inductor a graph it compiles in seconds, and since the blocks share their code
and shapes, the first block's compilation serves all the others.
"""

from __future__ import annotations

import logging
import torch
from torch import nn

log = logging.getLogger(__name__)

COMPILE_MODES = (False, "layers", "model")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks: the outermost ``nn.ModuleList`` (``model.layers`` in Llama-style
    models, ``transformer.h`` in GPT-2; lists of experts sit inside the blocks). Mixture-of-Depths makes
    every other block another class; each class then compiles once."""
    lists = [(name.count("."), -len(m), name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks to compile one by one; "
                         "use train.compile: model")
    return min(lists, key=lambda entry: entry[:3])[3]


def compile_student(student: nn.Module, mode, unwrapped: nn.Module | None = None) -> nn.Module:
    """Apply ``train.compile``: False leaves ``student`` as it is, ``"model"`` returns it torch.compiled,
    ``"layers"`` compiles each decoder block of ``unwrapped`` (the module under any wrapper) in place."""
    if mode is False or mode is None:
        return student
    if mode is True or mode == "model":  # True: a TrainConfig changed with model_copy, which skips validation
        return torch.compile(student)
    if mode == "layers":
        blocks = decoder_blocks(unwrapped if unwrapped is not None else student)
        for block in blocks:
            # static shapes: training batches all have one shape; the held-out batches add a few graphs
            block.compile(dynamic=False)
        kinds = sorted({type(block).__name__ for block in blocks})
        log.debug("compiling %d decoder blocks one by one (%s)", len(blocks), ", ".join(kinds))
        return student
    raise ValueError(f"train.compile {mode!r}: expected one of {COMPILE_MODES}")
