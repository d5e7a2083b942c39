#!/usr/bin/env bash
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pytest tests/test_sparse_ops.py -q -x -k "graph or opcheck" -p no:logging 2>&1 | grep -v DEBUG | tail -40 | tee $OUT/pytest_gpu.txt
python3 scripts/bench_kernels.py --batch 1,4 --sparsity 0,0.5,0.9 --json $OUT/bench_kernels.json 2>&1 | tee $OUT/bench_kernels.txt
timeout 330 python3 scripts/bench_kernels.py --sweep --batch 1,4 --sparsity 0,0.5,0.9 --json $OUT/sweep.json 2>&1 | grep -v skip | tee $OUT/sweep.txt
