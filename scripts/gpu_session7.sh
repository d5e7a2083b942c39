#!/usr/bin/env bash
# Per-projection / weighted variants on Llama-3-8B; Llama-2-7B and Mistral-7B decode.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 scripts/bench_decode.py --preset llama-3-8b --sparsity 0.4,0.5 --variants uniform,per_projection,weighted --json $OUT/decode_llama3_variants.json 2>&1 | grep -v Warning | tee $OUT/decode_llama3_variants.txt
python3 scripts/bench_decode.py --preset llama-2-7b --sparsity 0.25,0.4,0.5 --json $OUT/decode_llama2.json 2>&1 | grep -v Warning | tee $OUT/decode_llama2.txt
python3 scripts/bench_decode.py --preset mistral-7b --sparsity 0.4,0.5 --json $OUT/decode_mistral.json 2>&1 | grep -v Warning | tee $OUT/decode_mistral.txt
