#!/usr/bin/env bash
# Final kernel: GPU tests, kernel table at batch 1-8, Llama-3-8B decode at 0-65%.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 -m pytest tests/test_sparse_ops.py -q -x -p no:logging 2>&1 | grep -v DEBUG | tail -20 | tee $OUT/pytest_gpu.txt
python3 scripts/bench_kernels.py --json $OUT/bench_kernels.json > $OUT/bench_kernels.txt 2>&1; tail -3 $OUT/bench_kernels.txt
python3 scripts/bench_decode.py --preset llama-3-8b --sparsity 0,0.25,0.4,0.5,0.65 --json $OUT/decode_llama3.json 2>&1 | grep -v Warning | tee $OUT/decode_llama3.txt
