"""A random-init Llama of about 1.1B parameters with SmolLM2's tokenizer, saved as a local HF folder.

Multi-GPU scaling is measured on a model big enough for the GPUs to have work; the weights'
values do not change the speed, and the loss-curve comparison only needs the same model on both sides.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("--tokenizer", required=True, help="folder with SmolLM2's tokenizer files")
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--layers", type=int, default=22)
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = LlamaForCausalLM(config)
model.save_pretrained(args.out)
tokenizer.save_pretrained(args.out)
print(f"saved {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B-parameter random Llama to {args.out}")
