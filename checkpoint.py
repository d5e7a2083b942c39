"""The checkpoint folder, checkpoints/<name>/: model.pth (gpt-fast names), the HF config.json it was made from, the
tokenizer files and tealfast.json. The architecture comes from config.json (from_hf_config); reading checks every
weight against it (load_model); the converters write folders with save_checkpoint.
"""
import json
import math
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from model import PROJECTIONS, CheckpointError, ModelArgs, Transformer, to_column_major
from tokenizer import (CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, SCHEMA_VERSION,  # the folder as the runtime reads it
                       SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CLASSES, TOKENIZER_CONFIG_FILE)

# ministral: Mistral with a layer_types list (the type transformers gives a "mistral" config that has one)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "ministral", "qwen2")
# transformers' defaults for keys a config.json may leave out: the context and the sliding window (Mistral's, and
# Qwen2's where use_sliding_window is set)
HF_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "ministral": 131072, "qwen2": 32768}
HF_WINDOW = 4096
HF_KV_HEADS = {"mistral": 8, "ministral": 8, "qwen2": 32}  # transformers' num_key_value_heads where none is given
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def from_hf_config(cfg: dict) -> ModelArgs:
    """The architecture an HF config.json describes, checked: unsupported features and bad values fail loudly."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"unsupported model_type {mt!r} in config.json (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported hidden_act {cfg['hidden_act']!r} (only silu)")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window", "tie_word_embeddings"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):  # "false" would read as true
            raise CheckpointError(f"config.json: {key} must be true or false, got {cfg[key]!r}")
    # Llama's attention_bias also adds an o_proj bias, and mlp_bias MLP biases: neither has a slot here. Mistral and
    # Qwen2 ignore both keys (Mistral has no biases, Qwen2 its q/k/v biases, whatever the keys say).
    if mt == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise CheckpointError("unsupported attention_bias/mlp_bias in a llama config.json (an o_proj or MLP bias)")
    if cfg.get("quantization_config") is not None:
        q = cfg["quantization_config"]
        method = q.get("quant_method") if isinstance(q, dict) else None
        raise CheckpointError(f"config.json has a quantization_config{f' ({method})' if method else ''}: quantized "
                              f"weights are not supported; convert the unquantized model")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if cfg.get(key) is None:  # absent or null
            raise CheckpointError(f"config.json lacks {key!r}")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "rms_norm_eps"):
        v, real = cfg.get(key), key == "rms_norm_eps"
        if v is not None and not ((real or isinstance(v, int)) and positive_number(v)):
            raise CheckpointError(f"config.json: {key} must be a positive {'number' if real else 'integer'}, "
                                  f"got {v!r}")
    n_head, dim = cfg["num_attention_heads"], cfg["hidden_size"]
    # absent: the model type's default; null: every head has its own (as transformers reads both)
    n_kv = cfg.get("num_key_value_heads", HF_KV_HEADS.get(mt)) or n_head
    if n_head % n_kv:
        raise CheckpointError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
    max_pos = cfg.get("max_position_embeddings") or HF_MAX_POSITIONS[mt]
    window, full_layers = sliding_window(cfg, mt)
    # transformers 5 keeps rope_theta and the scaling in rope_parameters, but takes the older rope_scaling over it
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"config.json: rope_scaling / rope_parameters must be an object, got {rope!r}")
    head_dim = cfg.get("head_dim") or dim // n_head
    if head_dim % 2:
        raise CheckpointError(f"config.json: head_dim {head_dim} is odd (hidden_size / num_attention_heads where not "
                              f"given); RoPE rotates pairs of channels")
    # that dict's rope_theta first, then the top level's (transformers ignores the latter where both are given)
    rope_base = next((v for v in (rope.get("rope_theta"), cfg.get("rope_theta")) if v is not None), 10000.0)
    if not positive_number(rope_base):
        raise CheckpointError(f"config.json: rope_theta must be a positive number, got {rope_base!r}")
    return ModelArgs(
        vocab_size=cfg["vocab_size"],
        dim=dim,
        n_layer=cfg["num_hidden_layers"],
        n_head=n_head,
        n_local_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=cfg["intermediate_size"],
        block_size=max_pos,
        sliding_window=window,
        full_layers=full_layers,
        norm_eps=cfg.get("rms_norm_eps") or 1e-6,  # transformers' default for Llama, Mistral and Qwen2
        rope_base=float(rope_base),
        rope_scaling=rope_scaling(rope, max_pos, cfg.get("original_max_position_embeddings")),
        qkv_bias=mt == "qwen2",
        tie_embeddings=cfg.get("tie_word_embeddings") is True,
    )


def sliding_window(cfg: dict, model_type: str) -> tuple:
    """(window, the layers that attend to every position) as transformers reads a config: the layers its
    layer_types marks full_attention; without that list, Mistral windows every layer (a 4,096-token window where
    the key is left out, none where it is null) and Qwen2 (only with use_sliding_window) the layers from
    max_window_layers on; Llama never."""
    window = cfg.get("sliding_window", HF_WINDOW) or 0
    if not window or model_type == "llama" or (model_type == "qwen2" and not cfg.get("use_sliding_window")):
        return 0, ()
    n, types = cfg["num_hidden_layers"], cfg.get("layer_types")
    if types is None:
        if model_type == "qwen2":
            first = cfg.get("max_window_layers", 28)  # transformers' default
            if not isinstance(first, int) or isinstance(first, bool) or first < 0:
                raise CheckpointError(f"config.json: max_window_layers must be an integer >= 0, got {first!r}")
            return window, tuple(range(min(first, n)))
        return window, ()
    if not (isinstance(types, list) and len(types) == n
            and all(t in ("full_attention", "sliding_attention") for t in types)):
        raise CheckpointError(f"config.json: layer_types must list {n} layers, each full_attention or "
                              f"sliding_attention, got {types!r}")
    return window, tuple(i for i, t in enumerate(types) if t == "full_attention")


def brief(e: Exception, limit: int = 160) -> str:
    """An exception for a one-line error: its type and first sentence, without terminal colour codes, cut at limit
    (torch's and safetensors' messages run long, with advice for other situations)."""
    why = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(e).split())).split(". ")[0]
    if len(why) > limit:
        why = why[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {why}" if why else type(e).__name__


def positive_number(v) -> bool:
    """A finite number above 0 (Python's json reads NaN and Infinity; a bool is no number here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def rope_scaling(rs: dict, max_position_embeddings: Optional[int], top_original: Optional[int] = None) \
        -> Optional[dict]:
    """The config's llama3 RoPE scaling (Llama-3.1 and later; rope_scaling, or transformers 5's rope_parameters),
    checked, or None for plain RoPE. top_original: an original_max_position_embeddings at the config's top level,
    which transformers takes over the dict's."""
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind != "llama3":
        raise CheckpointError(f"unsupported rope_scaling {rs!r} (only llama3)")
    # HF falls back to max_position_embeddings when original_max_position_embeddings is absent
    rs = {"original_max_position_embeddings": max_position_embeddings, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, **rs}
    if top_original is not None:
        rs["original_max_position_embeddings"] = top_original
    for key in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"):
        v = rs.get(key)
        if not positive_number(v):
            raise CheckpointError(f"config.json: llama3 rope_scaling needs a positive {key}, got {v!r}")
    if rs["high_freq_factor"] <= rs["low_freq_factor"]:
        raise CheckpointError("config.json: llama3 rope_scaling needs high_freq_factor > low_freq_factor")
    return rs


# a model's optional files that generate.py reads: --chat's template and special tokens, the stop ids
EXTRA_FILES = (CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, GENERATION_CONFIG_FILE)
FOLDER_FILES = ("config.json", "tealfast.json", "thresholds.json", "thresholds_weighted.json") + EXTRA_FILES + \
    tuple(dict.fromkeys(c.file_name for c in TOKENIZER_CLASSES.values()))  # beside model.pth: what the runtime reads


def check_output(out: Optional[Path], checkpoint_path, flag: str, allowed=(), inputs=(), outputs=None) -> None:
    """An output file (--out, --json, --plot, --profile) must not be one of the checkpoint folder's own files
    (its weights, config, tokenizer or thresholds, but the `allowed` names), one of the command's `inputs`
    (None where not given), nor another of its outputs ({flag: file}): writing it would destroy them."""
    if out is None:
        return
    target, ckpt = Path(out), Path(checkpoint_path)
    own = next((f for f in [ckpt] + [ckpt.parent / f for f in FOLDER_FILES if f not in allowed]
                if same_file(target, f)), None)
    if own is not None:
        raise ValueError(f"{flag} {out} would overwrite the checkpoint's own {own.resolve().name}")
    if any(same_file(target, Path(f)) for f in inputs if f is not None):
        raise ValueError(f"{flag} {out} would overwrite one of this command's input files")
    for other, f in (outputs or {}).items():
        if f is not None and same_file(target, Path(f)):
            raise ValueError(f"{flag} and {other} name the same file, {out}")


def same_file(a: Path, b: Path) -> bool:
    """One file under two names: the same path once symbolic links are resolved, or a hard link to it."""
    try:
        return a.resolve() == b.resolve() or a.samefile(b)
    except (OSError, RuntimeError):  # either does not exist (no hard link to it), or a link loop (RuntimeError: 3.11)
        return False


def hf_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def is_hf_folder(folder: Path) -> bool:
    """A Hugging Face model folder (weights and config.json) that no converter has written to."""
    return hf_weights(folder) and (folder / "config.json").is_file() and not (folder / "tealfast.json").is_file()


def check_target(out_dir, source_dir=None) -> None:
    """A converter's output folder, before the slow part: not the folder of Hugging Face weights other than the ones
    converted (source_dir; converting in place is fine), whose config.json and tokenizer it would replace."""
    out = Path(out_dir)
    if out.is_dir() and hf_weights(out) and not (source_dir is not None and Path(source_dir).is_dir()
                                                 and out.samefile(source_dir)):
        raise CheckpointError(f"{out} holds another model's Hugging Face weights: writing into it would replace "
                              f"their config.json and tokenizer (choose another output folder)")


def load_config(checkpoint_path) -> ModelArgs:
    """The architecture of checkpoints/<name>/model.pth from the config.json beside it, without reading the weights:
    the command lines check their other inputs against it before the (slow) load."""
    path = Path(checkpoint_path)
    folder = path if path.is_dir() else path.parent
    if is_hf_folder(folder):
        raise CheckpointError(f"{folder} is a Hugging Face model folder, not a converted checkpoint: convert it first "
                              f"(python scripts/convert_hf_checkpoint.py --checkpoint_dir {shlex.quote(str(folder))})")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: give its model.pth")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    return from_hf_config(read_config(path.parent / "config.json"))


def load_model(checkpoint_path, device="cpu", dtype=torch.bfloat16, column_major: bool = True) -> Transformer:
    """Load checkpoints/<name>/model.pth with the config.json beside it; fail loudly on any mismatch. column_major:
    the block weights in the layout the sparse ops read (model.to_column_major); a model that only ever runs dense
    keeps them as stored, row-major, where a compiled one-row decode's GEMVs read them faster."""
    path = Path(checkpoint_path)
    config = load_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises several kinds, with long messages, for truncated or foreign files
        # what torch says of a file that is no zip archive: its advice misleads
        why = "not the zip archive that torch.save writes" if "mmap can only be used" in str(e) else brief(e)
        raise CheckpointError(f"cannot read checkpoint {path} (truncated, corrupt, or not a weights-only torch.save "
                              f"file): {why}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in state.items()):
        raise CheckpointError(f"{path} holds no state dict (a mapping from weight names to tensors)")
    check_state_dict(model, state)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=False)
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    for b in model.layers:  # non-persistent buffers are still on the meta device
        b.thresholds = torch.zeros(len(PROJECTIONS), dtype=torch.float32)
    model = model.to(device)
    # A NaN or inf anywhere makes its tensor's sum one: one pass over the weights and a single sync, not a
    # decode that streams junk before its logits turn out non-finite
    sums = torch.stack([p.sum(dtype=torch.float32) for p in model.parameters()]).tolist()
    bad = [name for (name, _), s in zip(model.named_parameters(), sums) if not math.isfinite(s)]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"{path}: weight {bad[0]}{more} holds NaN or infinite values (a corrupt checkpoint)")
    if column_major:
        to_column_major(model)
    return model.eval().requires_grad_(False)  # inference only: compiled decode must not trace a backward


def read_config(path: Path) -> dict:
    """A checkpoint's HF config.json, parsed; a clear error when it is absent or corrupt."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not the checkpoint's config.json")
    if not path.is_file():
        raise CheckpointError(f"config.json not found: {path}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # not JSON or UTF-8, an integer past Python's 4,300 digits; too deep
        raise CheckpointError(f"corrupt config.json ({path}): {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"corrupt config.json ({path}): a JSON object expected, got {type(cfg).__name__}")
    return cfg


def check_state_dict(model: Transformer, state: dict) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("output.weight")
    if set(state) ^ set(expected) == {"output.weight"}:  # its presence follows the config's tie_word_embeddings
        raise CheckpointError(f"{'unknown' if 'output.weight' in state else 'missing'} weights: output.weight "
                              f"(config.json's tie_word_embeddings is {str(model.config.tie_embeddings).lower()}: "
                              f"it does not fit the weights)")
    check_weights(state, expected)


def check_weights(state: dict, expected: dict) -> None:
    """A clear error for unknown, missing or misshapen weights; expected: name -> shape the config implies."""
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state), key=lambda k: (len(k), k))
    if unknown:
        raise CheckpointError(f"unknown weights: {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}")
    if missing:
        raise CheckpointError(f"missing weights: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(f"weight {k} has shape {tuple(state[k].shape)}, config.json implies {shape}")
        if state[k].dtype not in WEIGHT_DTYPES:  # integer or fp8 codes would cast to numbers that mean nothing
            raise CheckpointError(f"weight {k} is {str(state[k].dtype).removeprefix('torch.')}, not a float tensor "
                                  f"(bfloat16, float16, float32 or float64; quantized weights are not supported)")


# ---- writing (the converters) -------------------------------------------------------------------
def permute_qk(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """HF stores q/k rows for rotate-half RoPE; model.py rotates interleaved pairs. Reorder rows to match.

    Within each head, HF row j (first half) pairs with j + head_dim/2; interleaved order puts them side by side.
    Works for weights (rows, in) and biases (rows,).
    """
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def save_checkpoint(out_dir, state_dict: dict, config: dict, tokenizer_kind: str, tokenizer_files: dict,
                    source: str) -> Path:
    """tokenizer_files maps a file name in out_dir to a pathlib.Path (copied, unless it is that file already) or to
    bytes/str (written); the chat template, if the model has one, is among them."""
    if tokenizer_kind not in TOKENIZER_CLASSES:
        raise ValueError(f"unknown tokenizer kind {tokenizer_kind!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.pth", "config.json", "tealfast.json", *tokenizer_files, *EXTRA_FILES):
        if (out / name).is_dir():  # found before anything in the folder is replaced
            raise CheckpointError(f"{out / name} is a folder: the conversion writes a file there")
    # model.pth takes its name last: prepare.sh takes a folder that has one as done, so a conversion cut short (a
    # full disk, Ctrl-C) must not leave one behind
    partial = out / "model.pth.partial"
    try:
        torch.save({k: v.contiguous() for k, v in state_dict.items()}, partial)
        (out / "config.json").write_text(json.dumps(config, indent=2))
        for name, src in tokenizer_files.items():
            if isinstance(src, Path):
                if not ((out / name).exists() and (out / name).samefile(src)):  # converting in place
                    shutil.copyfile(src, out / name)
            else:
                (out / name).write_bytes(src.encode() if isinstance(src, str) else src)
        for name in EXTRA_FILES:
            if name not in tokenizer_files:  # the replaced model's
                (out / name).unlink(missing_ok=True)
        meta = {"schema_version": SCHEMA_VERSION, "tokenizer": tokenizer_kind, "source": source}
        (out / "tealfast.json").write_text(json.dumps(meta, indent=2))
        os.replace(partial, out / "model.pth")
    except BaseException:
        partial.unlink(missing_ok=True)  # a few GB that nothing would ever read
        raise
    # thresholds calibrated on the weights just replaced: the fingerprint catches another shape, not a fine-tune
    for name in ("thresholds.json", "thresholds_weighted.json"):
        if (out / name).is_file():
            os.replace(out / name, out / f"{name}.stale")
            print(f"note: moved {out / name} to {name}.stale: it was calibrated on the weights this conversion "
                  f"replaced (run calibrate.py again, or rename it back if they were the same)", file=sys.stderr)
    return out / "model.pth"
