"""Tokenizers for tealfast checkpoints: one small class per kind, same interface.

The kind comes only from the checkpoint's tealfast.json ("hf", "sentencepiece" or "tiktoken");
BOS/EOS ids come from its config.json where present (but a tokenizer.json whose post-processor prepends a BOS keeps
that one, as transformers encodes prompts), more stop ids from its generation_config.json; a tokenizer with more ids
than config.json's vocab_size (the model's embedding rows) is refused. A chat model's prompt format is the folder's
chat_template.jinja (the converters take it from the model's own chat_template.jinja, its tokenizer_config.json or
the GGUF), rendered as transformers' apply_chat_template does.
"""
import base64
import datetime
import json
import re
from pathlib import Path
from typing import Optional

SCHEMA_VERSION = 1  # of tealfast.json (written by checkpoint.save_checkpoint)
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # the name transformers saves a tokenizer's chat template under
# Where a Hugging Face folder names the special tokens that a chat template writes (bos_token, eos_token ...):
# tokenizer_config.json, older repos special_tokens_map.json too
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"  # a Hugging Face model's sampling defaults: its stop ids are read
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# End-of-turn tokens that chat models emit instead of (or as well as) config.json's eos_token_id.
EXTRA_STOP_TOKENS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>")

# Llama-3's pre-tokenization regex (Meta's reference tokenizer).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256


def llama3_special_tokens() -> list[str]:
    """Meta's Llama-3.1 layout, appended after the base vocab; ids of the shared names match Llama-3.0."""
    named = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    ]
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_SPECIAL_TOKENS - len(named))]
    return named + reserved


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Shared interface; subclasses set vocab_size (every id they produce is below it) and default bos_id/eos_ids,
    load_tokenizer applies config.json."""

    file_name: str
    bos_id: int | None = None
    add_bos: bool = True  # whether a prompt starts with BOS (Llama-2/3, Mistral); HF tokenizers say it themselves
    eos_ids: list[int]
    vocab_size: int
    folder: Path | None = None  # the checkpoint folder, where its chat template and tokenizer_config.json are
    _chat = None  # (compiled chat template, the special tokens it may write), once loaded

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self._encode(text)
        return [self.bos_id] + ids if bos and self.bos_id is not None else ids

    def encode_chat(self, text: str, system: str | None = None, history: list[dict] = ()) -> list[int]:
        """text as the user's next turn, after a system turn (if given) and the conversation so far (history: earlier
        messages, {"role": "user" or "assistant", "content": ...}), the assistant's turn opened: transformers'
        apply_chat_template(add_generation_prompt=True). The template writes BOS itself where the model wants one;
        the special tokens it writes are encoded as such."""
        template, specials = self.load_chat_template()
        messages = ([] if system is None else [{"role": "system", "content": system}]) + list(history) + [
            {"role": "user", "content": text}]
        rendered = render_chat(template, messages, specials)
        if not rendered:
            raise TokenizerError(f"{self.folder / CHAT_TEMPLATE_FILE} renders the prompt to no text")
        return self._encode(rendered)

    def load_chat_template(self):
        """(compiled template, special tokens), read once from the folder's chat_template.jinja and, as transformers
        takes them, the special tokens of tokenizer_config.json and special_tokens_map.json (the GGUF converter writes
        the latter; without either, a folder converted from a GGUF before it did: BOS and EOS by config.json's ids).
        A folder without a template, or a template that does not compile, is refused."""
        if self._chat is not None:
            return self._chat
        import jinja2
        path = self.folder / CHAT_TEMPLATE_FILE
        if not path.exists():
            raise TokenizerError(f"no {path}: the model has no chat template, or the folder was converted before "
                                 f"tealfast kept them (convert it again: scripts/convert_gguf_checkpoint.py or "
                                 f"convert_hf_checkpoint.py)")
        try:
            template = _chat_env().from_string(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:  # a folder of that name, an unreadable file
            raise TokenizerError(f"cannot read {path}: {_one_line(e)}") from None
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{path}: {_one_line(e)}") from None
        config_file, map_file = self.folder / TOKENIZER_CONFIG_FILE, self.folder / SPECIAL_TOKENS_MAP_FILE
        if config_file.exists() or map_file.exists():
            config = read_json(config_file, required=False)
            # As transformers reads them: tokenizer_config.json alone where it lists added_tokens_decoder (saved so
            # since transformers 4.34), else the map's tokens over tokenizer_config.json's (older repos)
            sources = [config] if "added_tokens_decoder" in config else [config, read_json(map_file, required=False)]
            specials = {}
            for source in sources:
                for k in SPECIAL_TOKEN_KEYS:
                    if k in source:
                        # a string or an AddedToken's {"content": ...}; null: not passed (the map's null drops the
                        # config's), as transformers
                        v = source[k].get("content") if isinstance(source[k], dict) else source[k]
                        if v is None:
                            specials.pop(k, None)
                        else:
                            specials[k] = v
        else:
            specials = {f"{name}_token": self.id_to_token(i) for name, i in
                        (("bos", self.bos_id), ("eos", self.eos_ids[0] if self.eos_ids else None)) if i is not None}
        self._chat = template, specials
        return self._chat

    def id_to_token(self, i: int) -> str | None:
        """The token's text as the vocab writes it (for the special tokens a chat template writes)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        # Ids past the tokenizer's vocab (a model's padded rows, Qwen2's say) decode to nothing, as the HF
        # tokenizers library does; sentencepiece and tiktoken would raise.
        return self._decode([i for i in ids if 0 <= i < self.vocab_size])

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def token_id(self, token: str) -> int | None:
        """Id of a whole (special) token, or None if the vocab lacks it."""
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    """Byte-level BPE (SmolLM2, Qwen2, Llama-3 HF) from tokenizer.json via the `tokenizers` library."""

    file_name = "tokenizer.json"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok
        try:
            self.tok = _Tok.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"cannot load {path}: {_one_line(e)}") from None
        # A tokenizer.json saved after a truncating or padding call keeps those settings, and `tokenizers` would
        # apply them to every encode (a prompt cut at max_length); transformers applies them only when asked
        self.tok.no_truncation()
        self.tok.no_padding()
        # One past the largest id, not get_vocab_size(), which counts tokens: a vocab may skip ids
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.eos_ids = []
        # BOS where the post-processor prepends one (Llama-3's tokenizer.json), none where it does not (SmolLM2,
        # Qwen2), as transformers encodes prompts: the token it prepends, whatever config.json's bos_token_id says
        first = self.tok.encode("a").ids[:1]
        self.add_bos = first != self.tok.encode("a", add_special_tokens=False).ids[:1]
        self.bos_id = first[0] if self.add_bos else None

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def _encode(self, text: str) -> list[int]:
        # The tokenizer.json post-processor may add BOS itself; we never want that, BOS is our flag.
        return self.tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """Llama-2 / Mistral tokenizer.model via the `sentencepiece` library."""

    file_name = "tokenizer.model"

    def __init__(self, path: Path):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise TokenizerError(f"cannot load {path} as a sentencepiece model: {_one_line(e)}") from None
        self.vocab_size = self.sp.vocab_size()
        # Fallbacks when config.json has no ids; sentencepiece uses -1 for "none".
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_ids = [self.sp.eos_id()] if self.sp.eos_id() >= 0 else []
        # control pieces (<s>, </s>) and <unk>, which the HF tokenizers of these models also match whole
        self.controls = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                         if self.sp.is_control(i) or self.sp.is_unknown(i)}
        longest_first = sorted(self.controls, key=len, reverse=True)  # a piece that starts another matches whole
        self.controls_re = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if self.controls else None

    def token_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        # piece_to_id maps unknown pieces to unk; only a real match counts.
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None

    def _encode(self, text: str) -> list[int]:
        # Control pieces written in the text (<s>, </s>: chat templates write them; <unk>) are encoded as such, as the
        # HF tokenizers of these models do; sentencepiece alone would spell them out. The text between them is
        # encoded piece by piece, as Meta's reference builds a Llama-2 chat prompt.
        if self.controls_re is None:
            return self.sp.encode(text)
        return [i for part in self.controls_re.split(text) if part
                for i in ([self.controls[part]] if part in self.controls else self.sp.encode(part))]

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class TiktokenTokenizer(Tokenizer):
    """Llama-3 tokenizer.model ("base64token rank" lines) via `tiktoken`, as Meta's reference builds it."""

    file_name = "tokenizer.model"

    def __init__(self, path: Path):
        import tiktoken
        ranks = _load_tiktoken_ranks(path)
        n_base = len(ranks)
        self.special_tokens = {t: n_base + i for i, t in enumerate(llama3_special_tokens())}
        self.enc = tiktoken.Encoding(
            name="tealfast-llama3", pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks, special_tokens=self.special_tokens,
        )
        self.vocab_size = self.enc.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_ids = [self.special_tokens["<|end_of_text|>"], self.special_tokens["<|eot_id|>"]]

    def token_id(self, token: str) -> int | None:
        return self.special_tokens.get(token)

    def id_to_token(self, i: int) -> str | None:
        return next((t for t, j in self.special_tokens.items() if j == i), None)

    def _encode(self, text: str) -> list[int]:
        # Special tokens written in the text are encoded as such, like the HF Llama-3 tokenizer does,
        # so chat prompts give the same ids whichever way the checkpoint was converted.
        return self.enc.encode(text, allowed_special="all")

    def _decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


TOKENIZER_CLASSES = {"hf": HFTokenizer, "sentencepiece": SentencePieceTokenizer, "tiktoken": TiktokenTokenizer}


def get_tokenizer(checkpoint_dir) -> Tokenizer:
    """The tokenizer of a checkpoint folder: the kind its tealfast.json names, checked against its config.json."""
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise TokenizerError(f"checkpoint folder not found: {ckpt}")
    meta = read_json(ckpt / "tealfast.json", required=True)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise TokenizerError(f"{ckpt / 'tealfast.json'}: schema_version {meta.get('schema_version')!r}, "
                             f"expected {SCHEMA_VERSION}")
    kind = meta.get("tokenizer")
    if not isinstance(kind, str) or kind not in TOKENIZER_CLASSES:  # a list or object is unhashable
        raise TokenizerError(f"{ckpt / 'tealfast.json'}: unknown tokenizer kind {kind!r}, "
                             f"expected one of {sorted(TOKENIZER_CLASSES)}")
    config = read_json(ckpt / "config.json", required=False)
    path = ckpt / TOKENIZER_CLASSES[kind].file_name
    if path.is_dir():
        raise TokenizerError(f"{path} is a folder, not the {kind} tokenizer file")
    if not path.is_file():
        raise TokenizerError(f"tokenizer file missing for kind {kind!r}: {path}")
    tok = load_tokenizer(kind, path, config, read_json(ckpt / GENERATION_CONFIG_FILE, required=False))
    tok.folder = ckpt
    return tok


def load_tokenizer(kind: str, path: Path, config: dict, generation: Optional[dict] = None) -> Tokenizer:
    """The tokenizer file of this kind with config.json's BOS/EOS ids, and the stop ids of generation_config.json
    (generation), as transformers' generate stops on both. Refused where it does not fit them, before anything
    runs (convert_hf_checkpoint.py checks its input with it too)."""
    tok = TOKENIZER_CLASSES[kind](path)
    # The model's vocab_size is its embedding's rows. It may exceed the tokenizer's (padding rows), never the other
    # way round: the embedding would fail on the first id past its rows, mid-run.
    rows = config.get("vocab_size")
    if rows is not None and tok.vocab_size > rows:
        raise TokenizerError(f"{path}: the {kind} tokenizer has {tok.vocab_size} token ids, more than the model's "
                             f"vocab_size {rows} (config.json)")

    def ids(cfg: dict) -> list:
        eos = cfg.get("eos_token_id")
        return [] if eos is None else eos if isinstance(eos, list) else [eos]

    # config.json's and generation_config.json's eos first: what the model was trained to stop on; the kind's
    # defaults and the usual end-of-turn tokens follow
    named = [("eos_token_id", i) for i in ids(config)] + \
        [(f"{GENERATION_CONFIG_FILE} eos_token_id", i) for i in ids(generation or {})]
    eos_ids = [i for _, i in named] + tok.eos_ids
    eos_ids += [i for i in (tok.token_id(t) for t in EXTRA_STOP_TOKENS) if i is not None]

    # A config that does not match the tokenizer would otherwise fail much later, mid-generation. Ids below the
    # tokenizer's vocab_size are below the model's too (checked above).
    bos = config.get("bos_token_id")
    for name, i in [("bos_token_id", bos)] + named:
        if i is not None and not (type(i) is int and 0 <= i < tok.vocab_size):
            raise TokenizerError(f"{path.parent}: {name} {i!r} is not a token id of this {kind} tokenizer "
                                 f"(vocab_size {tok.vocab_size})")
    if bos is not None and not (kind == "hf" and tok.add_bos):  # an HF post-processor's own BOS stands
        tok.bos_id = bos
    tok.eos_ids = list(dict.fromkeys(eos_ids))
    return tok


def _chat_env():
    """Jinja as transformers sets it up for chat templates: sandboxed, trimmed blocks, loop controls, a `tojson` that
    keeps the text as it is, `{% generation %}` blocks (which only mark the assistant's text for training), and
    the functions templates call."""
    from jinja2 import ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)  # the block's body, as is

    def raise_exception(message):
        raise TokenizerError(f"the chat template refuses the prompt: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env


def render_chat(template, messages: list[dict], specials: dict) -> str:
    try:
        return template.render(messages=messages, add_generation_prompt=True, tools=None, documents=None, **specials)
    except TokenizerError:  # its raise_exception
        raise
    except Exception as e:  # a template is a program: an undefined name, a str + int, a sandbox refusal ...
        raise TokenizerError(f"the chat template fails: {type(e).__name__}: {_one_line(e)}") from None


def read_json(path: Path, required: bool) -> dict:
    """A JSON object of a checkpoint folder (tealfast.json, config.json, generation_config.json ...)."""
    if path.is_dir():
        raise TokenizerError(f"{path} is a folder, not a JSON file")
    if not path.is_file():
        if required:  # tealfast.json: the converters write it
            raise TokenizerError(f"missing {path}: not a checkpoint folder that scripts/convert_hf_checkpoint.py or "
                                 f"convert_gguf_checkpoint.py wrote")
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # not JSON or UTF-8, an integer past 4,300 digits; too deep
        raise TokenizerError(f"cannot read {path}: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    # Parsed here rather than with tiktoken.load so a bad file gives a TokenizerError naming the line.
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {_one_line(e)}") from None
    ranks = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:  # also covers binascii.Error
            raise TokenizerError(f"{path} line {n} is not 'base64token rank' (not a tiktoken file?): "
                                 f"{_one_line(e)}") from None
    # Special tokens are appended at len(ranks); that is only right when ranks are exactly 0..n-1.
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: tiktoken ranks are not the contiguous range 0..n-1")
    return ranks


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
