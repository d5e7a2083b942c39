"""scripts/make_random_checkpoint.py: the folder loads with the runtime's own loaders and generate.py runs on it."""

import pytest
import torch

import generate
import make_random_checkpoint
from bench_decode import PRESETS
from checkpoint import load_model
from conftest import run_script
from model import ModelArgs
from tokenizer import get_tokenizer


def test_random_checkpoint_loads_and_generates(tmp_path, capsys):
    out = tmp_path / "rnd"
    make_random_checkpoint.main(["--preset", "smollm2-135m", "--out", str(out), "--n_layer", "2", "--device", "cpu"])
    model = load_model(out / "model.pth", torch.device("cpu"), torch.bfloat16)
    want = dict(ModelArgs(**PRESETS["smollm2-135m"]).__dict__, n_layer=2)
    assert model.config.__dict__ == want
    tok = get_tokenizer(out)
    assert tok.vocab_size == want["vocab_size"]
    assert tok.bos_id == 256 and tok.eos_ids[0] == 257  # config.json's, as the script writes them
    assert tok.decode(tok.encode("any text, é")) == "any text, é"
    generate.main(["--checkpoint", str(out / "model.pth"), "--device", "cpu", "--max_new_tokens", "4",
                   "--temperature", "0", "--no_stream"])
    assert "tokens/s" in capsys.readouterr().out


def test_bad_output_folder(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(SystemExit) as e:
        make_random_checkpoint.main(["--preset", "smollm2-135m", "--out", str(f), "--n_layer", "1", "--device", "cpu"])
    assert e.value.code == 2 and "not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [(["--n_layer", "31"], "30 layers"), (["--device", "bogus"], "--device")])
def test_bad_values(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        make_random_checkpoint.main(["--preset", "smollm2-135m", "--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_n_layer_of_the_whole_preset(tmp_path, monkeypatch):
    """--n_layer up to the preset's own count is taken: a preset of 2 layers (smollm2-135m's shapes otherwise)
    with --n_layer 2."""
    monkeypatch.setitem(PRESETS, "two-layers", dict(PRESETS["smollm2-135m"], n_layer=2))
    make_random_checkpoint.main(["--preset", "two-layers", "--out", str(tmp_path / "o"), "--n_layer", "2",
                                 "--device", "cpu"])
    assert load_model(tmp_path / "o" / "model.pth").config.n_layer == 2


def test_a_models_folder_is_never_overwritten(tmp_path):
    """Random weights go into a new folder or over random weights: never over Hugging Face weights or a converted
    model (a typo in --out would replace a real model's weights and drop its chat template)."""
    from test_generate import write_tiny_checkpoint
    argv = ["--preset", "smollm2-135m", "--n_layer", "1", "--device", "cpu", "--out"]
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"x")
    converted = write_tiny_checkpoint(tmp_path / "converted").parent  # tealfast.json's source: "test"
    unknown = write_tiny_checkpoint(tmp_path / "unknown").parent
    (unknown / "tealfast.json").write_text("{")
    for folder, needle in ((hf, "Hugging Face weights"), (converted, "holds a checkpoint (test)"),
                           (unknown, "of unknown source")):
        before = {f.name: f.read_bytes() for f in folder.iterdir()}
        code, _, err = run_script("scripts/make_random_checkpoint.py", [*argv, folder])
        assert code == 1 and needle in err and len(err.strip().splitlines()) == 1, err
        assert "converting" not in err, err  # this script writes random weights: it converts nothing
        assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    rnd = tmp_path / "rnd"
    for _ in range(2):  # over its own random weights: fine
        make_random_checkpoint.main([*argv, str(rnd)])
    assert (rnd / "model.pth").is_file()
