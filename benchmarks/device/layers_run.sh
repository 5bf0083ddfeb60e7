# Decoder layers that hand their work to the products (bitconvert.layers.decoder) and inductor's kernels
# launched with PDL by default: the checks of what changed, the compiled 2.4B decode with and without the
# layers, then the batch-1 kernel rows (with the "codes given" column) in the time left of one call.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout ${LIMIT:-330} python3 benchmarks/bench_kernels.py --out $OUT/main --sections check,e2e \
  --checks ${CHECKS:-layers,attention} --models Llama-2.4B --modes compiled ${PROFILE---profile} \
  --variants ${VARIANTS:-packed_fused,packed_fused_pdl_layers,packed_fused_pdl_layers_noprefetch} > $OUT/main.log 2>&1 || echo "rc $?"
grep "^# \|FAIL\|ERROR\|Error\|rror:" $OUT/main.log | grep -v "^# e2e\|Loading" | tail -30
python3 - <<'PY'
import json, os
data = json.load(open(os.environ["OUT"] + "/main/kernels.json"))
for run in data.get("e2e", []):
    for key, value in run.items():
        if isinstance(value, dict) and "compiled" in value:
            c = value["compiled"]
            prof = c.get("profile", {}).get("by_kind", {})
            print(key, round(c.get("tokens_per_s", 0), 1), c.get("first_step_relerr_vs_full_forward"), c.get("error", ""),
                  {k[:12]: (round(v["us_per_step"]), v.get("kernels_per_step")) for k, v in prof.items()})
        elif "relerr" in key or key.startswith("speedup"):
            print(key, value)
PY
left=$((585 - SECONDS))
if [ $left -gt 60 ]; then
  timeout $left python3 benchmarks/bench_kernels.py --out $OUT/rows --sections kernels --batches 1 --budget-s $((left - 25)) > $OUT/rows.log 2>&1 || echo "rows rc $?"
  grep " b1 " $OUT/rows.log || true
fi
