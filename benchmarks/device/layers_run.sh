# The decoder layers that hand their work to the products (bitconvert.layers.decoder) and inductor's kernels
# launched with PDL (both bitconvert's defaults now): the checks of what changed, the compiled 2.4B decode with
# and without the layers, then the batch-1 kernel rows (with the "codes given" column) in the time left.
# The rotary embedding inside attention (kernels-h200-rope*): CHECKS=attention NO_ROWS=1 LIMIT=420
# VARIANTS=packed_fused,packed_fused_pdl_no_rope (PROFILE= SECTIONS=e2e for a repeat without the profile).
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout ${LIMIT:-330} python3 benchmarks/bench_kernels.py --out $OUT/main --sections ${SECTIONS:-check,e2e} \
  --checks ${CHECKS:-layers,attention} --models Llama-2.4B --modes compiled ${PROFILE---profile} \
  --variants ${VARIANTS:-packed_fused,packed_fused_pdl_no_layers,packed_fused_pdl_kernels_no_layers} > $OUT/main.log 2>&1 || echo "rc $?"
grep "^# \|FAIL\|ERROR\|Error\|rror:" $OUT/main.log | grep -v "^# e2e\|Loading" | tail -30
grep "tokens_per_s\|relerr_decoder" $OUT/main.log | cut -c1-160 || true
left=$((585 - SECONDS))
if [ $left -gt 60 ] && [ -z "$NO_ROWS" ]; then
  timeout $left python3 benchmarks/bench_kernels.py --out $OUT/rows --sections kernels --batches 1 --budget-s $((left - 25)) > $OUT/rows.log 2>&1 || echo "rows rc $?"
  grep " b1 " $OUT/rows.log || true
fi
