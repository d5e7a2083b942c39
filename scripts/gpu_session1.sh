#!/usr/bin/env bash
# One device call: GPU tests of the sparse ops, the kernel table, a tile sweep.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
python3 -m pytest tests/test_sparse_ops.py -q -x 2>&1 | tail -15 | tee $OUT/pytest_gpu.txt
python3 scripts/bench_kernels.py --batch 1,4 --json $OUT/bench_kernels.json 2>&1 | tee $OUT/bench_kernels.txt
timeout 280 python3 scripts/bench_kernels.py --sweep --batch 1 --sparsity 0,0.5,0.9 --json $OUT/sweep.json 2>&1 | grep -v skip | tee $OUT/sweep.txt
