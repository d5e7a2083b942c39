"""Convert a Hugging Face Llama / Mistral / Qwen2 folder into a tealfast checkpoint folder.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M
    python scripts/convert_hf_checkpoint.py --repo meta-llama/Llama-3.1-8B --checkpoint_dir DIR   # download first

Writes model.pth (gpt-fast names, q/k rows permuted for interleaved RoPE, q|k|v fused into wqkv),
config.json (unchanged), the tokenizer files, the chat template and generation_config.json where the model has
them, and tealfast.json. Any mismatch is one `error:` line.
"""
import base64
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cli  # noqa: E402
from checkpoint import (brief, check_state_dict, check_target, check_weights, from_hf_config,  # noqa: E402
                        is_hf_folder, permute_qk, read_config, save_checkpoint)
from model import DTYPES, CheckpointError, ModelArgs, Transformer  # noqa: E402
from tokenizer import (CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE,  # noqa: E402
                       TOKENIZER_CLASSES, TOKENIZER_CONFIG_FILE, load_tokenizer, read_json)

# Buffers older exporters saved; RoPE frequencies come from config.json instead.
HARMLESS = re.compile(r"\.rotary_emb\.inv_freq$")
# HF per-layer names -> our per-layer names (q/k/v are handled separately: they are fused).
LAYER_MAP = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
HF_EXTRAS = (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, GENERATION_CONFIG_FILE)
REPO_FILE = ".hf_repo"  # in a --repo folder: the repo downloaded into it, which a later run may resume


def download(repo: str, local_dir: Path) -> None:
    """The repo's config, tokenizer and weights into local_dir, with huggingface_hub (HF_TOKEN for gated repos).
    Weights: model*.safetensors where the repo has them (not the consolidated.safetensors copy some repos also
    carry), else pytorch_model*.bin."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import logging as hub_logging

    # Into a new or empty folder, or one this repo's download filled before: another model's files would mix with
    # the download (weights in a format the repo lacks read instead of its own, its chat template kept)
    mark = local_dir / REPO_FILE
    held = mark.read_text().strip() if mark.is_file() else None
    if local_dir.is_dir() and any(p != mark for p in local_dir.iterdir()) and held != repo:
        what = f"the files of {held}" if held else f"files that no --repo {repo} download put there"
        raise CheckpointError(f"{local_dir} holds {what}: --repo downloads into a new or empty folder (to convert "
                              f"the files there, leave out --repo)")
    local_dir.mkdir(parents=True, exist_ok=True)
    mark.write_text(repo + "\n")
    hub_logging.set_verbosity_error()  # its retry warnings would come before our one-line error
    token = os.environ.get("HF_TOKEN") or None
    try:
        files = HfApi().list_repo_files(repo, token=token)
        weights = "model*.safetensors" if any(re.fullmatch(r"model.*\.safetensors", f) for f in files) \
            else "pytorch_model*.bin"
        snapshot_download(repo, local_dir=local_dir, token=token,
                          allow_patterns=["*.json", weights, "tokenizer.model", "original/tokenizer.model",
                                          CHAT_TEMPLATE_FILE])
    except Exception as e:  # offline, unknown or gated repo: the hub raises many kinds, with long messages
        have = (f" ({local_dir} holds a model already: python scripts/convert_hf_checkpoint.py --checkpoint_dir "
                f"{shlex.quote(str(local_dir))} converts it)" if is_hf_folder(local_dir) else "")
        raise ValueError(f"cannot download {repo}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}{have}") \
            from None


def load_hf_weights(d: Path) -> dict:
    """All tensors of the folder: safetensors (sharded or single) where there are any, else pytorch_model.bin
    (sharded or single). A repo may carry both kinds; download() fetches one."""
    from safetensors.torch import load_file

    def read(p: Path, loader) -> dict:
        try:
            state = loader(p)
        except (OSError, MemoryError):  # not the file's fault: cli.run says what they are
            raise
        except Exception as e:  # corrupt safetensors or pickle files raise assorted types, with long messages
            raise CheckpointError(f"cannot read {p} (truncated, corrupt, or holding more than tensors?): "
                                  f"{brief(e)}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{p} holds no flat mapping from weight names to tensors")
        return state

    def sharded(index_name: str, loader) -> dict:
        try:
            weight_map = json.loads((d / index_name).read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CheckpointError(f"corrupt {d / index_name} (no weight_map of shard files): {brief(e)}") from None
        for name in names:  # a shard is a file of this folder: no absolute path, no way out of it
            if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
                raise CheckpointError(f"{d / index_name}: shard {name!r} is not a file name inside {d}")
        shards = [d / name for name in names]
        state = {}
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"shard {shard.name} listed in {index_name} is missing")
            state.update(read(shard, loader))
        return state

    def load_bin(p: Path) -> dict:
        return torch.load(p, map_location="cpu", weights_only=True)

    if (d / "model.safetensors.index.json").is_file():
        return sharded("model.safetensors.index.json", load_file)
    if (d / "model.safetensors").is_file():
        return read(d / "model.safetensors", load_file)
    if (d / "pytorch_model.bin.index.json").is_file():
        return sharded("pytorch_model.bin.index.json", load_bin)
    if (d / "pytorch_model.bin").is_file():
        return read(d / "pytorch_model.bin", load_bin)
    raise CheckpointError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {d}")


def is_tiktoken_file(path: Path) -> bool:
    """tiktoken BPE files are text lines '<base64 token> <rank>'; sentencepiece models are protobuf binary."""
    lines = path.read_bytes()[:4096].splitlines()[:8]
    if not lines:
        return False
    try:
        for line in lines[:-1] if len(lines) > 1 else lines:  # the last line may be cut off by the 4 KiB read
            tok, rank = line.decode("ascii").split(" ")
            base64.b64decode(tok, validate=True)
            int(rank)
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def find_tokenizer(d: Path):
    """(kind, {name in output folder: source path or text}), the chat template among them where there is one."""
    if (d / "tokenizer.json").is_file():
        kind, files = "hf", {"tokenizer.json": d / "tokenizer.json"}
    else:
        cand = next((c for c in (d / "tokenizer.model", d / "original" / "tokenizer.model") if c.is_file()), None)
        if cand is None:
            raise CheckpointError(f"no tokenizer.json or tokenizer.model in {d} (or {d / 'original'})")
        kind, files = ("tiktoken" if is_tiktoken_file(cand) else "sentencepiece"), {"tokenizer.model": cand}
    # --chat reads the special tokens, every run generation_config.json's stop ids
    files.update({n: d / n for n in HF_EXTRAS if (d / n).is_file()})
    template = find_chat_template(d)
    if template is not None:
        files[CHAT_TEMPLATE_FILE] = template
    return kind, files


def find_chat_template(d: Path):
    """The chat template as transformers saves it: chat_template.jinja, else tokenizer_config.json's chat_template
    (a string, or named templates of which the one named "default"); None for a model without one."""
    if (d / CHAT_TEMPLATE_FILE).is_file():
        return d / CHAT_TEMPLATE_FILE
    config = d / TOKENIZER_CONFIG_FILE
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"cannot read {config}: {e}") from None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{config}: chat_template is not text")
    return template


def convert_state_dict(hf: dict, args: ModelArgs) -> dict:
    """HF names -> gpt-fast names with every shape checked against the config."""
    hf = {k: v for k, v in hf.items() if not HARMLESS.search(k)}
    q_rows, kv_rows = args.n_head * args.head_dim, args.n_local_heads * args.head_dim
    expected = {"model.embed_tokens.weight": (args.vocab_size, args.dim), "model.norm.weight": (args.dim,)}
    if not args.tie_embeddings:
        expected["lm_head.weight"] = (args.vocab_size, args.dim)
    layer_shapes = {
        "self_attn.q_proj.weight": (q_rows, args.dim),
        "self_attn.k_proj.weight": (kv_rows, args.dim),
        "self_attn.v_proj.weight": (kv_rows, args.dim),
        "self_attn.o_proj.weight": (args.dim, q_rows),
        "mlp.gate_proj.weight": (args.intermediate_size, args.dim),
        "mlp.up_proj.weight": (args.intermediate_size, args.dim),
        "mlp.down_proj.weight": (args.dim, args.intermediate_size),
        "input_layernorm.weight": (args.dim,),
        "post_attention_layernorm.weight": (args.dim,),
    }
    if args.qkv_bias:
        layer_shapes.update({"self_attn.q_proj.bias": (q_rows,), "self_attn.k_proj.bias": (kv_rows,),
                             "self_attn.v_proj.bias": (kv_rows,)})
    for i in range(args.n_layer):
        expected.update({f"model.layers.{i}.{name}": shape for name, shape in layer_shapes.items()})

    tied_head = args.tie_embeddings and "lm_head.weight" in hf
    check_weights({k: v for k, v in hf.items() if not (tied_head and k == "lm_head.weight")}, expected)
    if tied_head and not torch.equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"]):
        raise CheckpointError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")

    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if not args.tie_embeddings:
        out["output.weight"] = hf["lm_head.weight"]
    for i in range(args.n_layer):
        p = f"model.layers.{i}."
        q = permute_qk(hf[p + "self_attn.q_proj.weight"], args.n_head, args.head_dim)
        k = permute_qk(hf[p + "self_attn.k_proj.weight"], args.n_local_heads, args.head_dim)
        out[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, hf[p + "self_attn.v_proj.weight"]])
        if args.qkv_bias:
            qb = permute_qk(hf[p + "self_attn.q_proj.bias"], args.n_head, args.head_dim)
            kb = permute_qk(hf[p + "self_attn.k_proj.bias"], args.n_local_heads, args.head_dim)
            out[f"layers.{i}.attention.wqkv.bias"] = torch.cat([qb, kb, hf[p + "self_attn.v_proj.bias"]])
        for src, dst in LAYER_MAP.items():
            out[f"layers.{i}.{dst}"] = hf[p + src]
    return out


def convert(checkpoint_dir: Path, out_dir: Path, dtype: Optional[torch.dtype] = None) -> Path:
    """dtype: of the stored weights; None keeps the source's (gpt-fast's converter does too: an fp16 model
    stays exact, and the runtime's --dtype casts at load)."""
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"--checkpoint_dir {checkpoint_dir} is not a folder"
                              + ("" if checkpoint_dir.exists() else " (it does not exist)"))
    check_target(out_dir, checkpoint_dir)
    config = read_config(checkpoint_dir / "config.json")
    args = from_hf_config(config)
    kind, tok_files = find_tokenizer(checkpoint_dir)
    # Loaded as the runtime will load it: a tokenizer with more ids than the model's vocab_size, or BOS/EOS ids it
    # lacks, is refused now rather than by every later run
    generation = read_json(tok_files[GENERATION_CONFIG_FILE], required=False) if GENERATION_CONFIG_FILE in tok_files \
        else None
    load_tokenizer(kind, tok_files[TOKENIZER_CLASSES[kind].file_name], config, generation)
    state = convert_state_dict(load_hf_weights(checkpoint_dir), args)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):  # last check against the model itself, so the output always loads
        check_state_dict(Transformer(args), state)
    return save_checkpoint(out_dir, state, config, kind, tok_files, source=str(checkpoint_dir.resolve()))


def main(argv=None) -> None:
    parser = cli.ArgumentParser(description="Convert a Hugging Face Llama/Mistral/Qwen2 checkpoint folder "
                                            "to tealfast's model.pth format.")
    parser.add_argument("--checkpoint_dir", type=Path, required=True,
                        help="HF model folder with config.json, weights (safetensors or pytorch_model.bin) "
                             "and tokenizer files (with --repo: where they are downloaded)")
    parser.add_argument("--out", type=cli.out_folder, default=None,
                        help="output folder (default: the checkpoint folder itself)")
    parser.add_argument("--dtype", choices=["source"] + sorted(DTYPES), default="source",
                        help="dtype of the stored weights (default: the source's own; generate.py's --dtype "
                             "casts at load)")
    parser.add_argument("--repo", help="download this Hugging Face repo (ORG/NAME) into --checkpoint_dir first, "
                                       "with huggingface_hub (HF_TOKEN for gated repos)")
    opts = parser.parse_args(argv)
    cli.writable(opts.out or opts.checkpoint_dir, folder=True)  # the default too, before a download or conversion
    check_target(opts.out or opts.checkpoint_dir, opts.checkpoint_dir)
    if opts.repo:
        download(opts.repo, opts.checkpoint_dir)
    dtype = None if opts.dtype == "source" else DTYPES[opts.dtype]
    path = convert(opts.checkpoint_dir, opts.out or opts.checkpoint_dir, dtype)
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
