#!/usr/bin/env bash
# Session 8 device runs, one stage per call (each fits the 10-minute limit):
#   kernels: GPU tests of the ops, kernel table at batch 1-8
#   decode:  Llama-3-8B decode at 0-65%, Mistral-7B at 40/50%
#   cli:     the user path on a random-weight Llama-3-8B folder: calibrate.py, generate.py dense / 40% / 50%;
#            then Llama-2-7B decode
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee -a $OUT/gpu.txt
case "$1" in
kernels)
  timeout 170 python3 -m pytest tests/test_sparse_ops.py -q -x -p no:logging 2>&1 | tail -5 | tee $OUT/pytest_gpu.txt
  timeout 400 python3 scripts/bench_kernels.py --json $OUT/bench_kernels.json 2>&1 | grep -v -i warn | tee $OUT/bench_kernels.txt | tail -3
  ;;
decode)
  timeout 330 python3 scripts/bench_decode.py --preset llama-3-8b --sparsity 0,0.25,0.4,0.5,0.65 --json $OUT/decode_llama3.json 2>&1 | grep -v Warning | tee $OUT/decode_llama3.txt
  timeout 240 python3 scripts/bench_decode.py --preset mistral-7b --sparsity 0.4,0.5 --json $OUT/decode_mistral.json 2>&1 | grep -v Warning | tee $OUT/decode_mistral.txt
  ;;
cli)
  C=/tmp/ckpt/random-llama-3-8b
  { time python3 scripts/make_random_checkpoint.py --preset llama-3-8b --out $C ; } 2>&1 | tee $OUT/cli.txt
  { time timeout 150 python3 calibrate.py --checkpoint $C/model.pth --sparse_aware ; } 2>&1 | grep -v -i warn | tail -8 | tee -a $OUT/cli.txt
  cp $C/thresholds.json $OUT/thresholds_random_llama3.json
  for s in 0 0.4 0.5; do
    echo "### generate.py --sparsity $s" | tee -a $OUT/cli.txt
    timeout 150 python3 generate.py --checkpoint $C/model.pth --compile --sparsity $s --temperature 0 \
      --max_new_tokens 200 --num_samples 3 --no_stream 2>&1 | grep -v -i warn | grep -v "^<r\|^sample .*:$" | tail -14 | tee -a $OUT/cli.txt
  done
  timeout 200 python3 scripts/bench_decode.py --preset llama-2-7b --sparsity 0.25,0.4,0.5 --json $OUT/decode_llama2.json 2>&1 | grep -v Warning | tee $OUT/decode_llama2.txt
  ;;
esac
