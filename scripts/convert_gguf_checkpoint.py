"""Convert a llama-architecture GGUF file (e.g. SmolLM2 from llama.cpp) into a tealfast checkpoint folder.

Writes model.pth (dequantized weights, gpt-fast names), an HF-style config.json, an HF tokenizer.json
rebuilt from the GGUF tokenizer metadata, its special tokens (special_tokens_map.json) and, where the GGUF has one,
its chat template.

q/k rows need no permuting: llama.cpp's converter already stores them in the interleaved-pair order that
model.py's RoPE uses (transformers has to undo that when it loads a GGUF; tests/test_convert_gguf.py checks it).
"""
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from checkpoint import brief, check_state_dict, check_target, from_hf_config, save_checkpoint  # noqa: E402
from model import DTYPES, CheckpointError, Transformer  # noqa: E402
from tokenizer import CHAT_TEMPLATE_FILE, LLAMA3_PAT_STR, SPECIAL_TOKENS_MAP_FILE  # noqa: E402

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)

# GGUF per-block tensor -> our key; attn_q/k/v are fused into wqkv separately.
BLOCK_NAMES = {
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}
TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}

# tokenizer.ggml.pre -> how llama.cpp splits text before BPE (llama-vocab.cpp).
GPT2_PRE = ("default", "gpt-2", "gpt2", "mpt", "olmo", "jais")
DIGITS_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3")
# Of those, llama.cpp takes a word that is a vocab entry whole, before any merge (HF's Llama-3 tokenizer.json:
# ignore_merges), and adds BOS unless the file says otherwise (tokenizer.ggml.add_bos_token)
LLAMA3_WHOLE_WORDS = ("llama-bpe", "llama3", "llama-v3", "falcon3")
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types
# special_tokens_map.json's names -> tokenizer.ggml.<key>_token_id, as transformers' GGUF loader pairs them
SPECIAL_TOKEN_IDS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}


class ConversionError(ValueError):
    """Anything about the input file that this converter does not handle."""


def field(reader: gguf.GGUFReader, key: str, default=None, kind: type = None):
    """A metadata value, default where the key is absent; with kind (int, float, bool or str) a value of another type,
    a per-layer array say, is an error naming the key (an int serves as a float)."""
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    if kind is not None and not (type(v) is kind or (kind is float and type(v) is int)):
        raise ConversionError(f"GGUF metadata {key} is {v!r}, not {'an' if kind is int else 'a'} {kind.__name__}")
    return v


def read_config(reader: gguf.GGUFReader, has_output: bool) -> dict:
    def need(key, kind=int):
        v = field(reader, f"llama.{key}", kind=kind)
        if v is None:
            raise ConversionError(f"GGUF metadata lacks llama.{key}")
        return v

    if field(reader, "llama.expert_count", 0, int):
        raise ConversionError("mixture-of-experts models are not supported")
    scaling = field(reader, "llama.rope.scaling.type", "none", str)
    if scaling != "none":
        raise ConversionError(f"unsupported rope scaling {scaling!r}")
    dim, n_head = need("embedding_length"), need("attention.head_count")
    if not all(v > 0 for v in (dim, n_head)):
        raise ConversionError(f"GGUF metadata: llama.embedding_length {dim!r} and llama.attention.head_count "
                              f"{n_head!r} must be positive integers")
    head_dim = field(reader, "llama.attention.key_length", dim // n_head, int)
    if field(reader, "llama.rope.dimension_count", head_dim, int) != head_dim:
        raise ConversionError("partial rotary embeddings are not supported")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": field(reader, "llama.attention.head_count_kv", n_head, int),
        "head_dim": head_dim,
        # float32 metadata: 7 significant digits give back the intended value (1e-05, not 9.9999997e-06)
        "rms_norm_eps": float(f'{need("attention.layer_norm_rms_epsilon", float):.7g}'),
        "rope_theta": float(f'{field(reader, "llama.rope.freq_base", 10000.0, float):.7g}'),
        "max_position_embeddings": need("context_length"),
        "vocab_size": None,  # filled in from the embedding's shape, which is what the model really has
        "tie_word_embeddings": not has_output,
        "hidden_act": "silu",
    }
    bos, eos, eot = (field(reader, f"tokenizer.ggml.{key}_token_id", kind=int) for key in ("bos", "eos", "eot"))
    if bos is not None:
        cfg["bos_token_id"] = bos
    # chat models may end a turn with a separate end-of-turn token: stop on either, or on it alone
    ends = list(dict.fromkeys(i for i in (eos, eot) if i is not None))
    if ends:
        cfg["eos_token_id"] = ends if len(ends) > 1 else ends[0]
    return cfg


def read_weights(reader: gguf.GGUFReader, cfg: dict, dtype: torch.dtype) -> dict:
    raw = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        # GGUF lists dims fastest-first; numpy/torch order is the reverse
        expected = tuple(int(d) for d in reversed(t.shape.tolist()))
        if w.shape != expected:
            raise ConversionError(f"tensor {t.name} dequantized to {w.shape}, expected {expected}")
        raw[t.name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)

    state = {}
    for i in range(cfg["num_hidden_layers"]):
        p = f"blk.{i}."
        try:
            qkv = [raw.pop(p + n + ".weight") for n in ("attn_q", "attn_k", "attn_v")]
        except KeyError as e:
            raise ConversionError(f"GGUF lacks tensor {e.args[0]}") from None
        if len({w.shape[1:] for w in qkv}) > 1:  # the fusion needs one input width (the config is checked after)
            raise ConversionError(f"{p}attn_q/k/v have shapes {[tuple(w.shape) for w in qkv]}: not one input width")
        state[f"layers.{i}.attention.wqkv.weight"] = torch.cat(qkv)
        for src, dst in BLOCK_NAMES.items():
            if p + src + ".weight" not in raw:
                raise ConversionError(f"GGUF lacks tensor {p + src}.weight")
            state[f"layers.{i}.{dst}.weight"] = raw.pop(p + src + ".weight")
    for src, dst in TOP_NAMES.items():
        if src + ".weight" in raw:
            state[dst + ".weight"] = raw.pop(src + ".weight")
    if raw:  # biases, rope_freqs, extra layers ...: refuse rather than silently drop them
        names = sorted(raw)
        raise ConversionError(f"unsupported tensors: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}")
    if "tok_embeddings.weight" not in state or "norm.weight" not in state:
        raise ConversionError("GGUF lacks token_embd.weight or output_norm.weight")
    return state


def build_tokenizer(reader: gguf.GGUFReader) -> tuple:
    """(the HF tokenizer, its special tokens as transformers' GGUF loader names them: special_tokens_map.json's
    bos/eos/unk/pad_token, which chat templates may write)."""
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(f"unsupported tokenizer.ggml.model {kind!r} (only gpt2 byte-level BPE)")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = field(reader, "tokenizer.ggml.merges")
    if not tokens or not merges:
        raise ConversionError("GGUF tokenizer lacks tokens or merges")
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    ids = {key: field(reader, f"tokenizer.ggml.{key}_token_id", kind=int)
           for key in (*SPECIAL_TOKEN_IDS.values(), "eot")}
    for key, i in ids.items():  # ids of this list (the runtime refuses any other)
        if i is not None and not 0 <= i < len(tokens):
            raise ConversionError(f"tokenizer.ggml.{key}_token_id {i!r} is not a token id ({len(tokens)} tokens)")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) < len(tokens):  # a token written twice: one of its ids could never be encoded or decoded
        twice = next(t for i, t in enumerate(tokens) if vocab[t] != i)
        raise ConversionError(f"GGUF tokenizer lists the token {twice!r} twice")
    pairs = [m.split(" ") for m in merges]
    bad = next((m for m, pair in zip(merges, pairs)
                if len(pair) != 2 or not all(s in vocab for s in pair) or "".join(pair) not in vocab), None)
    if bad is not None:
        raise ConversionError(f"GGUF tokenizer merge {bad!r} is not two tokens of its list that make a third")

    whole_words = pre in LLAMA3_WHOLE_WORDS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(pair) for pair in pairs], ignore_merges=whole_words))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in GPT2_PRE:
        tok.pre_tokenizer = byte_level
    elif pre in DIGITS_PRE:
        # The original (HF) tokenizers of these models split every digit off first
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in LLAMA3_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ConversionError(f"unsupported tokenizer.ggml.pre {pre!r}")
    tok.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|> ...) must match whole and count as special; user-defined ones match whole.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])

    bos = ids["bos"]
    if field(reader, "tokenizer.ggml.add_bos_token", whole_words, bool) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = {name: tokens[ids[key]] for name, key in SPECIAL_TOKEN_IDS.items() if ids[key] is not None}
    return tok, specials


def convert(gguf_path, out_dir, dtype: torch.dtype = torch.bfloat16) -> Path:
    path = Path(gguf_path)
    if path.is_dir():
        raise ConversionError(f"{path} is a folder: give the .gguf file")
    if not path.is_file():
        raise ConversionError(f"GGUF file not found: {path}")
    check_target(out_dir)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncated file ...
        raise ConversionError(f"cannot read GGUF {path} (not a GGUF file, or cut short?): {brief(e)}") from None
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"unsupported architecture {arch!r} (only llama)")
    shards = field(reader, "split.count", 1, int)
    if shards != 1:  # llama.cpp's gguf-split writes name-00001-of-0000N.gguf
        raise ConversionError(f"{path.name} is one of {shards} shards of a split GGUF: merge them into one file first "
                              f"(llama.cpp: llama-gguf-split --merge)")
    for t in reader.tensors:  # before any slow work
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ConversionError(f"tensor {t.name} has unsupported type {t.tensor_type.name} "
                                  f"(supported: {', '.join(q.name for q in SUPPORTED_TYPES)})")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    cfg = read_config(reader, has_output)
    tokenizer, specials = build_tokenizer(reader)
    template = field(reader, "tokenizer.chat_template", kind=str)
    # Token ids are list positions; the embedding may have more rows (padding), not fewer. Its rows from the
    # tensor's header (GGUF lists dimensions innermost first), before the slow dequantization.
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ConversionError(f"{path.name}: no token_embd.weight tensor")
    if len(embd.shape) != 2:
        raise ConversionError(f"{path.name}: token_embd.weight has {len(embd.shape)} dimensions, not 2")
    cfg["vocab_size"] = int(embd.shape[-1])
    n_tokens = len(field(reader, "tokenizer.ggml.tokens"))
    if n_tokens > cfg["vocab_size"]:
        raise ConversionError(f"{path.name}: the tokenizer has {n_tokens} tokens, more than the model's vocab_size "
                              f"{cfg['vocab_size']} (rows of token_embd.weight)")
    try:
        config = from_hf_config(cfg)  # the metadata, checked before the slow dequantization
        state = read_weights(reader, cfg, dtype)
        with torch.device("meta"):  # last check against the model itself, so the output always loads
            check_state_dict(Transformer(config), state)
    except CheckpointError as e:
        raise ConversionError(f"{path.name}: {e}") from None
    files = {"tokenizer.json": tokenizer.to_str(), SPECIAL_TOKENS_MAP_FILE: json.dumps(specials, indent=2)}
    if template is not None:
        files[CHAT_TEMPLATE_FILE] = template
    return save_checkpoint(out_dir, state, cfg, "hf", files, f"gguf:{path.name}")


def main(argv=None) -> None:
    ap = cli.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True, type=Path, help="input .gguf file (llama architecture)")
    ap.add_argument("--out", required=True, type=cli.out_folder, help="output checkpoint folder (created if missing)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype in model.pth")
    args = ap.parse_args(argv)
    out = convert(args.gguf, args.out, DTYPES[args.dtype])
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
