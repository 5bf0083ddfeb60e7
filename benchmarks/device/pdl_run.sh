# Launch-overlap experiment on one GPU (issue 4): e2e compiled decode of the 2.4B Llama, packed+fused
# with and without PDL / L2 prefetch / inductor PDL / the compiled quantizer. STAGE=kernels instead runs
# the GPU checks and the batch-1 kernel rows with PDL + prefetch, then the kernel rows without.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if [ "${STAGE:-e2e}" = kernels ]; then
  python3 benchmarks/bench_kernels.py --out $OUT/pdl --sections check,kernels --overlap pdl --batches 1 > $OUT/pdl.log 2>&1
  python3 benchmarks/bench_kernels.py --out $OUT/off --sections kernels --batches 1 > $OUT/off.log 2>&1
  grep " b1 \|check:" $OUT/pdl.log $OUT/off.log
else
  python3 benchmarks/bench_kernels.py --out $OUT/e2e --sections e2e --models Llama-2.4B --modes compiled --profile \
    --variants ${VARIANTS:-bf16_pdl,packed_fused,packed_fused_pdl,packed_fused_pdl_kernels,packed_fused_pdl_noprefetch,packed_fused_prequant_pdl} \
    --budget-s 500 > $OUT/e2e.log 2>&1 || echo "rc $?"
  sed -n '/Kernels launched to overlap/,$p' $OUT/e2e/kernels.md
fi
