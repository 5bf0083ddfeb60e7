#!/usr/bin/env bash
# One call on a 2-GPU machine: the same distillation recipe on 1 GPU (2 micro-batches per step),
# 2 GPUs with DDP and 2 GPUs with FSDP (1 micro-batch per GPU), then a table of tokens/s and loss curves.
#   benchmarks/multigpu/run.sh TOKENIZER_DIR OUT_DIR [MODEL_DIR]
set -euo pipefail
tok=${1:?tokenizer dir}; out=${2:?out dir}; model=${3:-}
work=/tmp/bitconvert-mgpu
mkdir -p "$work" "$out"
if [ -z "$model" ]; then
  python3 benchmarks/multigpu/make_model.py --tokenizer "$tok" --out "$work/model"
  model=$work/model
fi
recipe=benchmarks/multigpu/recipe.yaml
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=4
python3 -m bitconvert.cli -q run $recipe --set model="$model" --set output=$work/one --set train.grad_accum=2 \
  > "$out/one.log" 2>&1 || { tail -30 "$out/one.log"; exit 1; }
python3 -m accelerate.commands.launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 -m bitconvert.cli -q run $recipe \
  --set model="$model" --set output=$work/ddp > "$out/ddp.log" 2>&1 || { tail -30 "$out/ddp.log"; exit 1; }
python3 -m accelerate.commands.launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 -m bitconvert.cli -q run $recipe \
  --set model="$model" --set output=$work/fsdp > "$out/fsdp.log" 2>&1 || { tail -30 "$out/fsdp.log"; exit 1; }
python3 benchmarks/multigpu/report.py "1 GPU=$work/one" "2 GPUs DDP=$work/ddp" "2 GPUs FSDP=$work/fsdp" --out "$out"
cp $work/fsdp/training_curves.png "$out/fsdp_training_curves.png" 2>/dev/null || true
