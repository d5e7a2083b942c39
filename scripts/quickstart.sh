#!/usr/bin/env bash
# Fresh machine -> TEAL decoding of the embedded default model (SmolLM2-135M-Instruct) at 40% sparsity.
# Sets up .venv, prepares the checkpoint, calibrates thresholds once, then generates. Extra args go to generate.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -f .venv/bin/activate ]; then  # none yet, or one half made (interrupted, or venv failed): made again
    python3 -m venv --clear .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    # No GPU: the CPU build of torch from PyTorch's CPU index (PyPI's Linux wheel is the CUDA build, several GB;
    # pip prefers the index's 2.13.0+cpu), torch alone and without retries so that an offline machine with a local
    # index goes on at once; its dependencies then come from the usual index. With a GPU, pip picks the CUDA build.
    if command -v nvidia-smi >/dev/null 2>&1; then python -m pip install -q torch
    else
        python -m pip install -q --no-deps --retries 0 torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu
        python -m pip install -q torch==2.13.0
    fi
fi
python -m pip install -q -r requirements.txt
PYTHON=python bash scripts/prepare.sh smollm2-135m  # .venv's python, whatever $PYTHON the shell exports
ckpt=checkpoints/smollm2-135m/model.pth
extra=()  # the dtype defaults to bf16 on a GPU, fp32 on a CPU
if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then extra=(--compile); fi
case " $* " in  # the default prompt, unless one is given, prompts come from standard input or --chat has its own
    *" --prompt"* | *" --interactive "* | *" --chat "*) ;;
    *) extra+=(--prompt "Python's list comprehensions are") ;;
esac
# Calibrate once, and again where the file left by an earlier run does not load (an older schema, say).
if ! python -c "import sys, checkpoint, thresholds as t
try: t.load(t.default_path(sys.argv[1]), checkpoint.load_config(sys.argv[1]))
except ValueError as e: sys.exit(f'quickstart: {e}; calibrating again' if t.default_path(sys.argv[1]).exists() else 1)
" "$ckpt"; then
    python calibrate.py --checkpoint "$ckpt"
fi
python generate.py --checkpoint "$ckpt" --sparsity 0.4 --temperature 0 --max_new_tokens 64 "${extra[@]}" "$@"
