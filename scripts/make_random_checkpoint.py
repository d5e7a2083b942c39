"""A checkpoint folder with random weights at a real model's shapes, for timing generate.py end to end.

    python scripts/make_random_checkpoint.py --preset llama-3-8b --out checkpoints/random-llama-3-8b

Decode speed depends on shapes and sparsity, not on weight values, so this stands in for a download. It writes
what the converters write (model.pth, an HF-style config.json, tealfast.json) and a byte-level tokenizer.json whose
vocab is padded with placeholder tokens to the model's vocab size, so every sampled id decodes. The text it
generates is of course noise.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from bench_decode import PRESETS, build  # noqa: E402
from checkpoint import check_target, from_hf_config, save_checkpoint  # noqa: E402
from model import DTYPES, CheckpointError, ModelArgs  # noqa: E402
from tokenizer import read_json  # noqa: E402

SOURCE = "random weights"  # tealfast.json's source starts so: a folder this script may write over


def hf_config(preset: str, n_layer: int | None = None) -> dict:
    """config.json as Hugging Face writes it for this preset (the runtime reads architecture only from here)."""
    a = dict(ModelArgs(**PRESETS[preset]).__dict__)
    mistral = preset.startswith("mistral")
    cfg = dict(
        architectures=["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        model_type="mistral" if mistral else "llama",
        vocab_size=a["vocab_size"], hidden_size=a["dim"], num_hidden_layers=n_layer or a["n_layer"],
        num_attention_heads=a["n_head"], num_key_value_heads=a["n_local_heads"], head_dim=a["head_dim"],
        intermediate_size=a["intermediate_size"], max_position_embeddings=a["block_size"],
        rms_norm_eps=a["norm_eps"], rope_theta=a["rope_base"], tie_word_embeddings=a["tie_embeddings"],
        hidden_act="silu", bos_token_id=256, eos_token_id=257,
    )
    if mistral:  # null: no window (v0.2 on); bench_decode's presets set none
        cfg["sliding_window"] = a["sliding_window"] or None
    return cfg


def tokenizer_json(vocab_size: int) -> str:
    """Byte-level BPE without merges: 256 byte symbols, <s> (256), </s> (257), placeholders up to vocab_size."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    vocab.update({f"<r{i}>": i for i in range(258, vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def check_out(out: Path) -> None:
    """Random weights go into a new folder or over random weights, never over a model's: Hugging Face weights
    (whose config and tokenizer would be replaced) or a converted checkpoint."""
    check_target(out)
    if (out / "model.pth").exists():
        try:
            source = str(read_json(out / "tealfast.json", required=False).get("source", ""))
        except ValueError:  # unreadable: of unknown source
            source = ""
        if not source.startswith(SOURCE):
            raise CheckpointError(f"{out} holds a checkpoint ({source or 'of unknown source'}): random weights would "
                                  f"replace it (choose another folder)")


def main(argv=None) -> None:
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--preset", choices=list(PRESETS), required=True, help="model shapes (scripts/bench_decode.py)")
    p.add_argument("--out", type=cli.out_folder, required=True,
                   help="checkpoint folder to write: a new one, or one of random weights (a model's is refused)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weight dtype in model.pth")
    p.add_argument("--n_layer", type=cli.at_least(1), default=None,
                   help="fewer layers than the preset, for tests and smoke runs (default: the preset's)")
    p.add_argument("--device", type=cli.device, default=cli.default_device(),
                   help="where to draw the random weights, cpu or cuda[:N] (a GPU is much faster for 7B/8B)")
    args = p.parse_args(argv)
    if args.n_layer is not None and args.n_layer > PRESETS[args.preset]["n_layer"]:
        p.error(f"--n_layer {args.n_layer}: the preset has {PRESETS[args.preset]['n_layer']} layers")
    check_out(args.out)
    cfg = hf_config(args.preset, args.n_layer)
    cfg["torch_dtype"] = str(DTYPES[args.dtype]).removeprefix("torch.")  # as transformers writes it
    model = build(from_hf_config(cfg), DTYPES[args.dtype], cli.use_device(args.device))
    state = {k: v.cpu() for k, v in model.state_dict().items()
             if not (k == "output.weight" and model.config.tie_embeddings)}
    out = save_checkpoint(args.out, state, cfg, "hf", {"tokenizer.json": tokenizer_json(cfg["vocab_size"])},
                          source=f"{SOURCE}, preset {args.preset}")
    print(f"wrote {out} ({sum(v.numel() for v in state.values()) / 1e9:.2f} B parameters)")


if __name__ == "__main__":
    cli.run(main)
