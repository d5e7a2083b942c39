"""scripts/convert_hf_checkpoint.py: output folder layout, tokenizer detection, weight formats, and one clear
`error:` line (non-zero exit, no traceback) for every bad input."""
import argparse
import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import convert_hf_checkpoint
from conftest import run_script
from make_random_checkpoint import tokenizer_json
from test_model import make_hf_model
from test_tokenizer import hf_chat_ids
from tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parent.parent

SCRIPT = REPO / "scripts" / "convert_hf_checkpoint.py"
TIKTOKEN_TEXT = "".join(f"{t} {i}\n" for i, t in enumerate(["IQ==", "Ig==", "Iw==", "JA==", "aGVsbG8=", "IHdvcmxk"]))


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    """A pristine tiny Llama folder (single model.safetensors + tokenizer.json); tests copy it."""
    d = tmp_path_factory.mktemp("src") / "hf"
    make_hf_model("llama", d)
    return d


@pytest.fixture(scope="module")
def sp_bytes() -> bytes:
    """A small sentencepiece model (the converter loads the tokenizer it copies)."""
    import sentencepiece as spm
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([f"the cat sat on mat {i}" for i in range(100)]),
                                   model_writer=out, vocab_size=40, model_type="bpe",
                                   normalization_rule_name="identity", minloglevel=2)
    return out.getvalue()


def tiktoken_file(n_ranks: int) -> bytes:
    """Single-byte tokens ranked 0..n_ranks-1: with Meta's 256 special tokens, n_ranks + 256 ids."""
    return b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(n_ranks))


@pytest.fixture
def hf_dir(hf_src, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(hf_src, d)
    return d


def run_main(*argv):
    """(exit code, stderr) of the command line."""
    code, _, err = run_script("scripts/convert_hf_checkpoint.py", argv)
    return code, err


def edit_weights(d: Path, fn) -> None:
    state = load_file(d / "model.safetensors")
    fn(state)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})


def edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


# ---- good inputs ---------------------------------------------------------------------------------
def test_output_folder(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", out)
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    meta = json.loads((out / "tealfast.json").read_text())
    assert meta["tokenizer"] == "hf" and meta["schema_version"] >= 1
    state = torch.load(out / "model.pth", weights_only=True)
    assert {v.dtype for v in state.values()} == {v.dtype for v in load_file(hf_dir / "model.safetensors").values()}
    assert state["layers.0.attention.wqkv.weight"].shape == (4 * 32 + 2 * 2 * 32, 64)
    assert "layers.0.attention.wqkv.bias" not in state
    assert checkpoint.load_model(out / "model.pth").config.head_dim == 32


def test_generation_config_stop_ids(hf_dir, tmp_path, capsys):
    # transformers' generate stops on generation_config.json's eos_token_id too: copied, and read as stop ids
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 257], "do_sample": True}))
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "out")
    assert rc == 0, err
    copied = tmp_path / "out" / "generation_config.json"
    assert copied.read_bytes() == (hf_dir / "generation_config.json").read_bytes()
    assert 257 in get_tokenizer(tmp_path / "out").eos_ids
    # a model converted over it without one leaves none behind
    (hf_dir / "generation_config.json").unlink()
    assert run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "out")[0] == 0
    assert not (tmp_path / "out" / "generation_config.json").exists()
    assert 257 not in get_tokenizer(tmp_path / "out").eos_ids


def test_out_folder_of_another_hf_model_is_refused(hf_dir, hf_src, tmp_path, capsys):
    # converting into another model's HF folder would leave its weights beside this model's config and tokenizer
    other = tmp_path / "other"
    shutil.copytree(hf_src, other)
    before = {f.name: f.read_bytes() for f in other.iterdir()}
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", other)
    assert rc == 1 and "another model's Hugging Face weights" in err and err.count("\n") == 1, err
    assert {f.name: f.read_bytes() for f in other.iterdir()} == before


def test_default_keeps_the_source_dtype(hf_dir, tmp_path, capsys):
    # an fp16 model stays exact (bf16 would drop 3 bits of every weight's mantissa)
    edit_weights(hf_dir, lambda st: st.update({k: v.to(torch.float16) for k, v in st.items()}))
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "out")
    assert rc == 0, err
    state = torch.load(tmp_path / "out" / "model.pth", weights_only=True)
    src = load_file(hf_dir / "model.safetensors")
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert torch.equal(state["layers.1.feed_forward.w2.weight"], src["model.layers.1.mlp.down_proj.weight"])


def test_in_place_and_dtypes(hf_dir, capsys):
    for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        rc, err = run_main("--checkpoint_dir", hf_dir, "--dtype", name)  # default out: the folder
        assert rc == 0, err
        state = torch.load(hf_dir / "model.pth", weights_only=True)
        assert {v.dtype for v in state.values()} == {dtype}
    assert json.loads((hf_dir / "tealfast.json").read_text())["tokenizer"] == "hf"


def test_qk_permutation_and_fusion(hf_dir, tmp_path, capsys):
    hf = load_file(hf_dir / "model.safetensors")
    assert run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "o", "--dtype", "fp32")[0] == 0
    wqkv = torch.load(tmp_path / "o" / "model.pth", weights_only=True)["layers.1.attention.wqkv.weight"]
    q, k, v = wqkv.split([128, 64, 64])
    # interleaved order: row 2i of a head is HF row i, row 2i+1 is HF row i + head_dim/2
    hq = hf["model.layers.1.self_attn.q_proj.weight"].view(4, 32, 64)
    assert torch.equal(q.view(4, 16, 2, 64)[:, :, 0], hq[:, :16])
    assert torch.equal(q.view(4, 16, 2, 64)[:, :, 1], hq[:, 16:])
    hk = hf["model.layers.1.self_attn.k_proj.weight"].view(2, 32, 64)
    assert torch.equal(k.view(2, 16, 2, 64)[:, :, 1], hk[:, 16:])
    assert torch.equal(v, hf["model.layers.1.self_attn.v_proj.weight"])


def test_tied_lm_head_equal_is_dropped(hf_dir, tmp_path, capsys):
    edit_config(hf_dir, lambda c: c.update(tie_word_embeddings=True))
    edit_weights(hf_dir, lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"].clone()}))
    assert run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "o")[0] == 0
    assert "output.weight" not in torch.load(tmp_path / "o" / "model.pth", weights_only=True)


def test_tied_lm_head_different_is_an_error(hf_dir, tmp_path, capsys):
    edit_config(hf_dir, lambda c: c.update(tie_word_embeddings=True))
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "o")
    assert rc != 0 and "lm_head" in err


def test_pytorch_model_bin_and_inv_freq(hf_dir, tmp_path, capsys):
    state = load_file(hf_dir / "model.safetensors")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)  # old exporters keep it
    (hf_dir / "model.safetensors").unlink()
    torch.save(state, hf_dir / "pytorch_model.bin")
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "o", "--dtype", "fp32")
    assert rc == 0, err
    ours = torch.load(tmp_path / "o" / "model.pth", weights_only=True)
    assert torch.equal(ours["norm.weight"], state["model.norm.weight"])


def test_safetensors_preferred_to_a_bin_index(hf_dir, tmp_path, capsys):
    """prepare.sh downloads the safetensors and every .json: a repo that also has sharded .bin files leaves their
    index without its shards, which must not stop the conversion."""
    (hf_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "pytorch_model-1.bin"}}))
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "o")
    assert rc == 0, err


@pytest.mark.parametrize("what", ["truncated shard", "corrupt index"])
def test_bad_shards_are_named(tmp_path, capsys, what):
    make_hf_model("mistral", tmp_path / "hf")  # saved with a small max_shard_size
    index = tmp_path / "hf" / "model.safetensors.index.json"
    shard = tmp_path / "hf" / sorted(json.loads(index.read_text())["weight_map"].values())[-1]
    if what == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        index.write_text('{"weight_map": [')
    rc, err = run_main("--checkpoint_dir", tmp_path / "hf", "--out", tmp_path / "o")
    assert rc == 1 and err.count("\n") == 1 and (shard.name if what == "truncated shard" else index.name) in err, err
    assert len(err) < 400, err


def test_sharded_safetensors(tmp_path, capsys):
    make_hf_model("mistral", tmp_path / "hf")  # saved with a small max_shard_size
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    rc, err = run_main("--checkpoint_dir", tmp_path / "hf", "--out", tmp_path / "o")
    assert rc == 0, err
    (next(tmp_path.glob("hf/model-0000[2-9]-of-*.safetensors"))).unlink()
    rc, err = run_main("--checkpoint_dir", tmp_path / "hf", "--out", tmp_path / "o")
    assert rc != 0 and "listed in model.safetensors.index.json is missing" in err, err  # the path has "shard" in it


@pytest.mark.parametrize("where,kind", [("tokenizer.model", "sentencepiece"), ("tokenizer.model", "tiktoken"),
                                        ("original/tokenizer.model", "tiktoken"),
                                        ("original/tokenizer.model", "sentencepiece")])
def test_tokenizer_model_detection(hf_dir, tmp_path, capsys, sp_bytes, where, kind):
    content = sp_bytes if kind == "sentencepiece" else TIKTOKEN_TEXT.encode()
    (hf_dir / "tokenizer.json").unlink()
    (hf_dir / where).parent.mkdir(exist_ok=True)
    (hf_dir / where).write_bytes(content)
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "o")
    assert rc == 0, err
    assert json.loads((tmp_path / "o" / "tealfast.json").read_text())["tokenizer"] == kind
    assert (tmp_path / "o" / "tokenizer.model").read_bytes() == content


CHAT = ("{% for m in messages %}{{ bos_token + '<' + m['role'] + '> ' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")


def test_chat_template_saved_by_transformers(hf_dir, tmp_path):
    """A tokenizer that transformers saved with a chat template: the converted folder's --chat prompt is the one
    transformers' apply_chat_template makes from the source folder."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from tokenizer import get_tokenizer
    saved = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), bos_token="A", eos_token="Z")
    saved.chat_template = CHAT
    saved.save_pretrained(hf_dir)
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "o")
    assert rc == 0, err
    ref = AutoTokenizer.from_pretrained(hf_dir)
    tok = get_tokenizer(tmp_path / "o")
    for text in ["hi", "two words", ""]:
        ids = tok.encode_chat(text)
        assert ids == hf_chat_ids(ref, [{"role": "user", "content": text}])
        assert tok.decode(ids).startswith("A<user> ")  # the tokenizer's BOS, not config.json's bos_token_id


@pytest.mark.parametrize("form", ["string", "named", "none"])
def test_chat_template_from_tokenizer_config(hf_dir, tmp_path, sp_bytes, form):
    """Older repos keep the template in tokenizer_config.json, as text or as named templates (the "default" one
    is the chat's); a tokenizer.model repo gets it too. A conversion without one leaves no template behind."""
    (hf_dir / "tokenizer.json").unlink()
    (hf_dir / "tokenizer.model").write_bytes(sp_bytes)
    value = {"string": CHAT, "named": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHAT}],
             "none": None}[form]
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": value} if value else {}))
    out = tmp_path / "o"
    out.mkdir()
    (out / "chat_template.jinja").write_text("the model this conversion replaces")
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", out)
    assert rc == 0, err
    # the special tokens a template writes come with it, whatever the tokenizer's kind
    assert (out / "tokenizer_config.json").read_text() == (hf_dir / "tokenizer_config.json").read_text()
    if form == "none":
        assert not (out / "chat_template.jinja").exists()
        (hf_dir / "tokenizer_config.json").unlink()
        rc, err = run_main("--checkpoint_dir", hf_dir, "--out", out)
        assert rc == 0 and not (out / "tokenizer_config.json").exists()  # the replaced model's is gone too
    else:
        assert (out / "chat_template.jinja").read_text() == CHAT


def test_chat_template_file_over_tokenizer_config(hf_dir, tmp_path):
    """A repo with both (an older template left in tokenizer_config.json): chat_template.jinja is the one, as
    transformers loads it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    saved = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), bos_token="A", eos_token="Z")
    saved.chat_template = CHAT
    saved.save_pretrained(hf_dir)
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "old {{ eos_token }}"}))
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "o")
    assert rc == 0, err
    ids = get_tokenizer(tmp_path / "o").encode_chat("hi")
    assert ids == hf_chat_ids(AutoTokenizer.from_pretrained(hf_dir), [{"role": "user", "content": "hi"}])
    assert (tmp_path / "o" / "chat_template.jinja").read_text() == CHAT


def test_chat_template_in_place(hf_dir):
    (hf_dir / "chat_template.jinja").write_text(CHAT)
    rc, err = run_main("--checkpoint_dir", hf_dir)
    assert rc == 0, err
    assert (hf_dir / "chat_template.jinja").read_text() == CHAT


def test_chat_template_that_is_not_text(hf_dir, tmp_path):
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "o")
    assert rc == 1 and err.count("\n") == 1 and "chat_template is not text" in err


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_tokenizer_past_the_vocab_is_refused(hf_dir, tmp_path, name):
    """The model has 300 embedding rows: a tokenizer of 300 ids converts (one of 258, with padding rows, is the
    fixture's), one of 301 is refused before anything is written, naming both sizes."""
    def write_tokenizer(n_ids):
        (hf_dir / "tokenizer.json").unlink(missing_ok=True)
        if name == "tokenizer.json":
            (hf_dir / name).write_text(tokenizer_json(n_ids))
        else:  # Llama-3's tiktoken file
            (hf_dir / name).write_bytes(tiktoken_file(n_ids - 256))

    write_tokenizer(300)
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "fits")
    assert rc == 0, err
    write_tokenizer(301)
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "o")
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "has 301 token ids" in err and "vocab_size 300" in err, err
    assert not (tmp_path / "o").exists()


# ---- bad inputs ------------------------------------------------------------------------------------
def _truncate(d: Path) -> None:
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:5000])


def _as_bin(d: Path, wrap) -> None:
    """The weights as pytorch_model.bin, wrap(state) saved."""
    torch.save(wrap(load_file(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


def _pickled_object(d: Path) -> None:
    """A .bin that a weights-only load refuses: torch's message is long, with advice for other situations."""
    _as_bin(d, lambda s: {**s, "extra": argparse.Namespace(a=1)})


BAD_INPUTS = {
    "unknown model_type": (lambda d: edit_config(d, lambda c: c.update(model_type="gpt_neox")), "model_type"),
    "wrong shape": (lambda d: edit_weights(d, lambda s: s.update(
        {"model.layers.1.mlp.down_proj.weight": torch.zeros(64, 100)})), "down_proj"),
    "config disagrees": (lambda d: edit_config(d, lambda c: c.update(intermediate_size=96)), "shape"),
    "extra key": (lambda d: edit_weights(d, lambda s: s.update(
        {"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)})), "unknown"),
    "unexpected qkv bias": (lambda d: edit_weights(d, lambda s: s.update(
        {"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)})), "q_proj.bias"),
    "missing key": (lambda d: edit_weights(d, lambda s: s.pop("model.layers.1.post_attention_layernorm.weight")),
                    "post_attention_layernorm"),
    "missing lm_head": (lambda d: edit_weights(d, lambda s: s.pop("lm_head.weight")), "lm_head"),
    "missing config.json": (lambda d: (d / "config.json").unlink(), "config.json"),
    "corrupt config.json": (lambda d: (d / "config.json").write_text("{"), "config.json"),
    "truncated safetensors": (_truncate, "cannot read"),
    "bin of another kind": (_pickled_object, "holding more than tensors?): UnpicklingError"),
    "nested bin": (lambda d: _as_bin(d, lambda s: {"model": s}), "no flat mapping"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer"),
    # a padding row of the model's 300, but not one of the tokenizer's 258 ids
    "eos past the tokenizer": (lambda d: edit_config(d, lambda c: c.update(eos_token_id=280)), "eos_token_id 280"),
    "generation_config eos past the tokenizer": (lambda d: (d / "generation_config.json").write_text(
        '{"eos_token_id": [2, 290]}'), "generation_config.json eos_token_id 290"),
    "corrupt generation_config.json": (lambda d: (d / "generation_config.json").write_text("{"),
                                       "generation_config.json: Expecting property name"),
    "folder missing": (lambda d: shutil.rmtree(d), "does not exist"),
    "int8 weight": (lambda d: edit_weights(d, lambda s: s.update(
        {"model.layers.1.mlp.down_proj.weight": torch.ones(64, 128, dtype=torch.int8)})), "is int8, not a float"),
    "fp8 weights with a quantization_config": (lambda d: (edit_config(d, lambda c: c.update(
        quantization_config={"quant_method": "fp8"})), edit_weights(d, lambda s: s.update(
            {"model.layers.1.mlp.down_proj.weight": torch.ones(64, 128).to(torch.float8_e4m3fn)}))),
        "quantization_config (fp8)"),
    # an index that names a file outside the folder: refused before anything is opened
    "shard outside the folder": (lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "/etc/passwd"}})), "shard '/etc/passwd' is not a file name inside"),
    "shard up the tree": (lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../hf/model.safetensors"}})), "is not a file name inside"),
    # indexes of the right JSON but the wrong layout: no weight_map, a list, shard names that are lists
    "index without a weight_map": (lambda d: (d / "model.safetensors.index.json").write_text('{"metadata": {}}'),
                                   "corrupt"),
    "weight_map a list": (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}'),
                          "corrupt"),
    "weight_map of lists": (lambda d: (d / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.norm.weight": ["model.safetensors"]}}'), "corrupt"),
}


def test_checkpoint_dir_that_is_a_file(hf_dir, tmp_path, capsys):
    rc, err = run_main("--checkpoint_dir", hf_dir / "config.json", "--out", tmp_path / "o")
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and "is not a folder" in err, err


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line(hf_dir, tmp_path, capsys, case):
    breaker, needle = BAD_INPUTS[case]
    breaker(hf_dir)
    rc, err = run_main("--checkpoint_dir", hf_dir, "--out", tmp_path / "o")
    assert rc != 0
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err
    assert not (tmp_path / "o" / "model.pth").exists()


def test_cli_subprocess(hf_dir, tmp_path):
    """The real command line: non-zero exit, a single stderr line, no traceback."""
    edit_weights(hf_dir, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    r = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint_dir", str(hf_dir), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "model.layers.0.mlp.extra.weight" in r.stderr


def test_cli_flags(hf_dir, capsys):
    with pytest.raises(SystemExit) as e:
        convert_hf_checkpoint.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert all(f in help_text for f in ("--checkpoint_dir", "--out", "--dtype"))
    rc, _ = run_main("--checkpoint_dir", hf_dir, "--dtype", "int8")
    assert rc != 0


@pytest.mark.parametrize("files,weights", [
    (["config.json", "model.safetensors", "consolidated.safetensors", "pytorch_model.bin"], "model*.safetensors"),
    (["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], "model*.safetensors"),
    (["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"], "pytorch_model*.bin"),
])
def test_download_fetches_the_weights_the_converter_reads(tmp_path, monkeypatch, files, weights):
    import huggingface_hub
    calls = []
    # the real signatures' names: a call with other keywords fails here too
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, *, token=None: files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, *, local_dir, token, allow_patterns: calls.append(
                            (repo_id, dict(local_dir=local_dir, token=token, allow_patterns=allow_patterns))))
    convert_hf_checkpoint.download("org/model", tmp_path)
    assert calls == [("org/model", dict(local_dir=tmp_path, token=None, allow_patterns=[
        "*.json", weights, "tokenizer.model", "original/tokenizer.model", "chat_template.jinja"]))]


def test_download_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(self, repo_id, *, token=None):
        raise OSError("[Errno -2] Name or service not known\nmore detail")
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    rc, err = run_main("--repo", "org/model", "--checkpoint_dir", tmp_path / "m")
    assert rc == 1 and err.strip() == "error: cannot download org/model: OSError: [Errno -2] Name or service not known"
    # the files an earlier download left (prepare.sh ORG/REPO again, offline): the error says how to convert them
    assert (tmp_path / "m" / ".hf_repo").read_text() == "org/model\n"  # written before the download began
    (tmp_path / "m" / "config.json").write_text("{}")
    rc, err = run_main("--repo", "org/model", "--checkpoint_dir", tmp_path / "m")
    assert rc == 1 and "holds a model" not in err, err  # no weights: a download cut short
    (tmp_path / "m" / "model.safetensors").write_bytes(b"x")
    rc, err = run_main("--repo", "org/model", "--checkpoint_dir", tmp_path / "m")
    assert rc == 1 and err.count("\n") == 1 and "--checkpoint_dir " + str(tmp_path / "m") + " converts it" in err, err


def test_download_into_another_models_files_is_refused(hf_dir, tmp_path, monkeypatch):
    """--repo downloads into a new or empty folder, or resumes its own repo's: another model's files would mix with
    the download (a weights format the repo lacks read instead of its own, its chat template kept)."""
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda *a, **k: pytest.fail("downloaded"))
    rc, err = run_main("--repo", "org/model", "--checkpoint_dir", hf_dir)  # files no download put there
    assert rc == 1 and err.count("\n") == 1 and "no --repo org/model download put there" in err \
        and "leave out --repo" in err, err
    (hf_dir / ".hf_repo").write_text("org/other\n")  # another repo's download
    rc, err = run_main("--repo", "org/model", "--checkpoint_dir", hf_dir)
    assert rc == 1 and "holds the files of org/other" in err, err
    # its own repo's (a download cut short, or converted before), or nothing but a download's mark: resumed
    got = []
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, *, token=None: got.append(
        repo_id) or ["config.json"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: None)
    convert_hf_checkpoint.download("org/other", hf_dir)
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / ".hf_repo").write_text("org/other\n")
    convert_hf_checkpoint.download("org/model", tmp_path / "new")
    assert got == ["org/other", "org/model"] and (tmp_path / "new" / ".hf_repo").read_text() == "org/model\n"


def test_unwritable_folder_is_refused_before_a_download(tmp_path, monkeypatch):
    """Without --out the model goes into --checkpoint_dir: one that takes no files is refused before a download."""
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda *a, **k: pytest.fail("downloaded"))
    rc, err = run_main("--repo", "org/model", "--checkpoint_dir", "/proc/tealfast-model")
    assert rc == 1 and err.count("\n") == 1 and "folder /proc does not take new files" in err, err


def test_out_folder_of_another_hf_model_is_refused_before_a_download(hf_src, tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda *a, **k: pytest.fail("downloaded"))
    rc, err = run_main("--repo", "org/model", "--checkpoint_dir", tmp_path / "dl", "--out", hf_src)
    assert rc == 1 and "another model's Hugging Face weights" in err, err
