#!/usr/bin/env bash
# Decode benchmarks (Llama-3-8B, Llama-2-7B), the kernel table at batch 1-8, the GPU tests of the sparse ops.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 scripts/bench_decode.py --preset llama-3-8b --sparsity 0.4,0.5 --json $OUT/decode_llama3.json 2>&1 | grep -v Warning | tee $OUT/decode_llama3.txt
python3 scripts/bench_decode.py --preset llama-2-7b --sparsity 0.25,0.4,0.5 --json $OUT/decode_llama2.json 2>&1 | grep -v Warning | tee $OUT/decode_llama2.txt
python3 scripts/bench_kernels.py --json $OUT/bench_kernels.json 2>&1 | tee $OUT/bench_kernels.txt
python3 -m pytest tests/test_sparse_ops.py -q -x -p no:logging 2>&1 | grep -v DEBUG | tail -30 | tee $OUT/pytest_gpu.txt
