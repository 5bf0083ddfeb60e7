#!/usr/bin/env python
"""What int8 activations alone cost SmolLM2-135M: the original against the original with every decoder
linear's input quantized as BitLinear does it (symmetric int8, absmax per token), weights untouched.

Scores lm-eval PIQA (bitconvert's piqa_local) and WikiText-2 test perplexity on non-overlapping 512-token
blocks for both, in one process, on any device (the CPU is enough: no training).

    python benchmarks/activation_quant_piqa.py --data-dir ../shared/data [--piqa-limit N] [--blocks 48] \
        [--out benchmarks/results]

Writes OUT/activation_quant_piqa.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402

from bitconvert.convert import plan_conversion  # noqa: E402
from bitconvert.eval import TaskTracker  # noqa: E402
from bitconvert.quant.ternary import int8_fake_quantize  # noqa: E402
from bitconvert.sources import load_model  # noqa: E402
from bitconvert.train.data import tokenize_blocks  # noqa: E402
from bitconvert.train.loop import held_out_loss  # noqa: E402
from bitconvert.utils.io import atomic_write_text  # noqa: E402


def quantize_linear_inputs(model) -> list:
    """Forward pre-hooks that fake-quantize the input of every layer that bitconvert would convert (the
    head keeps full-precision inputs, as in a converted model)."""
    targets, _ = plan_conversion(model)
    return [module.register_forward_pre_hook(lambda _, inputs: (int8_fake_quantize(inputs[0]), *inputs[1:]))
            for module in targets.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with wikitext-2/ and piqa/")
    parser.add_argument("--piqa-limit", type=int, default=None, help="first N PIQA items (default: all)")
    parser.add_argument("--blocks", type=int, default=48, help="WikiText-2 test blocks of 512 tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, dtype=torch.float32, device=args.device)
    model.eval()
    blocks = tokenize_blocks([(args.data_dir / "wikitext-2" / "test.txt").read_text()], tokenizer, 512)[: args.blocks]
    tracker = TaskTracker(["piqa_local"], tokenizer, limit=args.piqa_limit, batch_size=32, data_dir=args.data_dir)
    accelerator = Accelerator(cpu=args.device == "cpu")
    rows = []
    for label, int8_inputs in (("original", False), ("int8 activations, full-precision weights", True)):
        hooks = quantize_linear_inputs(model) if int8_inputs else []
        started = time.perf_counter()
        with torch.no_grad():
            ppl = math.exp(held_out_loss(model, blocks, 8, accelerator))
            scores = tracker(model)
        for hook in hooks:
            hook.remove()
        rows.append({"model": label, "quantized_inputs": len(hooks), "wikitext_ppl": ppl,
                     "piqa_acc": scores["piqa_local/acc"], "piqa_acc_norm": scores["piqa_local/acc_norm"],
                     "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)
    items = args.piqa_limit or "all 1838"
    report = {"model": args.model, "device": args.device, "torch": torch.__version__, "piqa_items": items,
              "wikitext_blocks_of_512": len(blocks), "rows": rows}
    md = ["# int8 activations alone (SmolLM2-135M, no training)", "",
          f"Every decoder linear's input quantized to int8 (absmax per token), weights untouched; PIQA on {items} "
          f"items, WikiText-2 test perplexity on its first {len(blocks)} blocks of 512 tokens, on {args.device}.", "",
          "| model | quantized inputs | WikiText-2 ppl | PIQA acc | PIQA acc_norm |", "| --- | ---: | ---: | ---: | ---: |"]
    md += [f"| {r['model']} | {r['quantized_inputs']} | {r['wikitext_ppl']:.2f} | {r['piqa_acc']:.3f} | "
           f"{r['piqa_acc_norm']:.3f} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "activation_quant_piqa.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out / "activation_quant_piqa.md", "\n".join(md) + "\n")
    for name in ("activation_quant_piqa.json", "activation_quant_piqa.md"):
        (args.out / name).chmod(0o644)
    print("\n".join(md))


if __name__ == "__main__":
    main()
