# The whole kernel benchmark at the current code in one 10-minute call (benchmarks/results/kernels.*): every
# GPU check, end-to-end decode of both models (CUDA graph; the 2.4B also compiled), then the kernel rows at
# batch 1, 8 and 64 in the time left. With the first half of the SmolLM2 GGUF carried (.models/part-a), it is
# kept on the machine for a second call, STAGE=real with .models/part-b, which decodes the real SmolLM2-135M.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || true
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /root/m
if [ "${STAGE:-main}" = real ]; then
  cat /root/m/smol.part-aa .models/part-b/smol.part-ab > /root/m/smollm2.gguf
  timeout ${LIMIT:-500} python3 benchmarks/bench_kernels.py --out $OUT/real --sections e2e --models SmolLM2-135M \
    --smollm2-gguf /root/m/smollm2.gguf --modes graph,compiled --compile-models SmolLM2-135M --variants packed_fused \
    > $OUT/real.log 2>&1 || echo "rc $?"
  grep "^# \|FAIL\|ERROR\|rror:\|tokens_per_s" $OUT/real.log | grep -v "^# e2e\|Loading" | cut -c1-160 | tail -20
  exit 0
fi
[ -f .models/part-a/smol.part-aa ] && cp .models/part-a/smol.part-aa /root/m/
timeout ${LIMIT:-570} python3 benchmarks/bench_kernels.py --out $OUT/main --sections check,e2e,kernels \
  --modes graph,compiled --variants packed_fused --budget-s ${BUDGET:-470} > $OUT/main.log 2>&1 || echo "rc $?"
grep "^# \|FAIL\|ERROR\|rror:" $OUT/main.log | grep -v "^# e2e\|Loading" | tail -30
grep "tokens_per_s\| b1 \| b8 \| b64 " $OUT/main.log | cut -c1-160 || true
