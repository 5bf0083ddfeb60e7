#!/usr/bin/env bash
# An ablation round (ROUND=5 by default; round 4 ran this way too) on one warm GPU machine, after
# `STAGE=setup bash benchmarks/smollm2_long_run.sh` (carry .whl .models/part-a) has put the GGUF's first half and
# the wheels under /root/m:
#   call 2, carry .models/part-b .data .whl-late:  CONFIGS=... bash benchmarks/device/round_run.sh
#   call 3, carry nothing:                          REUSE_MIX=1 CONFIGS=... bash benchmarks/device/round_run.sh
# The teacher text sampled in call 2 stays in /root/m/round$ROUND for call 3 (REUSE_MIX=1).
set -uo pipefail
work=/root/m
round=${ROUND:-5}
export PYTHONPATH=$work/site HF_HUB_OFFLINE=1
if [ -d .whl-late ]; then python3 -m pip install -q --no-index --no-deps --target $work/site .whl-late/*.whl 2>&1 | tail -2; fi
# a GGUF that is not whole (a call that came without the setup's first half) is joined again, not trusted
if [ "$(head -c 4 $work/smollm2.gguf 2>/dev/null)" != GGUF ] && [ -f .models/part-b/smol.part-ab ]; then
  [ -f $work/smol.part-aa ] || { echo "no $work/smol.part-aa: run the setup call first (STAGE=setup)"; exit 2; }
  cat $work/smol.part-aa .models/part-b/smol.part-ab > $work/smollm2.gguf
fi
if [ -d .data ] && [ ! -d $work/data ]; then mkdir -p $work/data && cp -r .data/. $work/data/ && chmod -R u+w $work/data; fi
ROUND=$round GGUF=$work/smollm2.gguf WORK=$work/round$round BITCONVERT_DATA=$work/data SPEED=0 \
  ROW_STEPS=${ROW_STEPS:-300} ROW_SECONDS=${ROW_SECONDS:-45} BUDGET_SECONDS=${BUDGET_SECONDS:-560} \
  bash benchmarks/qat_round.sh 2>&1 | grep -v 'it/s\]' | tail -40
