#!/usr/bin/env bash
# Session 8 device runs, one stage per call (each fits the 10-minute limit):
#   kernels: kernel table at batch 1-8 (with each kernel's own time), then Mistral-7B decode at 40/50%
#   cli:     the user path on a random-weight Llama-3-8B folder: make_random_checkpoint.py, calibrate.py,
#            generate.py --compile at 50%, then dense
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee -a $OUT/gpu.txt
case "$1" in
kernels)
  timeout 200 python3 scripts/bench_kernels.py --json $OUT/bench_kernels.json 2>&1 | grep -v -i warn > $OUT/bench_kernels.txt
  tail -2 $OUT/bench_kernels.txt
  timeout 360 python3 scripts/bench_decode.py --preset mistral-7b --sparsity 0.4,0.5 --json $OUT/decode_mistral.json 2>&1 | grep -v Warning | tee $OUT/decode_mistral.txt
  ;;
cli)
  C=/tmp/ckpt/random-llama-3-8b
  { time timeout 120 python3 scripts/make_random_checkpoint.py --preset llama-3-8b --out $C ; } 2>&1 | tee $OUT/cli.txt
  { time timeout 120 python3 calibrate.py --checkpoint $C/model.pth --tokens 4096 ; } 2>&1 | grep -v -i warn | tail -6 | tee -a $OUT/cli.txt
  cp $C/thresholds.json $OUT/thresholds_random_llama3.json
  for s in 0.5 0; do
    echo "### python3 generate.py --checkpoint $C/model.pth --compile --sparsity $s --temperature 0 --max_new_tokens 200 --num_samples 3 --no_stream" | tee -a $OUT/cli.txt
    timeout 300 python3 generate.py --checkpoint $C/model.pth --compile --sparsity $s --temperature 0 \
      --max_new_tokens 200 --num_samples 3 --no_stream 2>&1 | grep -v -i warn | grep -v "^<r" | tail -14 | tee -a $OUT/cli.txt
  done
  ;;
esac
