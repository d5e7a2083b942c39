#!/usr/bin/env bash
# Session 9 device runs, one stage per call (each fits the 10-minute limit):
#   sweep:   the split-count sweep at batch 1 and 4 (what pick_config's "two programs per SM" comes from)
#   kernels: GPU tests of the sparse ops, the kernel table at batch 1-8
#   final:   the batch-1 kernel table, a fresh compile, Llama-3-8B decode at 0-65% with the kernel-time breakdown
#   models:  Llama-2-7B and Mistral-7B decode at 40/50% (or the presets given: gpu_session9.sh models mistral-7b)
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee -a $OUT/gpu.txt
case "$1" in
sweep)
  timeout 150 python3 scripts/bench_kernels.py --sweep --batch 1,4 --sparsity 0.5 --json $OUT/sweep.json 2>&1 \
    | grep -v -i warn > $OUT/sweep.txt; grep -v "^    " $OUT/sweep.txt
  ;;
kernels)
  timeout 150 python3 -m pytest tests/test_sparse_ops.py -q 2>&1 | tail -1 | tee $OUT/tests.txt
  timeout 330 python3 scripts/bench_kernels.py --json $OUT/bench_kernels.json 2>&1 | grep -v -i warn > $OUT/bench_kernels.txt
  tail -2 $OUT/bench_kernels.txt
  ;;
final)
  rm -rf /tmp/torchinductor_$(whoami)  # a fresh compile: inductor's cache keys a triton_op call, not its Python body
  timeout 100 python3 scripts/bench_kernels.py --batch 1 --json $OUT/bench_kernels_b1.json 2>&1 | grep -v -i warn > $OUT/bench_kernels_b1.txt
  timeout 440 python3 scripts/bench_decode.py --preset llama-3-8b --sparsity 0,0.25,0.4,0.5,0.65 --profile \
    --json $OUT/decode_llama3.json 2>&1 | grep -v -i warn | tee $OUT/decode_llama3.txt | grep -v "^      "
  ;;
models)
  for m in ${2:-llama-2-7b mistral-7b}; do
    timeout 290 python3 scripts/bench_decode.py --preset $m --sparsity 0.4,0.5 --json $OUT/decode_$m.json 2>&1 \
      | grep -v -i warn | tee $OUT/decode_$m.txt
  done
  ;;
esac
