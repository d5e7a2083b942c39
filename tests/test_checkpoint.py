"""checkpoint.py: config.json parsing, loading with every weight checked (bad checkpoints raise CheckpointError
with one line), and writing a folder."""
import json
import os
from pathlib import Path

import pytest
import torch

import checkpoint
from model import CheckpointError, precompute_freqs_cis
from test_model import convert, make_hf_model


# ---- bad checkpoints -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    make_hf_model("qwen2", d / "hf")
    convert(d / "hf", d / "out")
    return d / "out"


def broken_copy(good: Path, tmp_path: Path, state_edit=None, cfg_edit=None, pth_bytes=None) -> Path:
    """Copy of the good checkpoint folder with its state dict, config or raw model.pth bytes changed."""
    out = tmp_path / "ckpt"
    out.mkdir()
    cfg = json.loads((good / "config.json").read_text())
    if cfg_edit is not None:
        cfg_edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    if pth_bytes is not None:
        (out / "model.pth").write_bytes(pth_bytes((good / "model.pth").read_bytes()))
    else:
        state = torch.load(good / "model.pth", weights_only=True)
        if state_edit is not None:
            state_edit(state)
        torch.save(state, out / "model.pth")
    return out / "model.pth"


def _set(d, k, v):
    d[k] = v


BAD_CHECKPOINTS = {
    "unknown model_type": dict(cfg_edit=lambda c: _set(c, "model_type", "gpt2")),
    "wrong shape": dict(state_edit=lambda s: _set(s, "layers.1.feed_forward.w2.weight", torch.zeros(64, 127))),
    "extra key": dict(state_edit=lambda s: _set(s, "layers.0.attention.wo.bias", torch.zeros(64))),
    "missing key": dict(state_edit=lambda s: s.pop("layers.2.ffn_norm.weight")),
    "missing bias": dict(state_edit=lambda s: s.pop("layers.0.attention.wqkv.bias")),
    "truncated model.pth": dict(pth_bytes=lambda b: b[: len(b) // 2]),
    "garbage model.pth": dict(pth_bytes=lambda b: b"not a checkpoint" * 10),
    "config lacks key": dict(cfg_edit=lambda c: c.pop("hidden_size")),
    "config null vocab": dict(cfg_edit=lambda c: _set(c, "vocab_size", None)),
    "config null heads": dict(cfg_edit=lambda c: _set(c, "num_attention_heads", None)),
    "config size as text": dict(cfg_edit=lambda c: _set(c, "hidden_size", "64")),
    "config zero layers": dict(cfg_edit=lambda c: _set(c, "num_hidden_layers", 0)),
    "config bool size": dict(cfg_edit=lambda c: _set(c, "intermediate_size", True)),
    "config heads not a multiple": dict(cfg_edit=lambda c: _set(c, "num_key_value_heads", 3)),
    "config eps as text": dict(cfg_edit=lambda c: _set(c, "rms_norm_eps", "1e-6")),
    "int8 weight": dict(state_edit=lambda s: _set(s, "layers.1.feed_forward.w2.weight",
                                                  torch.ones(64, 128, dtype=torch.int8))),
    "quantization_config": dict(cfg_edit=lambda c: _set(c, "quantization_config", {"quant_method": "fp8"})),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_load_model_rejects_bad_checkpoint(good_ckpt, tmp_path, case):
    path = broken_copy(good_ckpt, tmp_path, **BAD_CHECKPOINTS[case])
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_model(path, dtype=torch.float32)
    assert "\n" not in str(e.value) and len(str(e.value).replace(str(path), "")) < 220, str(e.value)  # one line
    if case == "garbage model.pth":  # not torch's advice to re-save the file for mmap
        assert str(e.value).endswith("not the zip archive that torch.save writes"), str(e.value)


@pytest.mark.parametrize("edit, says", [
    (dict(cfg_edit=lambda c: _set(c, "tie_word_embeddings", True)), "unknown weights: output.weight"),
    (dict(state_edit=lambda s: s.pop("output.weight")), "missing weights: output.weight"),  # a tied model's weights
])
def test_load_model_names_tie_word_embeddings(good_ckpt, tmp_path, edit, says):
    path = broken_copy(good_ckpt, tmp_path, **edit)
    with pytest.raises(CheckpointError, match="tie_word_embeddings") as e:
        checkpoint.load_model(path, dtype=torch.float32)
    assert str(e.value).startswith(says)


@pytest.mark.parametrize("content", [torch.zeros(3), [torch.zeros(3)], {0: torch.zeros(3)}, {"w": 3}])
def test_load_model_rejects_a_file_that_is_no_state_dict(good_ckpt, tmp_path, content):
    path = broken_copy(good_ckpt, tmp_path)
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="no state dict"):
        checkpoint.load_model(path)


def test_load_model_rejects_a_folder(good_ckpt):
    with pytest.raises(CheckpointError, match="is a folder"):
        checkpoint.load_model(good_ckpt)


def test_load_model_rejects_missing_config(good_ckpt, tmp_path):
    path = broken_copy(good_ckpt, tmp_path)
    (path.parent / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        checkpoint.load_model(path)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"null", b"\xff\xfe{}", b"[" * 100000 + b"]" * 100000,
                                     b"[" + b"1" * 5000 + b"]"])  # the last: past int()'s 4,300 digits
def test_load_model_rejects_corrupt_config(good_ckpt, tmp_path, content):
    path = broken_copy(good_ckpt, tmp_path)
    (path.parent / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="config.json"):
        checkpoint.load_model(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_load_model_rejects_weights_not_finite(good_ckpt, tmp_path, bad, dtype):
    """A NaN or inf weight is a corrupt checkpoint: refused at load, naming it, not found as junk tokens later."""
    def edit(state):
        state["layers.1.feed_forward.w2.weight"][3, 5] = bad
        state["layers.0.attention.wqkv.bias"][7] = bad
    path = broken_copy(good_ckpt, tmp_path, state_edit=edit)
    with pytest.raises(CheckpointError, match=r"weight layers\.0\.attention\.wqkv\.bias \(and 1 more\) holds NaN"):
        checkpoint.load_model(path, dtype=dtype)


def test_load_model_takes_large_finite_weights(good_ckpt, tmp_path):
    """The check sums each weight in fp32: fp16 weights whose sum is past fp16's range are no corruption."""
    big = broken_copy(good_ckpt, tmp_path, state_edit=lambda s: s["norm.weight"].fill_(60000.0))
    checkpoint.load_model(big, dtype=torch.float16)


def test_optional_config_fields_may_be_null(good_ckpt, tmp_path):
    path = broken_copy(good_ckpt, tmp_path, cfg_edit=lambda c: c.update(rms_norm_eps=None, num_key_value_heads=None))
    c = checkpoint.load_config(path)
    assert c.norm_eps == 1e-6 and c.n_local_heads == c.n_head


def test_load_model_rejects_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError):
        checkpoint.load_model(tmp_path / "model.pth")


# ---- config parsing edge cases ---------------------------------------------------------------------
def hf_config(**overrides) -> dict:
    return {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
            "max_position_embeddings": 8192, **overrides}


@pytest.mark.parametrize("overrides", [
    dict(model_type="gpt2"),
    dict(hidden_act="gelu"),
    dict(attention_bias=True),  # would need an o_proj bias
    dict(mlp_bias=True),
    dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
    dict(rope_scaling={"type": "linear", "factor": 2.0}),
    dict(rope_parameters={"rope_type": "default", "rope_theta": "abc"}),
    dict(rope_scaling="llama3"),  # not an object
    dict(rope_parameters="llama3"),
    dict(rope_scaling={"rope_type": "llama3"}),  # no factor
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 2.0}),
    dict(num_attention_heads=6, num_key_value_heads=4),  # GQA needs whole groups of query heads
    dict(hidden_size=60),  # head_dim 15: RoPE rotates pairs
    dict(head_dim=15),
    # Python's json reads NaN and Infinity: numbers that would run silently wrong
    dict(rms_norm_eps=float("nan")),
    dict(rms_norm_eps=float("inf")),
    dict(rope_theta=float("inf")),
    dict(rope_parameters={"rope_type": "default", "rope_theta": float("nan")}),
    dict(rope_scaling={"rope_type": "llama3", "factor": float("inf")}),
    dict(tie_word_embeddings="false"),  # a string would read as true
    dict(quantization_config={"quant_method": "gptq", "bits": 4}),  # the weights would be codes, not numbers
    dict(use_sliding_window=1),
])
def test_from_hf_config_rejects_unsupported(overrides):
    with pytest.raises(CheckpointError):
        checkpoint.from_hf_config(hf_config(**overrides))


def test_from_hf_config_defaults():
    # HF's defaults where config.json leaves a key out
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    a = checkpoint.from_hf_config(hf_config())
    assert not a.tie_embeddings and not a.qkv_bias and a.head_dim == 16 and a.n_local_heads == 2
    assert a.norm_eps == 1e-6 and a.rope_base == 10000.0 and a.rope_scaling is None and a.block_size == 8192
    assert {c().rms_norm_eps for c in (LlamaConfig, MistralConfig, Qwen2Config)} == {a.norm_eps}
    b = checkpoint.from_hf_config(hf_config(num_key_value_heads=None, max_position_embeddings=None))
    assert b.n_local_heads == 4 and b.block_size == 2048


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_from_hf_config_kv_heads_default_follows_transformers(model_type):
    # a config.json without num_key_value_heads: transformers' default differs by model type (Mistral 8, Qwen2 32)
    import transformers
    cfg = {k: v for k, v in hf_config(model_type=model_type, hidden_size=512, num_attention_heads=32).items()
           if k != "num_key_value_heads"}
    ref = transformers.AutoConfig.for_model(**cfg)
    assert checkpoint.from_hf_config(cfg).n_local_heads == ref.num_key_value_heads
    assert len({8, 32, ref.num_key_value_heads}) == 2 or model_type == "llama"  # the defaults this test is about


def hf_windows(ref) -> list:
    """Each layer's sliding window (0: none) as transformers' modeling code applies it: Mistral's attention takes
    config.sliding_window in every layer, Qwen2's and Ministral's in the layers its layer_types calls
    sliding_attention."""
    window = getattr(ref, "sliding_window", None) or 0
    if ref.model_type in ("qwen2", "ministral"):
        return [window if t == "sliding_attention" else 0 for t in ref.layer_types]
    return [window if ref.model_type == "mistral" else 0] * ref.num_hidden_layers


def hf_read(cfg: dict, tmp_path):
    """The config as transformers reads a config.json (AutoConfig.from_pretrained: a "mistral" one with layer_types
    becomes Ministral's)."""
    import transformers
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return transformers.AutoConfig.from_pretrained(tmp_path)


def our_windows(args) -> list:
    return [args.window(i) for i in range(args.n_layer)]


@pytest.mark.parametrize("model_type, extra", [
    ("llama", {}), ("mistral", {}), ("qwen2", {}), ("qwen2", {"use_sliding_window": True}),
    ("mistral", {"sliding_window": None}), ("mistral", {"sliding_window": 64}), ("llama", {"sliding_window": 64}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1, "num_hidden_layers": 3}),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 64, "max_window_layers": 0}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "num_hidden_layers": 3,
               "layer_types": ["full_attention"] * 2 + ["sliding_attention"]}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "num_hidden_layers": 3,
               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    ("mistral", {"sliding_window": 64, "num_hidden_layers": 3,  # Ministral's interleaved layers
                 "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    ("mistral", {"sliding_window": 64, "layer_types": ["full_attention"] * 2}),
    ("ministral", {"sliding_window": 64, "layer_types": ["full_attention", "sliding_attention"]}),
    ("ministral", {}),
])
def test_from_hf_config_context_and_windows_follow_transformers(model_type, extra, tmp_path):
    # a config.json without max_position_embeddings (and sliding_window where not given): the context and the
    # windows transformers would use
    cfg = {k: v for k, v in hf_config(model_type=model_type, **extra).items() if k != "max_position_embeddings"}
    ref = hf_read(cfg, tmp_path)
    args = checkpoint.from_hf_config(cfg)
    assert args.block_size == ref.max_position_embeddings
    assert our_windows(args) == hf_windows(ref)


def test_from_hf_config_rope_formats():
    # transformers 4 style (top-level rope_theta / rope_scaling) and 5 style (rope_parameters) agree
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    old = checkpoint.from_hf_config(hf_config(rope_theta=5e5, rope_scaling={"rope_type": "llama3", **scaling}))
    new = checkpoint.from_hf_config(hf_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5,
                                                                    **scaling}))
    assert old.rope_base == new.rope_base == 5e5
    assert torch.equal(precompute_freqs_cis(32, 16, old.rope_base, old.rope_scaling),
                       precompute_freqs_cis(32, 16, new.rope_base, new.rope_scaling))
    plain = checkpoint.from_hf_config(hf_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert plain.rope_scaling is None and plain.rope_base == 1e6
    assert checkpoint.from_hf_config(hf_config()).rope_base == 10000.0
    # HF's llama3 falls back to max_position_embeddings for the original context
    no_orig = {k: v for k, v in scaling.items() if k != "original_max_position_embeddings"}
    args = checkpoint.from_hf_config(hf_config(rope_scaling={"rope_type": "llama3", **no_orig}))
    assert args.rope_scaling["original_max_position_embeddings"] == 8192
    # which, left out as well, is the model type's default
    cfg = {k: v for k, v in hf_config(rope_scaling={"rope_type": "llama3", **no_orig}).items()
           if k != "max_position_embeddings"}
    assert checkpoint.from_hf_config(cfg).rope_scaling["original_max_position_embeddings"] == 2048
    # and to its own defaults for the band's two factors
    args = checkpoint.from_hf_config(hf_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    assert (args.rope_scaling["low_freq_factor"], args.rope_scaling["high_freq_factor"]) == (1.0, 4.0)


def test_from_hf_config_sliding_window():
    # the window no longer caps the context: attention past it is the window's
    m = checkpoint.from_hf_config(hf_config(model_type="mistral", sliding_window=4096))
    assert m.block_size == 8192 and our_windows(m) == [4096, 4096]
    q = checkpoint.from_hf_config(hf_config(model_type="qwen2", sliding_window=16, use_sliding_window=True,
                                            max_window_layers=1))
    assert our_windows(q) == [0, 16]
    for model_type in ("qwen2", "mistral"):
        for bad in (dict(layer_types=["full_attention"]),  # one layer short
                    dict(layer_types=["full_attention", "chunked_attention"]),
                    dict(layer_types="full_attention")):
            with pytest.raises(CheckpointError, match="layer_types"):
                checkpoint.from_hf_config(hf_config(model_type=model_type, use_sliding_window=True, **bad))
    for bad in (dict(max_window_layers=-1), dict(max_window_layers=True), dict(max_window_layers=1.5)):
        with pytest.raises(CheckpointError, match="max_window_layers"):
            checkpoint.from_hf_config(hf_config(model_type="qwen2", use_sliding_window=True, **bad))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize("extra", [
    dict(rope_theta=50.0, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),  # the dict's wins
    dict(rope_theta=50.0, rope_parameters={"rope_type": "default"}),  # the top level's fills in
    dict(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    # the older rope_scaling replaces rope_parameters, the top-level rope_theta (or the default) filling in
    dict(rope_scaling={**LLAMA3, "original_max_position_embeddings": 64},
         rope_parameters={**LLAMA3, "rope_theta": 5e5, "original_max_position_embeddings": 16}),
    dict(rope_theta=7e5, rope_scaling={**LLAMA3, "original_max_position_embeddings": 64}),
    # a top-level original_max_position_embeddings over the dict's (transformers' Phi-3 exception)
    dict(original_max_position_embeddings=4,
         rope_parameters={**LLAMA3, "rope_theta": 5e5, "original_max_position_embeddings": 16}),
])
def test_rope_values_given_twice_are_read_as_transformers_reads_them(extra, tmp_path):
    """Where config.json holds a RoPE value in two places (hand-edited, or written by mixed versions), the model
    runs with the one transformers takes."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    cfg = hf_config(**extra)
    args = checkpoint.from_hf_config(cfg)
    rot = LlamaRotaryEmbedding(hf_read(cfg, tmp_path))  # the frequencies transformers' model runs with
    cos, sin = precompute_freqs_cis(2, args.head_dim, args.rope_base, args.rope_scaling)[1].unbind(-1)
    assert rot.attention_scaling == 1.0
    torch.testing.assert_close(torch.atan2(sin, cos), rot.inv_freq.float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_attention_bias_is_llamas_only(model_type, tmp_path):
    """Mistral's and Qwen2's attention ignore attention_bias (no biases; Qwen2's q/k/v biases either way), as
    transformers builds them: a config that says true loads; Llama's would need an o_proj bias and is refused."""
    import transformers
    cfg = hf_config(model_type=model_type, attention_bias=True)
    hf = transformers.AutoModelForCausalLM.from_config(hf_read(cfg, tmp_path))
    biases = {n.split(".")[-2] for n, _ in hf.named_parameters() if n.endswith("bias")}
    assert checkpoint.from_hf_config(cfg).qkv_bias == (biases == {"q_proj", "k_proj", "v_proj"})
    assert biases <= {"q_proj", "k_proj", "v_proj"}


def test_a_conversion_cut_short_leaves_no_model_pth(tmp_path):
    """prepare.sh takes a folder with a model.pth as converted: one that fails half-way must not leave it."""
    with pytest.raises(OSError):  # the weights are written, then a tokenizer file cannot be copied
        checkpoint.save_checkpoint(tmp_path / "out", {"w": torch.zeros(2)}, {}, "hf",
                                      {"tokenizer.json": tmp_path / "missing.json"}, "test")
    assert not (tmp_path / "out" / "model.pth").exists()
    assert not (tmp_path / "out" / "model.pth.partial").exists()
    path = checkpoint.save_checkpoint(tmp_path / "out", {"w": torch.ones(2)}, {}, "hf",
                                         {"tokenizer.json": "{}"}, "test")
    assert path == tmp_path / "out" / "model.pth" and torch.equal(torch.load(path)["w"], torch.ones(2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json", "model.pth", "tealfast.json",
                                                             "tokenizer.json"]


def test_a_conversion_sets_the_old_thresholds_aside(tmp_path, capsys):
    """Converting into a folder calibrated before: its thresholds were the replaced weights'; a fine-tune of the
    same shapes would pass their fingerprint, so they are moved aside, not used."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "thresholds.json").write_text("{}")
    (out / "thresholds_weighted.json").write_text("[]")
    checkpoint.save_checkpoint(out, {"w": torch.ones(2)}, {}, "hf", {"tokenizer.json": "{}"}, "test")
    assert not (out / "thresholds.json").exists() and (out / "thresholds.json.stale").read_text() == "{}"
    assert (out / "thresholds_weighted.json.stale").read_text() == "[]"
    assert "run calibrate.py again" in capsys.readouterr().err


def test_a_conversion_into_a_folder_where_a_file_belongs_replaces_nothing(tmp_path):
    out = tmp_path / "out"
    (out / "chat_template.jinja").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match="chat_template.jinja is a folder"):
        checkpoint.save_checkpoint(out, {"w": torch.ones(2)}, {"a": 1}, "hf", {"tokenizer.json": "{}"}, "test")
    assert (out / "config.json").read_text() == "{}" and not (out / "tokenizer.json").exists()


def test_outputs_never_overwrite_the_checkpoint(good_ckpt, tmp_path):
    """--out, --json, --plot, --profile naming the weights, config, tokenizer or thresholds: refused; the allowed
    names and files elsewhere pass."""
    d, ckpt = good_ckpt, good_ckpt / "model.pth"
    for name in ("model.pth", "config.json", "tealfast.json", "tokenizer.json", "tokenizer.model", "thresholds.json",
                 "chat_template.jinja"):
        with pytest.raises(ValueError, match=f"would overwrite the checkpoint's own {name}"):
            checkpoint.check_output(d / name, ckpt, "--json")
    with pytest.raises(ValueError, match="model.pth"):  # however the path is spelt
        checkpoint.check_output(d / "sub" / ".." / "model.pth", ckpt, "--json")
    checkpoint.check_output(d / "thresholds.json", ckpt, "--out", allowed=("thresholds.json",))
    checkpoint.check_output(tmp_path / "config.json", ckpt, "--json")
    checkpoint.check_output(None, ckpt, "--json")
    with pytest.raises(ValueError, match="one of this command's input files"):  # e.g. --thresholds elsewhere
        checkpoint.check_output(tmp_path / "t.json", ckpt, "--profile", inputs=[None, tmp_path / "t.json"])
    with pytest.raises(ValueError, match="--plot and --json name the same file"):  # two outputs of one command
        checkpoint.check_output(tmp_path / "a.png", ckpt, "--plot", outputs={"--json": tmp_path / "." / "a.png"})
    checkpoint.check_output(tmp_path / "a.png", ckpt, "--plot", outputs={"--json": None, "--out": tmp_path / "b"})


def test_outputs_never_overwrite_through_a_hard_link(good_ckpt, tmp_path):
    """A hard link is the same file under another name: writing through it would overwrite the original."""
    d, ckpt = good_ckpt, good_ckpt / "model.pth"
    os.link(d / "config.json", tmp_path / "linked.json")
    with pytest.raises(ValueError, match="would overwrite the checkpoint's own config.json"):
        checkpoint.check_output(tmp_path / "linked.json", ckpt, "--json")
    (tmp_path / "t.json").write_text("{}")
    os.link(tmp_path / "t.json", tmp_path / "t2.json")
    with pytest.raises(ValueError, match="one of this command's input files"):
        checkpoint.check_output(tmp_path / "t2.json", ckpt, "--profile", inputs=[tmp_path / "t.json"])
    with pytest.raises(ValueError, match="--plot and --json name the same file"):
        checkpoint.check_output(tmp_path / "t2.json", ckpt, "--plot", outputs={"--json": tmp_path / "t.json"})


def test_a_conversion_into_another_models_hf_folder_is_refused(tmp_path):
    # its weights would stay beside the converted model's config.json and tokenizer; converting in place is fine
    (tmp_path / "config.json").write_text("{}")
    for weights in ("model-00001-of-00002.safetensors", "pytorch_model.bin"):
        (tmp_path / weights).write_bytes(b"x")
        with pytest.raises(CheckpointError, match="another model's Hugging Face weights"):
            checkpoint.check_target(tmp_path)  # a GGUF conversion's output
        with pytest.raises(CheckpointError, match="another model's Hugging Face weights"):
            checkpoint.check_target(tmp_path, tmp_path.parent)
        checkpoint.check_target(tmp_path, tmp_path)
        (tmp_path / weights).unlink()
    checkpoint.check_target(tmp_path)
    checkpoint.check_target(tmp_path / "new")


def test_a_conversion_in_place_however_the_folder_is_spelt(tmp_path, monkeypatch):
    """--out naming the --checkpoint_dir itself by another path (absolute against relative, through a symlink) is
    converting in place, not another model's folder."""
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"x")
    (tmp_path / "link").symlink_to(src)
    monkeypatch.chdir(tmp_path)
    for out in (src, tmp_path / "link", Path("hf") / ".." / "hf"):
        checkpoint.check_target(out, "hf")
    with pytest.raises(CheckpointError, match="another model's Hugging Face weights"):
        checkpoint.check_target(src, tmp_path)


def test_a_hugging_face_folder_is_sent_to_the_converter(tmp_path):
    """An unconverted HF folder (or a file in it) given as the checkpoint: one line that says to convert it."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    for given in (tmp_path, tmp_path / "model.safetensors"):
        with pytest.raises(checkpoint.CheckpointError, match="Hugging Face model folder.*convert_hf_checkpoint"):
            checkpoint.load_config(given)
    (tmp_path / "cfg").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="is a folder, not the checkpoint's config.json"):
        checkpoint.read_config(tmp_path / "cfg")
