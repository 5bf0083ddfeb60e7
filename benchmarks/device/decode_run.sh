# Decode attention and the SwiGLU epilogue on the compiled 2.4B model (benchmarks/results/kernels-h200-decode.*):
# the checks, then bf16 with either attention and packed+fused with each new part switched off in turn,
# every step profiled. One 10-minute call; each variant is saved as it ends.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout ${LIMIT:-560} python3 benchmarks/bench_kernels.py --out $OUT/main --sections ${SECTIONS:-check,e2e} \
  --checks ${CHECKS:-ternary,swiglu,attention} --models Llama-2.4B --modes compiled --profile \
  --variants ${VARIANTS:-bf16_decode_attention,packed_fused,packed_fused_pdl,packed_fused_pdl_sdpa,packed_fused_pdl_no_swiglu} \
  > $OUT/main.log 2>&1 || echo "rc $?"
grep "^# \|FAIL\|ERROR\|Error" $OUT/main.log | grep -v "^# e2e\|Loading" | tail -40
python3 - <<'PY'
import json, os
data = json.load(open(os.environ["OUT"] + "/main/kernels.json"))
for run in data.get("e2e", []):
    for key, value in run.items():
        if isinstance(value, dict) and "compiled" in value:
            c = value["compiled"]
            prof = c.get("profile", {}).get("by_kind", {})
            print(key, round(c.get("tokens_per_s", 0), 1), c.get("first_step_relerr_vs_full_forward"), c.get("error", ""),
                  {k[:12]: round(v["us_per_step"]) for k, v in prof.items()})
        elif "relerr" in key or key.startswith("speedup") or key == "swiglu_mlps":
            print(key, value)
PY
