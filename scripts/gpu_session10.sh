#!/usr/bin/env bash
# Session 10 device runs, one stage per call (each fits the 10-minute limit):
#   tests:   GPU tests of the ops, the attention kernel and the compiled model
#   attn:    the attention table, then Llama-3-8B decode at 40/50% (or the levels given), profiled
#   final:   Llama-3-8B decode at 40/50% profiled (fresh compile), then the GPU tests of the GEMV ops and the
#            compiled model (ran for the down-projection experiment in docs/benchmarks.md, session 10)
#   kernels: the sparse GEMV kernel table at batch 1-8
#   models:  decode at 40/50% for the presets given (default: Llama-2-7B and Mistral-7B)
# Every stage that times decode clears inductor's cache first: the cache keys the graph that calls a triton_op,
# not the op's Python body, so an edited op could otherwise be served from an old compile.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee -a $OUT/gpu.txt
case "$1" in
tests)
  timeout 500 python3 -m pytest tests/test_attention.py tests/test_sparse_ops.py tests/test_model.py -q -p no:warnings \
    2>&1 | tail -4 | tee $OUT/tests.txt
  ;;
attn)
  timeout 90 python3 scripts/bench_attention.py --json $OUT/bench_attention.json 2>&1 | grep -v -i warn \
    | tee $OUT/bench_attention.txt
  rm -rf /tmp/torchinductor_$(whoami)
  timeout 400 python3 scripts/bench_decode.py --preset llama-3-8b --sparsity ${2:-0.4,0.5} --profile \
    --json $OUT/decode_llama3.json 2>&1 | grep -v -i warn | tee $OUT/decode_llama3.txt | grep -v "^      "
  ;;
final)
  rm -rf /tmp/torchinductor_$(whoami)
  timeout 400 python3 scripts/bench_decode.py --preset llama-3-8b --sparsity 0.4,0.5 --profile \
    --json $OUT/decode_llama3.json 2>&1 | grep -v -i warn | tee $OUT/decode_llama3.txt | grep -v "^      "
  timeout 150 python3 -m pytest tests/test_sparse_ops.py tests/test_model.py -q -p no:warnings \
    -k "llama_shapes or glu or compiled" 2>&1 | tail -4 | tee $OUT/tests.txt
  ;;
kernels)
  timeout 330 python3 scripts/bench_kernels.py --json $OUT/bench_kernels.json 2>&1 | grep -v -i warn > $OUT/bench_kernels.txt
  tail -2 $OUT/bench_kernels.txt
  ;;
models)
  rm -rf /tmp/torchinductor_$(whoami)
  for m in ${2:-llama-2-7b mistral-7b}; do
    timeout 290 python3 scripts/bench_decode.py --preset $m --sparsity 0.4,0.5 --json $OUT/decode_$m.json 2>&1 \
      | grep -v -i warn | tee $OUT/decode_$m.txt
  done
  ;;
*)
  echo "usage: gpu_session10.sh tests|attn|final|kernels|models [arg]" >&2; exit 2
  ;;
esac
