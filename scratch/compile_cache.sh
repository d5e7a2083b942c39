#!/usr/bin/env bash
# Session 34 throwaway (device): compile time of generate.py --compile on a random Llama-3-8B, a cold inductor cache
# and then a warm one (a second process), dense and at 50%.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
log=$OUT/compile_cache.txt
ck=/tmp/ckpt/random-llama-3-8b
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a $log
rm -rf /tmp/torchinductor_$(whoami)
{ time python3 scripts/make_random_checkpoint.py --preset llama-3-8b --out $ck; } >> $log 2>&1
{ time python3 calibrate.py --checkpoint $ck/model.pth --tokens 4096; } 2>&1 | tr '\r' '\n' | grep -v "^calibrating" | tail -3 >> $log
for round in cold warm; do
  for s in 0 0.5; do
    echo "### $round cache: generate.py --compile --sparsity $s" | tee -a $log
    { time timeout 280 python3 scratch/compile_cache.py --checkpoint $ck/model.pth --compile --sparsity $s \
        --temperature 0 --max_new_tokens 100 --no_stream --prompt "Hello"; } 2>&1 | grep -v -i warn \
        | grep -E "loaded|compiled and warmed|^sample|counters|^real" | tee -a $log
  done
done
