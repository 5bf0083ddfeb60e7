"""Perplexity of SmolLM2-135M before training: the original vs its plain ternary conversion (no QAT).

    python benchmarks/ptq_baseline.py --text ../shared/data/wikitext-2/test.txt --blocks 24 --out benchmarks/results
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402

from bitconvert.convert import convert_to_bitnet  # noqa: E402
from bitconvert.quant import QuantSpec  # noqa: E402
from bitconvert.sources import load_model  # noqa: E402
from bitconvert.train.data import tokenize_blocks  # noqa: E402
from bitconvert.train.loop import held_out_loss  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--text", type=Path, required=True)
parser.add_argument("--blocks", type=int, default=24, help="first N blocks of 512 tokens")
parser.add_argument("--weight-scale", default="channel")
parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
args = parser.parse_args()

model, tokenizer = load_model(args.model)
blocks = tokenize_blocks([args.text.read_text()], tokenizer, 512)[: args.blocks]
accelerator = Accelerator(cpu=not torch.cuda.is_available())
original = math.exp(held_out_loss(model.to(accelerator.device), blocks, 4, accelerator))
convert_to_bitnet(model, QuantSpec(weight_scale=args.weight_scale))
ternary = math.exp(held_out_loss(model, blocks, 4, accelerator))
result = {"model": args.model, "weight_scale": args.weight_scale, "text": args.text.name, "blocks_of_512": len(blocks),
          "device": str(accelerator.device), "torch": torch.__version__, "original_ppl": original, "ptq_ternary_ppl": ternary}
args.out.mkdir(parents=True, exist_ok=True)
(args.out / "smollm2_ptq.json").write_text(json.dumps(result, indent=2) + "\n")
print(f"original {original:.2f}  ternary without training {ternary:,.0f}")
