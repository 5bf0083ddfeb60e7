#!/usr/bin/env bash
# One GPU call for SmolLM2-135M, once the real GGUF is on the machine (see ../shared/tools/smollm2-parts.sh):
# fused-vs-eager QAT step speed, a distillation run of FINAL_MINUTES through `bitconvert run`, then
# lm-eval (PIQA, WikiText-2) and perplexity of the original vs the ternary export.
#   OUT=... GGUF=/root/m/smollm2.gguf FINAL_MINUTES=4.5 bash benchmarks/smollm2_gpu_session.sh
set -uo pipefail
out=${OUT:?}; gguf=${GGUF:?}; minutes=${FINAL_MINUTES:-4.5}
work=$(dirname "$gguf")
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 BITCONVERT_DATA=${BITCONVERT_DATA:-$PWD/.data}
quiet() { grep --line-buffered -v 'it/s\]' ; }
[ -d "$work/smol-hf" ] || python3 -c "
from bitconvert.sources import load_model
m, t = load_model('$gguf'); m.save_pretrained('$work/smol-hf'); t.save_pretrained('$work/smol-hf')" 2>&1 | quiet
python3 benchmarks/qat_ablations.py --model "$work/smol-hf" --data "$BITCONVERT_DATA/wikitext-2" --configs "" \
  --throughput --throughput-steps 12 --out "$out" 2>&1 | quiet | tail -6
python3 -m bitconvert.cli run recipes/smollm2-gpu.yaml --set model="$work/smol-hf" --set output="$work/tern" \
  --set train.minutes="$minutes" 2>&1 | quiet | tail -8
cp "$work/tern/training/metrics.jsonl" "$work/tern/training_curves.png" "$out/" 2>/dev/null
python3 benchmarks/eval_smollm2.py --model "$work/smol-hf" --ternary "$work/tern" --data-dir "$BITCONVERT_DATA" \
  --out "$out" 2>&1 | quiet | tail -25
cp "$work/tern/README.md" "$out/model_card.md" 2>/dev/null
ls -la "$out"
