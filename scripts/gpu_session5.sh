#!/usr/bin/env bash
# The compacting kernel: GPU tests, tile sweep, kernel table at batch 1.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pytest tests/test_sparse_ops.py -q -x -p no:logging 2>&1 | grep -v DEBUG | tail -30 | tee $OUT/pytest_gpu.txt
python3 scripts/bench_kernels.py --batch 1 --sparsity 0,0.5,0.9 2>&1 | tee $OUT/bench_kernels_b1.txt
timeout 300 python3 scripts/bench_kernels.py --sweep --batch 1,4 --sparsity 0,0.5,0.9 --json $OUT/sweep.json 2>&1 | grep -v skip | tee $OUT/sweep.txt
