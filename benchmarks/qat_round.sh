#!/usr/bin/env bash
# Issue 6, an ablation round (ROUND=2, the default, up to 14), in one GPU call of at most BUDGET_SECONDS
# (default 560) in all:
#   1. the SmolLM2 GGUF becomes an HF folder (skipped when it is there already);
#   2. benchmarks/qat_ablations.py --round $ROUND: the original's scores, teacher-sampling throughput
#      (generate() vs the static-cache decode loop, eager and CUDA graph), the fresh teacher text,
#      then the configurations in priority order until the deadline (BUDGET_SECONDS - COMPILE_SECONDS);
#   3. QAT step tokens/s, eager vs compiled blocks vs `train.compile: true`, in its own process under
#      `timeout` with whatever time is left (a long compile is cut, not fatal).
# Writes to $OUT: qat_round$ROUND.{json,md}, qat_step_compile.{json,md}, winner_round$ROUND.sets (the best
# configuration as `--set` overrides of the recipe), round$ROUND.log (progress bars dropped).
#
#   OUT=/path GGUF=/root/m/smollm2.gguf ROUND=3 bash benchmarks/qat_round.sh   (repo as CWD, data in .data/)
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/qat_round.sh                      (CPU, tiny random Llama)
# Knobs: ROW_STEPS (steps per configuration, on the GPU 115 unless set: the same tokens for every row
# whatever the GPU's speed does; ROW_STEPS= trains each for ROW_SECONDS instead), ROW_SECONDS (training
# seconds per configuration, or with ROW_STEPS the estimate of a row's time for the deadline), CONFIGS
# (comma list), BUDGET_SECONDS, COMPILE_SECONDS, WORK (scratch folder), BITCONVERT_DATA (folder with
# wikitext-2/ and piqa/), SPEED=0 (no sampling or step-speed measurements: every second goes to the
# configurations), PIQA_LIMIT (items per row; -1, the GPU default, is all of them), REUSE_MIX=1 (the teacher text
# an earlier call left in WORK, instead of sampling it again: a round split over calls on one warm machine),
# PREVIOUS (an earlier call's qat_round$ROUND.json: its rows join this call's table).
set -uo pipefail
start=$(date +%s)
out=${OUT:?set OUT}
smoke=${SMOKE:-0}
data=${BITCONVERT_DATA:-$PWD/.data}
round=${ROUND:-2}
speed=${SPEED:-1}
work=${WORK:-/tmp/qat-round$round}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 BITCONVERT_DATA=$data TOKENIZERS_PARALLELISM=true
mkdir -p "$out" "$work"
log=$out/round$round.log
: > "$log"

# tqdm redraws a bar with \r: keep only what ends in \n (log lines, and each bar's final state).
read -r -d '' KEEP_LINES <<'EOF'
import os, sys
pending = b""
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    pending += chunk
    while True:
        ends = [i for i in (pending.find(b"\r"), pending.find(b"\n")) if i >= 0]
        if not ends:
            break
        cut = min(ends)
        if pending[cut:cut + 1] == b"\n":
            sys.stdout.buffer.write(pending[:cut + 1])
            sys.stdout.flush()
        pending = pending[cut + 1:]
sys.stdout.buffer.write(pending)
EOF
say() { python3 -u -c "$KEEP_LINES" | tee -a "$log"; }

if [ "$smoke" = 1 ]; then
  # a shared CPU: OpenMP threads spin-waiting on a busy core make small matrix products crawl
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  device=cpu; budget=${BUDGET_SECONDS:-1200}; compile_seconds=${COMPILE_SECONDS:-500}
  gguf=${GGUF:-$(python3 -c "from bitconvert.sources import resolve; s = resolve('smollm2-135m'); print(s.path / s.gguf_file)")}
  row_seconds=${ROW_SECONDS:-3}
  row_steps=${ROW_STEPS:-}
  sizes=(--sequence-length 32 --piqa-limit 8 --eval-blocks 16 --mix-tokens 1024 --mix-batch-size 16 --mix-seconds 30
         --sampling-batch 16 --sampling-new-tokens 16 --throughput-steps 5 --row-overhead 10)
else
  device=cuda; budget=${BUDGET_SECONDS:-560}; compile_seconds=${COMPILE_SECONDS:-130}
  gguf=${GGUF:-/root/m/smollm2.gguf}
  row_seconds=${ROW_SECONDS:-36}
  row_steps=${ROW_STEPS-115}  # fixed seconds let the GPU's speed drift decide rows (round 3)
  # all 1838 PIQA items (~22 s a row): on 400 the same configuration read 0.527-0.565 across calls (round 3)
  sizes=(--piqa-limit "${PIQA_LIMIT:--1}" --mix-tokens 4194304 --mix-batch-size 1024 --mix-seconds 60
         --sampling-batch 1024 --sampling-new-tokens 128 --throughput-steps 12)
fi
configs=()
[ -n "${CONFIGS:-}" ] && configs=(--configs "$CONFIGS")
[ "${REUSE_MIX:-0}" = 1 ] && configs+=(--reuse-mix)
[ -n "${PREVIOUS:-}" ] && configs+=(--previous "$PREVIOUS")
throughput=(--throughput --throughput-settings sampling)
if [ "$speed" = 0 ]; then throughput=(); compile_seconds=0; fi

{
  echo "== qat_round.sh, round $round: device $device, ${row_steps:+$row_steps steps, ~}$row_seconds s per configuration, budget $budget s (compile $compile_seconds s)"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
      'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
} 2>&1 | say

hf=$work/smol-hf
if [ ! -f "$hf/config.json" ]; then
  python3 -c "
import sys
from bitconvert.sources import load_model
model, tokenizer = load_model(sys.argv[1])
model.save_pretrained(sys.argv[2]); tokenizer.save_pretrained(sys.argv[2])" "$gguf" "$hf" 2>&1 | say
fi
model=$hf
if [ "$smoke" = 1 ]; then  # the real tokenizer and data, a model small enough for a CPU
  model=$work/tiny-hf
  python3 -c "
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config).save_pretrained(sys.argv[2]); tokenizer.save_pretrained(sys.argv[2])" \
    "$hf" "$model" 2>&1 | say
fi
echo "== model ready after $(( $(date +%s) - start )) s" | say

common=(--model "$model" --data "$data/wikitext-2" --device "$device" --out "$out" "${sizes[@]}")
steps=()
[ -n "$row_steps" ] && steps=(--steps "$row_steps")
python3 benchmarks/qat_ablations.py --round "$round" "${common[@]}" "${configs[@]}" --seconds "$row_seconds" "${steps[@]}" --eval-every 0 \
  "${throughput[@]}" --deadline $(( start + budget - compile_seconds )) \
  --winner-sets "$out/winner_round$round.sets" --work "$work/ablations" 2>&1 | say
echo "== ablations done after $(( $(date +%s) - start )) s" | say

left=$(( start + budget - $(date +%s) ))
if [ "$speed" = 0 ]; then
  echo "== step-speed measurements not asked for (SPEED=0)" | say
elif [ "$left" -ge 45 ]; then
  timeout -k 5 "$left" python3 benchmarks/qat_ablations.py --round "$round" "${common[@]}" --configs "" --throughput \
    --throughput-settings eager,compiled_model,compiled_blocks --report-name qat_step_compile \
    --work "$work/compile" 2>&1 | say
  [ "${PIPESTATUS[0]}" = 124 ] && echo "== step-speed measurements cut at the time limit ($left s)" | say
else
  echo "== no time left for the step-speed measurements ($left s)" | say
fi
echo "== finished after $(( $(date +%s) - start )) s" | say
cat "$out/qat_round$round.md" "$out/qat_step_compile.md" 2>/dev/null
ls -la "$out"
