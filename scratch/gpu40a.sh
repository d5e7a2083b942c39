#!/usr/bin/env bash
# session 40: GPU tests of the GEMV op, the segment-slot mutation check, the batch-1 kernel table (new code)
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee -a $OUT/gpu.txt
{ time timeout 240 python3 -m pytest tests/test_sparse_ops.py -q -p no:warnings 2>&1 | tail -6; } > $OUT/gpu_tests_session40_sparse_ops.txt 2>&1
cat $OUT/gpu_tests_session40_sparse_ops.txt
cp sparse_ops/gemv.py /tmp/gemv.keep
sed -i 's/((seg \* tl.num_programs(1) + pid_k)/((0 * tl.num_programs(1) + pid_k)/' sparse_ops/gemv.py
grep -c "((0 \* tl.num_programs(1)" sparse_ops/gemv.py
timeout 90 python3 -m pytest tests/test_sparse_ops.py -q -p no:warnings -k segments_apart 2>&1 | tail -4 \
  | tee $OUT/gpu_mutation_session40_segment_slot.txt
cp /tmp/gemv.keep sparse_ops/gemv.py
timeout 330 python3 scripts/bench_kernels.py --batch 1 --json $OUT/bench_kernels_b1_session40.json 2>&1 | grep -v -i warn \
  | tee $OUT/bench_kernels_b1_session40.txt
