"""model.py against transformers: tiny random HF models, converted with scripts/convert_hf_checkpoint.py,
must give the same fp32 logits for prefill and for KV-cached decode."""
import json
from pathlib import Path

import pytest
import torch

import checkpoint
import convert_hf_checkpoint
import model
from conftest import rel_err

transformers = pytest.importorskip("transformers")

TOL = 1e-4
BATCH, PROMPT, TOTAL = 2, 7, 19  # decode covers positions PROMPT..TOTAL-1
BASE = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, rms_norm_eps=1e-5, max_position_embeddings=256)
# name -> (HF class name, config overrides, save_pretrained kwargs[, config.json's fields changed after saving])
CASES = {
    # head_dim 32 != hidden/heads (16): catches code that derives head_dim from hidden_size
    "llama": ("Llama", dict(head_dim=32, rope_theta=5000.0), {}),
    # short original context so positions in the test cross every llama3 frequency band
    "llama3_rope": ("Llama", dict(num_hidden_layers=3, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), {}),
    "llama_tied": ("Llama", dict(tie_word_embeddings=True), {}),
    # sliding windows shorter than the prompt: every layer's (Mistral), the layers from max_window_layers on (Qwen2)
    "mistral": ("Mistral", dict(head_dim=24, sliding_window=5), {"max_shard_size": "40KB"}),
    "qwen2": ("Qwen2", dict(num_hidden_layers=3, rope_theta=1000000.0, use_sliding_window=True, sliding_window=6,
                            max_window_layers=1), {}),
    # a window in the layers layer_types marks: Ministral's interleaved pattern, saved as model_type "mistral", which
    # transformers reads as Ministral's config (its layer_types apply), and so must the converter
    "ministral": ("Ministral", dict(num_hidden_layers=3, head_dim=24, sliding_window=5, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention"]), {}, {"model_type": "mistral"}),
}


def randomize_(m: torch.nn.Module, seed: int) -> None:
    """Default init has unit norms and zero biases, which hides bugs in norms, biases and permutations.
    Works on HF models and on ours (embedding names differ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "embed_tokens" in name or "tok_embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def write_tokenizer_json(path: Path) -> int:
    """A tiny byte-level BPE (returns its vocab size): the converter only copies it, but the folder should look real."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({"Ġt": 256, "he": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e")]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))
    return len(vocab)


def make_hf_model(name: str, d: Path, seed: int = 0):
    """Save a random tiny HF model of CASES[name] into d; returns the HF model (eval, fp32)."""
    arch, overrides, save_kw, *edit = CASES[name]
    cfg = getattr(transformers, f"{arch}Config")(**{**BASE, **overrides})
    torch.manual_seed(seed)
    hf = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    randomize_(hf, seed)
    hf.save_pretrained(d, safe_serialization=True, **save_kw)
    if edit:  # config.json as some repos have it
        saved = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**saved, **edit[0]}))
        assert type(transformers.AutoConfig.from_pretrained(d)) is type(cfg)  # read back as the model was built
    write_tokenizer_json(d / "tokenizer.json")
    return hf


def convert(src: Path, out: Path, *extra) -> None:
    convert_hf_checkpoint.main(["--checkpoint_dir", str(src), "--out", str(out), "--dtype", "fp32", *extra])


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(case name, HF model, our converted model path)."""
    d = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, d / "hf", seed=len(request.param))
    convert(d / "hf", d / "out")
    return request.param, hf, d / "out" / "model.pth"


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, BASE["vocab_size"], (BATCH, TOTAL), generator=torch.Generator().manual_seed(1))


@torch.inference_mode()
def test_prefill_matches_hf(pair, tokens):
    name, hf, path = pair
    ours = checkpoint.load_model(path, dtype=torch.float32)
    ours.setup_caches(BATCH, 32)
    logits = ours(tokens, torch.arange(TOTAL))
    ref = hf(tokens).logits.float()
    assert logits.shape == ref.shape
    assert rel_err(logits, ref) <= TOL, name
    if any(b.attention.window for b in ours.layers):  # windows shorter than the sequence: they must matter here
        for b in ours.layers:
            b.attention.window = 0
        assert rel_err(ours(tokens, torch.arange(TOTAL)), ref) > 100 * TOL, name


@torch.inference_mode()
def test_decode_with_kv_cache_matches_hf(pair, tokens):
    name, hf, path = pair
    ours = checkpoint.load_model(path, dtype=torch.float32)
    ours.setup_caches(BATCH, 32)
    ref = hf(tokens).logits.float()
    first = ours(tokens[:, :PROMPT], torch.arange(PROMPT))
    steps = [ours(tokens[:, t:t + 1], torch.tensor([t])) for t in range(PROMPT, TOTAL)]
    assert rel_err(first, ref[:, :PROMPT]) <= TOL, name
    assert rel_err(torch.cat(steps, dim=1), ref[:, PROMPT:]) <= TOL, name


@torch.inference_mode()
def test_prefill_after_kept_positions_matches_hf(pair, tokens):
    """A chat's next turn: the cache grows keeping the positions where the new prompt repeats the last one, and
    the prefill runs from there (windows included)."""
    name, hf, path = pair
    ours = checkpoint.load_model(path, dtype=torch.float32)
    ref = hf(tokens).logits.float()
    ours.setup_caches(BATCH, PROMPT + 1)
    ours(tokens[:, :PROMPT], torch.arange(PROMPT))
    keep = PROMPT - 2  # the last prompt's final positions are rewritten
    ours.setup_caches(BATCH, TOTAL, keep=keep)
    assert rel_err(ours(tokens[:, keep:], torch.arange(keep, TOTAL)), ref[:, keep:]) <= TOL, name
    for rows, length, k in ((BATCH, TOTAL, TOTAL + 1), (BATCH, keep - 1, keep), (1, TOTAL, keep)):
        with pytest.raises(ValueError, match="cannot keep"):
            ours.setup_caches(rows, length, keep=k)


@torch.inference_mode()
@pytest.mark.parametrize("rows", [1, BATCH])
def test_sparse_decode_at_threshold_zero_matches_hf(pair, tokens, rows):
    # Sparse decode keeps every non-zero input at threshold 0: its ops (the Triton kernels, in the interpreter on
    # a CPU) must then give transformers' logits. One row runs the norm that lists gate|up's channels and the GLU
    # kernel; two rows the batch tiles.
    name, hf, path = pair
    if name not in ("mistral", "qwen2"):
        pytest.skip("two architectures: GQA with a head size of 24, and q/k/v biases")
    ours = checkpoint.load_model(path, dtype=torch.float32, column_major=True)
    ours.setup_caches(rows, 32)
    ours.set_sparse(decode=True)
    ref = hf(tokens[:rows]).logits.float()
    ours(tokens[:rows, :PROMPT], torch.arange(PROMPT))
    steps = [ours(tokens[:rows, t:t + 1], torch.tensor([t])) for t in range(PROMPT, PROMPT + 4)]
    assert rel_err(torch.cat(steps, dim=1), ref[:, PROMPT:PROMPT + 4]) <= TOL, name


@pytest.mark.gpu
@torch.no_grad()
def test_compiled_decode_matches_hf_gpu(pair, tokens):
    # The CUDA-graph decode step (decode attention kernel, sparse ops at threshold 0) against transformers;
    # GQA with RoPE scaling, and a head size (24) that is not a power of two, are enough to compile.
    name, hf, path = pair
    if name not in ("llama3_rope", "mistral"):
        pytest.skip("compiled on two architectures only")
    ref = hf(tokens).logits.float()
    for sparse in (False, True):
        ours = checkpoint.load_model(path, device="cuda", dtype=torch.float32)
        ours.setup_caches(BATCH, 32)
        ours.set_sparse(decode=sparse)
        ours(tokens[:, :PROMPT].cuda(), torch.arange(PROMPT, device="cuda"))
        step = torch.compile(ours, mode="reduce-overhead", fullgraph=True)
        steps = [step(tokens[:, t:t + 1].cuda(), torch.tensor([t], device="cuda")).clone() for t in range(PROMPT, TOTAL)]
        assert rel_err(torch.cat(steps, dim=1).cpu(), ref[:, PROMPT:]) <= 1e-3, (name, sparse)


def test_config_parsing(pair):
    name, hf, path = pair
    args = checkpoint.from_hf_config(json.loads((path.parent / "config.json").read_text()))
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert (args.n_head, args.n_local_heads, args.head_dim) == (c.num_attention_heads, c.num_key_value_heads, head_dim)
    assert args.qkv_bias == (name == "qwen2")
    assert args.tie_embeddings == (name == "llama_tied")
    assert (args.rope_scaling is not None) == (name == "llama3_rope")
    assert args.rope_base == c.rope_parameters["rope_theta"]


@pytest.mark.parametrize("tied", [False, True])
def test_model_bytes(tied):
    c = model.ModelArgs(vocab_size=300, dim=64, n_layer=2, n_head=4, n_local_heads=2, head_dim=16,
                        intermediate_size=128, tie_embeddings=tied)
    m = model.Transformer(c)  # fp32
    q, kv, ff = c.n_head * c.head_dim, c.n_local_heads * c.head_dim, c.dim * c.intermediate_size
    want = torch.tensor([q * c.dim, kv * c.dim, kv * c.dim, c.dim * q, ff, ff, ff], dtype=torch.float64) * 4 * c.n_layer
    total, per = model.model_bytes(m)
    # a step gathers one row of the embedding table, unless the output layer reads all of it (tied)
    emb = 0 if tied else 4 * c.vocab_size * c.dim
    assert torch.equal(per, want) and total == 4 * sum(p.numel() for p in m.parameters()) - emb


def test_rmsnorm_eps():
    """eps inside the root, as transformers' LlamaRMSNorm: a zero row stays zero, and a large eps damps."""
    norm = model.RMSNorm(4, eps=1.0)
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    assert torch.allclose(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1.0))
    assert torch.equal(model.RMSNorm(4, eps=1e-5)(torch.zeros(2, 4)), torch.zeros(2, 4))


@torch.inference_mode()
def test_cache_with_more_rows_than_the_batch():
    """A cache set up for more rows than a forward brings: attention reads the forward's rows of it only."""
    c = model.ModelArgs(vocab_size=300, dim=64, n_layer=2, n_head=4, n_local_heads=2, head_dim=16,
                        intermediate_size=128, block_size=32)
    torch.manual_seed(0)
    m = model.Transformer(c).eval()
    randomize_(m, 0)
    idx = torch.randint(0, 300, (1, 9))
    m.setup_caches(1, 32)
    want = m(idx, torch.arange(9))
    m.setup_caches(3, 32)
    assert torch.equal(m(idx, torch.arange(9)), want)
