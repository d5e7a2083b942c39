#!/usr/bin/env bash
# session 40: decode Llama-3-8B at 0.4/0.5, new gemv.py then the old one (25ac363), fresh inductor cache each
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee -a $OUT/gpu.txt
rm -rf /tmp/old && cp -r . /tmp/old && cp scratch/gemv_old_25ac363.py /tmp/old/sparse_ops/gemv.py
rm -rf /tmp/torchinductor_$(whoami)
timeout 280 python3 scripts/bench_decode.py --preset llama-3-8b --sparsity 0.4,0.5 --profile \
  --json $OUT/session40_decode_llama3_new.json 2>&1 | grep -v -i warn | grep -v "^      "
rm -rf /tmp/torchinductor_$(whoami)
cd /tmp/old && timeout 280 python3 scripts/bench_decode.py --preset llama-3-8b --sparsity 0.4,0.5 --profile \
  --json $OUT/session40_decode_llama3_old.json 2>&1 | grep -v -i warn | grep -v "^      "
