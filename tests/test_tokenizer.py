"""tokenizer.py against independent references, on tokenizers trained here from stdlib text (no downloads)."""
import base64
import collections
import io
import json
import sys
from pathlib import Path

import pytest
import regex
from pydoc_data.topics import topics

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import run_script  # noqa: E402
from tokenizer import Tokenizer, TokenizerError, get_tokenizer  # noqa: E402

CORPUS = [t for t in topics.values() if t.strip()]

# Text the tokenizers were not trained on, with odd whitespace, digits and non-ASCII (incl. 4-byte UTF-8).
UNICODE_TEXTS = [
    "Hello world, naïve café — déjà vu. Straße, ﬁne, Ω≈ç√∫.",
    "日本語のテキストと中文文本，한국어 텍스트도 있습니다。",
    "Emoji: 🚀🔥👍🏽 and flags 🇫🇷🇯🇵; math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∀x∈ℝ.",
    "tabs\tand  double  spaces\n\n\nnewlines\r\nwindows line\n    indented code: x = 12345678 + 0.5e-3\n",
    "Привет, мир! Ελληνικά κείμενα. عربى. עברית.",
    "DON'T SHOUT, it's FINE; WE'LL see what YOU'VE got: 1234567 items.",
]
PARAGRAPHS = CORPUS[:6] + UNICODE_TEXTS

# Written out again here (not imported) so the tiktoken reference is independent of tokenizer.py.
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def write_checkpoint(path: Path, kind, config=None, files=None, meta=None) -> Path:
    """A checkpoint folder as the converters write it (minus model.pth, which the tokenizer never reads)."""
    path.mkdir(parents=True, exist_ok=True)
    if meta is None:
        meta = {"schema_version": 1, "tokenizer": kind, "source": "test"}
    (path / "tealfast.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    for name, data in (files or {}).items():
        (path / name).write_bytes(data)
    return path


# ---------------------------------------------------------------- hf (byte-level BPE, tokenizer.json)

HF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, processors, trainers
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=HF_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # A post-processor that adds BOS, like Llama-3's tokenizer.json: our encode must not apply it.
    bos = tok.token_to_id("<|im_start|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


def hf_checkpoint(tmp_path, hf_json, config):
    return write_checkpoint(tmp_path / "ckpt", "hf", config, {"tokenizer.json": hf_json.read_bytes()})


def test_hf_matches_transformers(tmp_path, hf_json):
    from transformers import PreTrainedTokenizerFast
    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_json))
    tok = get_tokenizer(hf_checkpoint(tmp_path, hf_json, {"bos_token_id": 1, "eos_token_id": 2}))
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == len(ref) == 1000
    for text in PARAGRAPHS + ["<|im_start|>user\nhi<|im_end|>\n"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert ref.encode(text, add_special_tokens=True) == [1] + ids  # the post-processor's BOS, not ours
        assert tok.encode(text, bos=True) == [1] + ids
        assert tok.decode(ids) == ref.decode(ids) == text
    # Special tokens in the text are single ids, as transformers does.
    assert tok.encode("a<|im_end|>b")[1] == 2


def test_hf_ignores_saved_truncation_and_padding(tmp_path, hf_json):
    """A tokenizer.json saved with truncation and padding on encodes whole prompts, unpadded, as transformers does
    unless a call asks for them: a prompt is not cut at the saved max_length."""
    from tokenizers import Tokenizer as HFTok
    from transformers import PreTrainedTokenizerFast
    saved = HFTok.from_file(str(hf_json))
    saved.enable_truncation(max_length=8)
    saved.enable_padding(length=16, pad_id=0)
    path = tmp_path / "tokenizer.json"
    saved.save(str(path))
    ref = PreTrainedTokenizerFast(tokenizer_file=str(path))
    tok = get_tokenizer(hf_checkpoint(tmp_path, path, {"bos_token_id": 1, "eos_token_id": 2}))
    text = PARAGRAPHS[0]
    assert saved.encode(text).ids[8:] == [0] * 8  # what `tokenizers` itself gives: cut at 8, padded to 16
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False) and len(tok.encode(text)) > 16
    assert tok.encode("hi", bos=True) == ref.encode("hi")  # no padding either


@pytest.fixture(scope="module")
def hf_json_no_bos(hf_json, tmp_path_factory) -> Path:
    """hf_json with a post-processor that adds nothing (SmolLM2's, from its GGUF)."""
    from tokenizers import Tokenizer as HFTok, processors
    plain = HFTok.from_file(str(hf_json))
    plain.post_processor = processors.ByteLevel(trim_offsets=False)
    path = tmp_path_factory.mktemp("hf_no_bos") / "tokenizer.json"
    plain.save(str(path))
    return path


def test_hf_add_bos_follows_the_post_processor(tmp_path, hf_json, hf_json_no_bos):
    """generate.py prepends BOS where transformers' encode would: this tokenizer.json's post-processor adds one."""
    assert get_tokenizer(hf_checkpoint(tmp_path / "a", hf_json, {"bos_token_id": 1})).add_bos
    tok = get_tokenizer(hf_checkpoint(tmp_path / "b", hf_json_no_bos, {"bos_token_id": 1}))
    assert not tok.add_bos and tok.bos_id == 1


@pytest.mark.parametrize("config", [{"bos_token_id": 0, "eos_token_id": [0, 2]}, {"eos_token_id": [0, 2]}])
def test_hf_bos_is_the_post_processors(tmp_path, hf_json, config):
    # This tokenizer.json prepends <|im_start|> (1): transformers' prompts start with it whatever config.json's
    # bos_token_id says (another id, or none), and so do ours.
    from transformers import PreTrainedTokenizerFast
    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_json))
    tok = get_tokenizer(hf_checkpoint(tmp_path, hf_json, config))
    assert tok.add_bos and tok.bos_id == 1
    assert tok.encode("hello", bos=True) == ref.encode("hello") and tok.encode("", bos=True) == ref.encode("") == [1]
    # config order first; known end-of-turn tokens present in the vocab (<|im_end|>=2, <|endoftext|>=0) deduped.
    assert tok.eos_ids == [0, 2]


def test_hf_bos_from_config_where_the_tokenizer_adds_none(tmp_path, hf_json_no_bos):
    tok = get_tokenizer(hf_checkpoint(tmp_path / "a", hf_json_no_bos, {"bos_token_id": 0}))
    assert not tok.add_bos and tok.encode("", bos=True) == [0]  # an empty prompt starts from config.json's BOS
    tok = get_tokenizer(hf_checkpoint(tmp_path / "b", hf_json_no_bos, {"eos_token_id": 2}))
    assert tok.bos_id is None and tok.encode("hello", bos=True) == tok.encode("hello")
    assert tok.eos_ids == [2, 0]


def test_hf_added_tokens_past_the_base_vocab(tmp_path):
    """Special tokens added after the BPE vocab (Qwen2's <|im_start|>, <|im_end|>: ids past the model's vocab) are
    token ids of the tokenizer: counted in its size, encoded, decoded and taken as config.json's EOS, as
    transformers does."""
    from tokenizers import AddedToken, Tokenizer as HFTok, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast
    tok_json = HFTok(models.BPE(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[]))
    tok_json.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok_json.decoder = decoders.ByteLevel()
    tok_json.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok_json.save(str(tmp_path / "tokenizer.json"))
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    data = {"tokenizer.json": (tmp_path / "tokenizer.json").read_bytes()}
    tok = get_tokenizer(write_checkpoint(tmp_path / "ckpt", "hf", {"vocab_size": 258, "eos_token_id": 257}, data))
    assert tok.vocab_size == len(ref) == 258 and tok.eos_ids[0] == 257
    text = "<|im_start|>user hi<|im_end|>"
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False) and ids[0] == 256 and ids[-1] == 257
    assert tok.decode(ids) == ref.decode(ids) == text
    assert "has 258 token ids" in error_message(write_checkpoint(tmp_path / "short", "hf", {"vocab_size": 257}, data))


# ---------------------------------------------------------------- sentencepiece (tokenizer.model)

@pytest.fixture(scope="module")
def sp_model() -> bytes:
    import sentencepiece as spm
    lines = [line for t in CORPUS for line in t.splitlines() if line.strip()]
    out = io.BytesIO()
    # Llama-2-like settings: BPE, byte fallback, no normalization, whitespace kept, digits split.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=800, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    return out.getvalue()


def test_sentencepiece_matches_transformers(tmp_path, sp_model):
    # transformers 5 has no slow sentencepiece LlamaTokenizer; LlamaTokenizer is a `tokenizers` BPE built from
    # the model's pieces and merges, an encoder independent of sentencepiece's. (from_pretrained on a bare
    # tokenizer.model would need protobuf, so the vocab/merges are extracted and passed in directly.)
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor
    ckpt = write_checkpoint(tmp_path / "ckpt", "sentencepiece", {"bos_token_id": 1, "eos_token_id": 2},
                            {"tokenizer.model": sp_model})
    vocab, _, merges = SentencePieceExtractor(str(ckpt / "tokenizer.model")).extract()
    ref = LlamaTokenizer(vocab=vocab, merges=merges)
    tok = get_tokenizer(ckpt)
    assert tok.vocab_size == 800 == len(vocab)
    assert tok.bos_id == 1 and tok.eos_ids == [2] and tok.add_bos  # Llama-2 and Mistral prompts start with BOS
    for text in PARAGRAPHS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert tok.encode(text, bos=True) == [1] + ids
        assert tok.decode(ids) == text
    # <unk> written in the text is the unknown piece, as transformers reads it, not spelt out
    assert tok.encode("x <unk>") == ref.encode("x <unk>", add_special_tokens=False) and tok.encode("x <unk>")[-1] == 0
    # Byte fallback really used: unseen characters become <0x..> byte pieces, not <unk> (0).
    ids = tok.encode("🚀")
    assert 0 not in ids and len(ids) >= 4
    # Leading space: sentencepiece (Meta's reference) keeps its dummy prefix ("▁▁x"); HF's Metaspace drops it.
    assert tok.decode(tok.encode("  two leading spaces")) == "  two leading spaces"


def test_sentencepiece_defaults_without_config(tmp_path, sp_model):
    tok = get_tokenizer(write_checkpoint(tmp_path / "ckpt", "sentencepiece", None, {"tokenizer.model": sp_model}))
    assert tok.bos_id == 1 and tok.eos_ids == [2]
    assert tok.decode(tok.encode("hi there", bos=True)) == "hi there"  # control ids decode to nothing


@pytest.mark.parametrize("ids", [dict(bos_id=0, unk_id=1, eos_id=2), dict(eos_id=0, unk_id=1, bos_id=2)])
def test_sentencepiece_bos_or_eos_at_id_0(tmp_path, ids):
    """Id 0 is a token id like any other: a model whose BOS or EOS is piece 0 keeps it (sentencepiece says -1 for
    none), without config.json ids."""
    import sentencepiece as spm
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS[:20]), model_writer=out, vocab_size=300,
                                   model_type="bpe", minloglevel=2, **ids)
    sp = spm.SentencePieceProcessor(model_proto=out.getvalue())
    tok = get_tokenizer(write_checkpoint(tmp_path / "ckpt", "sentencepiece", {}, {"tokenizer.model": out.getvalue()}))
    assert tok.bos_id == sp.bos_id() == ids["bos_id"] and tok.eos_ids == [sp.eos_id()] == [ids["eos_id"]]
    assert tok.encode("hi", bos=True) == [ids["bos_id"]] + sp.encode("hi")


def test_config_bos_over_the_tokenizer_files(tmp_path, sp_model, tiktoken_ranks):
    """config.json's bos_token_id is the prompt's BOS for a tokenizer.model too (only a tokenizer.json whose
    post-processor adds one keeps its own), not the id the file names (1 for this sentencepiece model, n for
    tiktoken's <|begin_of_text|>)."""
    n = len(tiktoken_ranks)
    for kind, data, bos in (("sentencepiece", sp_model, 3), ("tiktoken", ranks_file(tiktoken_ranks), n + 2)):
        tok = get_tokenizer(write_checkpoint(tmp_path / kind, kind, {"bos_token_id": bos},
                                             {"tokenizer.model": data}))
        assert tok.bos_id == bos and tok.encode("hi", bos=True) == [bos] + tok.encode("hi"), kind


# ---------------------------------------------------------------- tiktoken (Llama-3 tokenizer.model)

def train_byte_bpe(texts, n_merges) -> dict[bytes, int]:
    """Plain byte-level BPE: the 256 bytes, then the most frequent adjacent pair, n_merges times."""
    words = collections.Counter(w.encode() for t in texts for w in regex.findall(LLAMA3_PAT, t))
    words = {tuple(bytes([b]) for b in w): c for w, c in words.items()}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        if not pairs:
            break
        a, b = max(pairs, key=pairs.get)
        if a + b not in ranks:
            ranks[a + b] = len(ranks)
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return ranks


@pytest.fixture(scope="module")
def tiktoken_ranks() -> dict[bytes, int]:
    ranks = train_byte_bpe(CORPUS[:30], 300)
    # Digit-run tokens, so a pre-tokenizer not splitting digits in threes ("1234567" -> 123|456|7) shows.
    for t in (b"12", b"123", b"1234", b"45", b"456", b"4567"):
        ranks.setdefault(t, len(ranks))
    return ranks


def ranks_file(ranks) -> bytes:
    return b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda x: x[1]))


def test_tiktoken_matches_reference(tmp_path, tiktoken_ranks):
    import tiktoken
    n = len(tiktoken_ranks)
    assert n > 500  # the merges really happened
    # Meta's Llama-3(.1) layout: 256 special tokens after the base vocab; only these few names matter here.
    names = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
             8: "<|eom_id|>", 9: "<|eot_id|>"}
    specials = {names.get(i, f"<|reserved_special_token_{i}|>"): n + i for i in range(256)}
    ref = tiktoken.Encoding("ref", pat_str=LLAMA3_PAT, mergeable_ranks=tiktoken_ranks, special_tokens=specials)

    # config.json of Llama-3 instruct: eos is <|eot_id|> only.
    ckpt = write_checkpoint(tmp_path / "ckpt", "tiktoken", {"bos_token_id": n, "eos_token_id": n + 9},
                            {"tokenizer.model": ranks_file(tiktoken_ranks)})
    tok = get_tokenizer(ckpt)
    assert tok.vocab_size == n + 256 == ref.n_vocab
    assert tok.bos_id == n and tok.add_bos
    assert tok.eos_ids == [n + 9, n + 1, n + 8]  # config, then <|end_of_text|>, <|eom_id|>
    for text in PARAGRAPHS:
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert tok.encode(text, bos=True) == [n] + ids
        assert tok.decode(ids) == text
    chat = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    ids = tok.encode(chat)
    assert ids == ref.encode(chat, allowed_special="all")
    assert ids[:2] == [n, n + 6] and ids[-1] == n + 9
    assert tok.decode(ids) == chat


def test_tiktoken_defaults_without_config(tmp_path, tiktoken_ranks):
    n = len(tiktoken_ranks)
    tok = get_tokenizer(write_checkpoint(tmp_path / "ckpt", "tiktoken", {},
                                         {"tokenizer.model": ranks_file(tiktoken_ranks)}))
    assert tok.bos_id == n
    assert tok.eos_ids == [n + 1, n + 9, n + 8]


# ---------------------------------------------------------------- the kind comes from tealfast.json only

def test_kind_from_tealfast_json_not_path(tmp_path, sp_model, tiktoken_ranks):
    # A folder named like a tiktoken model but declared sentencepiece must load as sentencepiece.
    ckpt = write_checkpoint(tmp_path / "Meta-Llama-3-8B", "sentencepiece", {}, {"tokenizer.model": sp_model})
    assert get_tokenizer(ckpt).vocab_size == 800
    # The same tiktoken file declared as sentencepiece is rejected, not silently guessed.
    ckpt = write_checkpoint(tmp_path / "llama2", "sentencepiece", {},
                            {"tokenizer.model": ranks_file(tiktoken_ranks)})
    with pytest.raises(TokenizerError):
        get_tokenizer(ckpt)


# ---------------------------------------------------------------- chat templates (chat_template.jinja)

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama-2-chat's and Llama-3-instruct's formats, shortened (the real templates also take system turns)
LLAMA2_CHAT = ("{% for message in messages %}{% if message['role'] == 'user' %}"
               "{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
               "{% else %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CHAT_TEXTS = ["hi", "What is a generator?  ", "naïve 日本語\nsecond line", ""]


def hf_chat_ids(ref, messages) -> list:
    """transformers' apply_chat_template ids of messages with the generation prompt (a list, or in a BatchEncoding
    as some versions return it)."""
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(want["input_ids"] if hasattr(want, "keys") else want)


def test_chat_hf_matches_transformers(tmp_path, hf_json):
    from transformers import PreTrainedTokenizerFast
    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_json))
    ref.chat_template = CHATML
    tok = get_tokenizer(write_checkpoint(tmp_path / "ckpt", "hf", {"bos_token_id": 1, "eos_token_id": 2},
                                         {"tokenizer.json": hf_json.read_bytes(), "chat_template.jinja":
                                          CHATML.encode()}))
    for text in CHAT_TEXTS + ["<|im_end|> written by the user"]:
        assert tok.encode_chat(text) == hf_chat_ids(ref, [{"role": "user", "content": text}])
    assert tok.encode_chat("hi")[0] == 1  # <|im_start|>, one id: special tokens the template writes are parsed


# As real templates are written: a block tag per line, indented. transformers' Jinja drops the newline after a block
# tag (trim_blocks) and the indent before one (lstrip_blocks); the newline after an expression stays.
MULTILINE_CHAT = """{% for message in messages %}
  {% if message['role'] == 'system' %}
{{ '<|im_start|>system\\n' + message['content'] | trim + '<|im_end|>' }}
  {% else %}
    {{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}
  {{ '<|im_start|>assistant\\n' }}
{% endif %}"""


def test_chat_multiline_template_matches_transformers(tmp_path, hf_json):
    from transformers import PreTrainedTokenizerFast
    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_json))
    ref.chat_template = MULTILINE_CHAT
    tok = get_tokenizer(write_checkpoint(tmp_path / "ckpt", "hf", {"bos_token_id": 1, "eos_token_id": 2},
                                         {"tokenizer.json": hf_json.read_bytes(),
                                          "chat_template.jinja": MULTILINE_CHAT.encode()}))
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    messages = [{"role": "system", "content": " be brief "}] + history + [{"role": "user", "content": "and?"}]
    assert tok.encode_chat("and?", system=" be brief ", history=history) == hf_chat_ids(ref, messages)


def test_chat_sentencepiece_is_metas_llama2_format(tmp_path, sp_model):
    """Meta's reference builds a Llama-2 chat prompt as [BOS] + encode("[INST] {prompt} [/INST]")."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    tok = get_tokenizer(write_checkpoint(tmp_path / "ckpt", "sentencepiece", {"bos_token_id": 1, "eos_token_id": 2},
                                         {"tokenizer.model": sp_model, "chat_template.jinja": LLAMA2_CHAT.encode()}))
    for text in CHAT_TEXTS:
        assert tok.encode_chat(text) == [1] + sp.encode(f"[INST] {text.strip()} [/INST]")
    # <s> and </s> written in text are the control ids, as the HF tokenizers of these models parse them
    assert tok.encode("<s>a</s>") == [1] + sp.encode("a") + [2]


def test_chat_tiktoken_is_metas_llama3_format(tmp_path, tiktoken_ranks):
    """Meta's reference ChatFormat: BOS, then per message <|start_header_id|> role <|end_header_id|> "\\n\\n",
    the stripped content and <|eot_id|>, then the assistant's header."""
    import tiktoken
    n = len(tiktoken_ranks)
    plain = tiktoken.Encoding("ref", pat_str=LLAMA3_PAT, mergeable_ranks=tiktoken_ranks, special_tokens={})
    tok = get_tokenizer(write_checkpoint(tmp_path / "ckpt", "tiktoken", {"bos_token_id": n, "eos_token_id": n + 9},
                                         {"tokenizer.model": ranks_file(tiktoken_ranks),
                                          "chat_template.jinja": LLAMA3_CHAT.encode()}))

    def header(role):
        return [n + 6] + plain.encode(role) + [n + 7] + plain.encode("\n\n")

    for text in CHAT_TEXTS:
        assert tok.encode_chat(text) == ([n] + header("user") + plain.encode(text.strip()) + [n + 9]
                                         + header("assistant"))


def test_chat_renders_as_transformers_does(tmp_path, hf_json):
    """What else templates use, against transformers: tokenizer_config.json's special tokens (not config.json's
    ids), no tools, its `tojson` (no HTML escapes), `{% generation %}` blocks."""
    from transformers import PreTrainedTokenizerFast
    template = ("{% if tools is not none %}TOOLS{% endif %}{{ bos_token }}{% for m in messages %}{% generation %}"
                "{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}{{ eos_token }}{{ pad_token }}")
    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_json), bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  pad_token="<|im_start|>")
    ref.chat_template = template
    ref.save_pretrained(tmp_path / "saved")
    files = {n: (tmp_path / "saved" / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json",
                                                                "chat_template.jinja")}
    # config.json's BOS / EOS ids name other tokens: the template's come from tokenizer_config.json
    tok = get_tokenizer(write_checkpoint(tmp_path / "ckpt", "hf", {"bos_token_id": 1, "eos_token_id": 1}, files))
    for text in ["a<b> & 'c' 日本", ""]:
        ids = tok.encode_chat(text)
        assert ids == hf_chat_ids(ref, [{"role": "user", "content": text}])
        assert ids[0] == 0 and ids[-2:] == [2, 1] and "TOOLS" not in tok.decode(ids)


def test_chat_special_tokens_from_an_older_repos_map(tmp_path, hf_json):
    """Older repos name the special tokens in special_tokens_map.json only (a string or an AddedToken's fields)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    saved = PreTrainedTokenizerFast(tokenizer_file=str(hf_json))
    saved.chat_template = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"
    saved.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": {"content": "<|im_end|>", "lstrip": False, "rstrip": False,
                                                     "normalized": False, "single_word": False}}))
    ref = AutoTokenizer.from_pretrained(tmp_path / "saved")
    files = {n: (tmp_path / "saved" / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json",
                                                                "special_tokens_map.json", "chat_template.jinja")}
    tok = get_tokenizer(write_checkpoint(tmp_path / "ckpt", "hf", {"bos_token_id": 1, "eos_token_id": 1}, files))
    assert tok.encode_chat("hi") == hf_chat_ids(ref, [{"role": "user", "content": "hi"}])
    assert tok.decode(tok.encode_chat("hi")) == "<|endoftext|>hi<|im_end|>"


@pytest.mark.parametrize("saved_by", ["older transformers", "transformers >= 4.34"])
def test_chat_special_tokens_where_both_files_name_them(tmp_path, hf_json, saved_by):
    """tokenizer_config.json and special_tokens_map.json disagree (a fine-tune that changed its EOS in one): an
    older repo's map is read over its tokenizer_config.json; one that lists added_tokens_decoder (transformers
    has saved it since 4.34) is read alone, the map ignored. As transformers loads them."""
    from transformers import AutoTokenizer
    template = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}
    if saved_by != "older transformers":
        config["added_tokens_decoder"] = {}
    files = {"tokenizer.json": hf_json.read_bytes(), "chat_template.jinja": template.encode(),
             "tokenizer_config.json": json.dumps(config).encode(),
             "special_tokens_map.json":
                 json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"}).encode()}
    ckpt = write_checkpoint(tmp_path / "ckpt", "hf", {"bos_token_id": 1, "eos_token_id": 2}, files)
    ids = get_tokenizer(ckpt).encode_chat("hi")
    assert ids == hf_chat_ids(AutoTokenizer.from_pretrained(ckpt), [{"role": "user", "content": "hi"}])
    assert get_tokenizer(ckpt).decode(ids) == {"older transformers": "<|im_start|>hi<|endoftext|>",
                                               "transformers >= 4.34": "hi<|im_end|>"}[saved_by]


def test_chat_special_tokens_without_tokenizer_config(tmp_path, hf_json):
    """A folder without tokenizer_config.json (a GGUF's): the template's bos_token and eos_token are the tokens of
    config.json's ids, as transformers takes a GGUF's, not another stop token of the vocab (<|endoftext|> here)."""
    from transformers import PreTrainedTokenizerFast
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_json), bos_token="<|im_start|>", eos_token="<|im_end|>")
    ref.chat_template = template
    tok = get_tokenizer(write_checkpoint(tmp_path / "ckpt", "hf", {"bos_token_id": 1, "eos_token_id": 2},
                                         {"tokenizer.json": hf_json.read_bytes(),
                                          "chat_template.jinja": template.encode()}))
    assert tok.eos_ids == [2, 0]  # <|endoftext|> stops generation too
    assert tok.encode_chat("hi") == hf_chat_ids(ref, [{"role": "user", "content": "hi"}])
    assert tok.decode(tok.encode_chat("hi")) == "<|im_start|>hi<|im_end|>"


def test_sentencepiece_control_pieces_match_whole(tmp_path):
    """A control piece that begins another one does not split it (the tokenizers library matches the longest)."""
    import sentencepiece as spm
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS[:20]), model_writer=out, vocab_size=300,
                                   model_type="bpe", control_symbols=["[INST]", "[INST]x"], minloglevel=2)
    tok = get_tokenizer(write_checkpoint(tmp_path / "ckpt", "sentencepiece", {}, {"tokenizer.model": out.getvalue()}))
    inst, inst_x = tok.token_id("[INST]"), tok.token_id("[INST]x")
    assert tok.encode("[INST]x[INST] hi")[:2] == [inst_x, inst]


def test_chat_template_errors(tmp_path, hf_json):
    def ckpt(name, template=None):
        files = {"tokenizer.json": hf_json.read_bytes()}
        if template is not None:
            files["chat_template.jinja"] = template.encode()
        return get_tokenizer(write_checkpoint(tmp_path / name, "hf", {"bos_token_id": 1}, files))

    def message(tok) -> str:
        with pytest.raises(TokenizerError) as e:
            tok.encode_chat("hi")
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "none/chat_template.jinja: the model has no chat template" in message(ckpt("none"))
    assert "chat_template.jinja" in message(ckpt("syntax", "{% for m in messages %}{{ m.content }}"))
    assert "refuses the prompt: system turn first" in message(
        ckpt("refuses", "{{ raise_exception('system turn first') }}"))
    assert "fails" in message(ckpt("undefined", "{{ messages[0]['content'] + 1 }}"))
    assert "chat_template.jinja renders the prompt to no text" in message(ckpt("empty", ""))
    folder = write_checkpoint(tmp_path / "folder", "hf", {}, {"tokenizer.json": hf_json.read_bytes()})
    (folder / "chat_template.jinja").mkdir()
    assert "cannot read" in message(get_tokenizer(folder))
    corrupt = write_checkpoint(tmp_path / "config", "hf", {}, {"tokenizer.json": hf_json.read_bytes(),
                                                               "chat_template.jinja": CHATML.encode(),
                                                               "tokenizer_config.json": b"{"})
    assert "cannot read" in message(get_tokenizer(corrupt)) and "tokenizer_config.json" in message(get_tokenizer(corrupt))


def test_ids_past_the_vocab_decode_to_nothing(tmp_path, hf_json, sp_model, tiktoken_ranks):
    """A model with padded vocab rows (Qwen2's) can emit ids its tokenizer lacks: every kind skips them, as the
    HF tokenizers library does, instead of raising mid-generation."""
    for kind, name, data in [("hf", "tokenizer.json", hf_json.read_bytes()), ("sentencepiece", "tokenizer.model",
                             sp_model), ("tiktoken", "tokenizer.model", ranks_file(tiktoken_ranks))]:
        tok = get_tokenizer(write_checkpoint(tmp_path / kind, kind, {}, {name: data}))
        ids = tok.encode("hello world")
        assert tok.decode(ids[:1] + [tok.vocab_size, tok.vocab_size + 7] + ids[1:]) == tok.decode(ids) != "", kind


# ---------------------------------------------------------------- the tokenizer against the model's vocab_size

@pytest.mark.parametrize("kind", ["hf", "sentencepiece", "tiktoken"])
def test_vocab_past_the_model_is_refused(tmp_path, hf_json, sp_model, tiktoken_ranks, kind):
    """config.json's vocab_size is the model's embedding rows: padding rows past the tokenizer are fine, a token id
    past the rows is refused at load, naming both sizes. Sizes as the trainers made them (1000, 800) and as
    Meta's layout has it (ranks, then 256 special tokens)."""
    name, data, n = {"hf": ("tokenizer.json", hf_json.read_bytes(), 1000),
                     "sentencepiece": ("tokenizer.model", sp_model, 800),
                     "tiktoken": ("tokenizer.model", ranks_file(tiktoken_ranks), len(tiktoken_ranks) + 256)}[kind]
    for rows in (n, n + 64):
        assert get_tokenizer(write_checkpoint(tmp_path / str(rows), kind, {"vocab_size": rows}, {name: data}))
    msg = error_message(write_checkpoint(tmp_path / "short", kind, {"vocab_size": n - 1}, {name: data}))
    assert f"has {n} token ids" in msg and f"vocab_size {n - 1}" in msg, msg


def test_hf_vocab_size_is_one_past_the_largest_id(tmp_path):
    """A tokenizer.json whose vocab skips ids encodes past its token count: its size is the largest id + 1."""
    from tokenizers import Tokenizer as HFTok, models
    HFTok(models.BPE(vocab={"a": 0, "b": 1, "c": 5}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    data = {"tokenizer.json": (tmp_path / "tokenizer.json").read_bytes()}
    tok = get_tokenizer(write_checkpoint(tmp_path / "fits", "hf", {"vocab_size": 6}, data))
    assert tok.encode("c") == [5] and tok.vocab_size == 6
    assert "has 6 token ids" in error_message(write_checkpoint(tmp_path / "short", "hf", {"vocab_size": 5}, data))


@pytest.mark.parametrize("script, argv", [
    ("generate.py", ["--prompt", "the", "--max_new_tokens", "2"]),
    ("calibrate.py", ["--tokens", "64", "--seq_len", "32"]),
    ("scripts/eval_ppl.py", ["--sparsity", "0"])])
def test_commands_refuse_a_tokenizer_past_the_embedding(tmp_path, script, argv):
    """A hand-assembled folder: a tokenizer of 300 ids beside a model of 258 embedding rows would crash the
    embedding at the first id past them. Each command stops with one line naming both sizes, writing nothing."""
    from make_random_checkpoint import tokenizer_json
    from test_generate import write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")  # 258 embedding rows
    (ckpt.parent / "tokenizer.json").write_text(tokenizer_json(300))
    code, _, err = run_script(script, ["--checkpoint", ckpt, "--device", "cpu", *argv])
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "has 300 token ids" in err and "vocab_size 258" in err, err
    assert not (ckpt.parent / "thresholds.json").exists()


# ---------------------------------------------------------------- errors

def error_message(ckpt) -> str:
    with pytest.raises(TokenizerError) as e:
        get_tokenizer(ckpt)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_errors_checkpoint_folder(tmp_path):
    assert "not found" in error_message(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "tealfast.json" in error_message(tmp_path / "empty")
    assert "tealfast.json" in error_message(write_checkpoint(tmp_path / "corrupt", "hf", meta="{not json"))
    big = '{"schema_version": ' + "9" * 5000 + "}"  # past int()'s 4,300 digits: a ValueError that is no JSON error
    assert "tealfast.json" in error_message(write_checkpoint(tmp_path / "digits", "hf", meta=big))
    assert "JSON object" in error_message(write_checkpoint(tmp_path / "list", "hf", meta="[1, 2]"))
    assert "schema_version" in error_message(
        write_checkpoint(tmp_path / "v2", "hf", meta={"schema_version": 2, "tokenizer": "hf"}))
    assert "'bpe'" in error_message(write_checkpoint(tmp_path / "kind", "bpe"))
    assert "None" in error_message(write_checkpoint(tmp_path / "nokind", "hf", meta={"schema_version": 1}))
    assert "['hf']" in error_message(write_checkpoint(tmp_path / "listkind", "hf",
                                                      meta={"schema_version": 1, "tokenizer": ["hf"]}))
    corrupt_config = write_checkpoint(tmp_path / "cfg", "hf")
    (corrupt_config / "config.json").write_text("{")
    assert "config.json" in error_message(corrupt_config)
    (corrupt_config / "config.json").write_text("[" * 100_000)  # nested past Python's recursion limit
    assert "config.json" in error_message(corrupt_config)


@pytest.mark.parametrize("kind,name", [("hf", "tokenizer.json"), ("sentencepiece", "tokenizer.model"),
                                       ("tiktoken", "tokenizer.model")])
def test_errors_tokenizer_file(tmp_path, kind, name):
    assert name in error_message(write_checkpoint(tmp_path / "missing", kind, {}))
    garbage = {name: b"\x00\x01garbage \xff\xfe not a tokenizer\n"}
    assert name in error_message(write_checkpoint(tmp_path / "garbage", kind, {}, garbage))
    assert name in error_message(write_checkpoint(tmp_path / "empty", kind, {}, {name: b""}))  # a download cut short


@pytest.mark.parametrize("token", [b"YW-Jj", b"YWJj!"])
def test_errors_tiktoken_token_not_base64(tmp_path, token):
    """A token that is not standard base64 (URL-safe, stray characters) is refused naming its line, not read with
    the stray characters dropped (both would read as "YWJj", the token b"abc")."""
    data = ranks_file({bytes([b]): b for b in range(256)}).replace(b"IQ== 33", token + b" 33")
    assert data.count(token) == 1
    msg = error_message(write_checkpoint(tmp_path / "c", "tiktoken", {}, {"tokenizer.model": data}))
    assert "line 34" in msg and "base64token rank" in msg, msg


def test_errors_tiktoken_ranks_not_contiguous(tmp_path):
    data = b"".join(base64.b64encode(bytes([b])) + b" %d\n" % (b * 2) for b in range(256))
    assert "0..n-1" in error_message(write_checkpoint(tmp_path / "c", "tiktoken", {}, {"tokenizer.model": data}))


def test_errors_config_ids_out_of_vocab(tmp_path, hf_json, sp_model):
    assert "eos_token_id 5000" in error_message(hf_checkpoint(tmp_path, hf_json, {"eos_token_id": [2, 5000]}))
    # one past the last id (the hf tokenizer's 1000 ids: 0..999)
    assert "bos_token_id 1000" in error_message(hf_checkpoint(tmp_path / "edge", hf_json, {"bos_token_id": 1000}))
    ckpt = write_checkpoint(tmp_path / "sp", "sentencepiece", {"bos_token_id": -1}, {"tokenizer.model": sp_model})
    assert "bos_token_id -1" in error_message(ckpt)
    # JSON's true is not id 1 (Python's bool is an int)
    assert "bos_token_id True" in error_message(hf_checkpoint(tmp_path / "bool", hf_json, {"bos_token_id": True}))
    assert "eos_token_id False" in error_message(hf_checkpoint(tmp_path / "bools", hf_json,
                                                               {"eos_token_id": [2, False]}))
