# The main kernel benchmark with bitconvert's defaults (benchmarks/results/kernels.*), then, in the
# time left of one 10-minute call, the kernel rows again with no launch overlap, side by side.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 benchmarks/bench_kernels.py --out $OUT/main --sections ${SECTIONS:-e2e,kernels} --modes graph,compiled \
  --variants bf16_decode_attention,packed_fused,packed_fused_no_overlap,packed_fused_pdl --budget-s ${BUDGET:-450} > $OUT/main.log 2>&1 || echo "rc $?"
grep "^#\|  b\| b1 \| b8 \| b64 " $OUT/main.log | grep -v "^# e2e\|Loading" | tail -30
left=$((570 - SECONDS))
if [ $left -gt 40 ]; then
  timeout $left python3 benchmarks/bench_kernels.py --out $OUT/off --sections kernels --overlap off --budget-s $((left - 30)) > $OUT/off.log 2>&1 || echo "off rc $?"
  grep " b1 \| b8 \| b64 " $OUT/off.log || true
fi
