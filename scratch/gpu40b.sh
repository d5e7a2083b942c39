#!/usr/bin/env bash
# session 40: the batch-1 kernel table of the old gemv.py (25ac363) and of the new one, alternately, one machine
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee -a $OUT/gpu.txt
rm -rf /tmp/old && cp -r . /tmp/old && cp scratch/gemv_old_25ac363.py /tmp/old/sparse_ops/gemv.py
for r in 1 2; do
  (cd /tmp/old && timeout 140 python3 scripts/bench_kernels.py --batch 1 --sparsity 0,0.5,0.9 \
     --json $OUT/session40_kernels_old_r$r.json 2>&1 | grep -v -i warn | grep "llama-3 gate|up\|fused\|down")
  timeout 140 python3 scripts/bench_kernels.py --batch 1 --sparsity 0,0.5,0.9 \
     --json $OUT/session40_kernels_new_r$r.json 2>&1 | grep -v -i warn | grep "llama-3 gate|up\|fused\|down"
done
