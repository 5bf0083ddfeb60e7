#!/usr/bin/env bash
# recipes/smollm2-gpu.yaml for its whole budget (10 minutes of training) when one GPU call is only 10
# minutes long: three calls back to back on one warm machine, the run folder kept on it in between.
#   call 1, carry .whl .models/part-a [.data]:  STAGE=setup  bash benchmarks/smollm2_long_run.sh
#   call 2, carry .models/part-b [.data] [.whl-late]: STAGE=train  bash benchmarks/smollm2_long_run.sh
#       joins the GGUF, samples the teacher's text, trains; at STOP_S seconds a SIGINT makes the trainer
#       write its checkpoint and stop (the clock it keeps counts training steps only)
#   call 3, carry nothing [.whl-late]:  STAGE=finish bash benchmarks/smollm2_long_run.sh
#       --resume trains to the end of the budget, exports, then benchmarks/eval_smollm2.py scores the
#       original and the export (perplexity, PIQA) and fit_curve.py fits the curve
# .whl comes from benchmarks/device/wheels.sh, .models from ../shared/tools/smollm2-parts.sh .models,
# .data is a copy of ../shared/data.
# Knobs: RECIPE (default recipes/smollm2-gpu.yaml), SETS (space-separated recipe overrides for both calls, e.g. "train.compile=layers
# data.train.1.weight=3"), NAME (prefix of the result files, default smollm2_distill_h200_10min), STOP_S
# (the train call's SIGINT, default 500: the wheels, the GGUF's conversion and the checkpoint written after
# the signal need the rest of the call's 600 s), FINISH_S (the finish call's, default 450: the training seconds
# left, ~15% more for the held-out evaluations the training clock does not count, and ~60 s for start-up and the
# export; the lm-eval scoring after it needs ~70 s more of the call).
# PIQA along the run: SETS="eval.tasks=[piqa_local] eval.track_every=500" (the data folder is $BITCONVERT_DATA;
# each scoring of all 1838 items takes wall time the training clock does not count, so lower STOP_S and
# FINISH_S to match, or set eval.track_limit; the recipe's eval.tasks also scores the export after training).
set -uo pipefail
out=${OUT:?}; stage=${STAGE:?setup, train or finish}
work=/root/m
name=${NAME:-smollm2_distill_h200_10min}
sets=()
for item in ${SETS:-}; do sets+=(--set "$item"); done
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 BITCONVERT_DATA=$work/data PYTHONPATH=$work/site
quiet() { grep --line-buffered -v 'it/s\]' ; }
# $1: seconds after which the trainer gets a SIGINT (checkpoint, then stop); the rest goes to bitconvert run
recipe=${RECIPE:-recipes/smollm2-gpu.yaml}
run() { timeout -s INT "$1" python3 -m bitconvert.cli run "$recipe" --set model="$work/smol-hf" \
          --set output="$work/tern" "${sets[@]}" "${@:2}" 2>&1 | quiet | tail -12 ; }
# .data and the wheels that do not fit beside part-a (.whl-late) travel in whichever call has room for them
late_wheels() { [ -d .whl-late ] && python3 -m pip install -q --no-index --no-deps --target $work/site .whl-late/*.whl 2>&1 | tail -2; }
copy_data() { [ -d .data ] && mkdir -p $work/data && cp -r .data/. $work/data/ && chmod -R u+w $work/data; }
case $stage in
  setup)
    mkdir -p $work && cp .models/part-a/smol.part-aa $work/
    copy_data
    python3 -m pip install -q --no-index --no-deps --target $work/site .whl/*.whl 2>&1 | tail -2
    python3 -c "import gguf, pydantic; print('gguf, pydantic', pydantic.VERSION)" ;;
  train)
    late_wheels
    copy_data
    # the machine that ran the setup call may have gone back in between: its first half is gone then
    [ -f $work/smol.part-aa ] || { echo "no $work/smol.part-aa: the setup call's machine is gone; run STAGE=setup again"; exit 2; }
    cat $work/smol.part-aa .models/part-b/smol.part-ab > $work/smollm2.gguf
    python3 -c "
from bitconvert.sources import load_model
m, t = load_model('$work/smollm2.gguf'); m.save_pretrained('$work/smol-hf'); t.save_pretrained('$work/smol-hf')" 2>&1 | quiet
    run "${STOP_S:-500}"
    # the curve so far comes back even if the machine is lost before the finish call
    cp "$work/tern/training/metrics.jsonl" "$out/${name}_metrics_part1.jsonl" 2>/dev/null
    ls -la $work/tern/training | tail -5 ;;
  finish)
    late_wheels
    run "${FINISH_S:-450}" --resume
    # a SIGINT that lands after the last step, in the export, leaves the final checkpoint and no export:
    # another finish call exports from that checkpoint without training again
    if [ ! -f "$work/tern/bitconvert.json" ]; then
      cp "$work/tern/training/metrics.jsonl" "$out/${name}_metrics.jsonl"
      echo "no export in $work/tern (FINISH_S ran out before the export ended): run STAGE=finish again"; exit 3
    fi
    python3 benchmarks/eval_smollm2.py --model "$work/smol-hf" --ternary "$work/tern" --data-dir "$BITCONVERT_DATA" \
      --out "$out" 2>&1 | quiet | tail -25
    cp "$work/tern/training/metrics.jsonl" "$out/${name}_metrics.jsonl"
    cp "$work/tern/training_curves.png" "$out/${name}_curves.png" 2>/dev/null
    # at most 8 files come back from a call: the resolved recipe is not copied, since the model card holds it
    # verbatim (its ```yaml block is the run folder's recipe.yaml)
    cp "$work/tern/README.md" "$out/${name}_model_card.md" 2>/dev/null
    python3 benchmarks/fit_curve.py "$out/${name}_metrics.jsonl" --out "$out" 2>&1 | tail -12
    ls -la "$out" ;;
esac
