#!/usr/bin/env bash
# Kernel redesign: tile sweep (batch 1 first), GPU correctness of the sparse ops.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
timeout 330 python3 scripts/bench_kernels.py --sweep --batch 1 --sparsity 0,0.5,0.9 --json $OUT/sweep_b1.json 2>&1 | grep -v Warning | tee $OUT/sweep_b1.txt
timeout 120 python3 -m pytest tests/test_sparse_ops.py -q -x 2>&1 | tail -15 | tee $OUT/pytest_sparse_ops.txt
timeout 120 python3 scripts/bench_kernels.py --sweep --batch 2,8 --sparsity 0.5 --json $OUT/sweep_b28.json 2>&1 | grep -v Warning | tee $OUT/sweep_b28.txt
