"""scripts/eval_ppl.py on the real SmolLM2 (900 held-out tokens), thresholds from test_calibrate's calibration."""
import functools
import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval_ppl
import textdata
from conftest import needs_gguf, run_script
from checkpoint import load_model
from model import PROJECTIONS
from test_calibrate import real_calibration
from tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS, SEQ_LEN = 900, 256  # 3 full windows and a shorter one, scored in one batch of 4


@pytest.fixture(scope="module")
def results(smollm2_dir, tmp_path_factory):
    cal = real_calibration(smollm2_dir, tmp_path_factory)
    out = tmp_path_factory.mktemp("eval") / "r.json"
    res = eval_ppl.main(["--checkpoint", str(cal["ckpt"]), "--sparsity", "0,0.25,0.5", "--method", "uniform,cats",
                         "--max_tokens", str(MAX_TOKENS), "--seq_len", str(SEQ_LEN), "--device", "cpu",
                         "--json", str(out)])
    return cal, res, json.loads(out.read_text())


def dense_perplexity(ckpt: Path) -> float:
    """Plain model forward + cross-entropy over SEQ_LEN windows; no sparse flags, no stats."""
    m = load_model(ckpt, "cpu", torch.float32)
    ids = get_tokenizer(ckpt.parent).encode(textdata.heldout_text())[:MAX_TOKENS]
    nll, n = 0.0, 0
    m.setup_caches(1, SEQ_LEN)
    with torch.no_grad():
        for i in range(0, len(ids), SEQ_LEN):
            w = torch.tensor([ids[i:i + SEQ_LEN]])
            if w.shape[1] < 2:
                continue
            logits = m(w, torch.arange(w.shape[1]))
            nll += F.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    return math.exp(nll / n)


def pick(res, method, s):
    return next(r for r in res if r["method"] == method and r["sparsity"] == s)


@needs_gguf
def test_dense_matches_independent(results):
    cal, res, _ = results
    want = dense_perplexity(cal["ckpt"])
    got = pick(res, "uniform", 0.0)
    assert got["ppl"] == pytest.approx(want, rel=1e-4)
    assert got["achieved_sparsity"] == 0
    assert 1 < want < 200  # a real model on English text


@needs_gguf
def test_sparsity_raises_perplexity(results):
    _, res, _ = results
    p0, p25, p50 = (pick(res, "uniform", s)["ppl"] for s in (0.0, 0.25, 0.5))
    assert p0 < p25 < p50
    assert p50 < 3 * p0  # TEAL at 50% degrades, it does not break the model
    for s in (0.25, 0.5):
        r = pick(res, "uniform", s)
        # every token is masked (sparse prefill), so later layers drift above the level (see test_calibrate.py)
        assert abs(r["achieved_sparsity"] - s) < 0.03, r
        assert all(-0.015 < v - s < 0.05 for v in r["achieved_per_projection"].values()), r


@needs_gguf
def test_json_schema(results):
    _, res, data = results
    assert data["tokens"] == MAX_TOKENS and data["seq_len"] == SEQ_LEN
    assert data["predicted"] == MAX_TOKENS - 4  # every token but each of the 4 windows' first
    rows = data["results"]
    assert [(r["method"], r["sparsity"]) for r in rows] == [(m, s) for m in ("uniform", "cats") for s in (0.0, 0.25, 0.5)]
    for r in rows:
        assert {"method", "sparsity", "achieved_sparsity", "ppl"} <= set(r)
        assert isinstance(r["ppl"], float) and r["ppl"] > 1
        assert 0 <= r["achieved_sparsity"] < 1
        assert list(r["achieved_per_projection"]) == list(PROJECTIONS)
    assert rows == json.loads(json.dumps(res))


@needs_gguf
def test_cats(results):
    _, res, _ = results
    assert pick(res, "cats", 0.0)["ppl"] == pick(res, "uniform", 0.0)["ppl"]
    c25, c50 = pick(res, "cats", 0.25), pick(res, "cats", 0.5)
    assert pick(res, "uniform", 0.0)["ppl"] < c25["ppl"] < c50["ppl"]
    per = c50["achieved_per_projection"]
    # only up and down skip rows under CATS; attention and gate stay dense
    assert all(per[p] == 0 for p in ("q", "k", "v", "o", "gate"))
    assert abs(per["up"] - 0.5) < 0.05 and per["up"] == per["down"]


def run_main(argv) -> tuple:
    code, _, err = run_script("scripts/eval_ppl.py", argv)
    return code, err


@pytest.mark.parametrize("argv", [["--method", "bogus"], ["--method", "uniform,nope"], ["--sparsity", "0,1.0"],
                                  ["--sparsity", "a,b"], ["--seq_len", "1"], ["--device", "bogus"],
                                  ["--json", "."], ["--plot", "no/such/folder/p.png"], ["--plot", "p.txt"],
                                  # flags that would be ignored without a word
                                  ["--text", "t.txt", "--corpus", "stdlib-docstrings"],
                                  ["--weighted_thresholds", "w.json"], ["--method", "cats", "--weighted_thresholds", "w"],
                                  ["--method", "weighted", "--thresholds", "t.json", "--weighted_thresholds", "w"],
                                  ["--method", "uniform,uniform"]])  # as --sparsity: a typo that runs it twice
def test_bad_args(tmp_path, argv):
    code, err = run_main(["--checkpoint", tmp_path / "model.pth", *argv])
    assert code == 2
    assert len([l for l in err.splitlines() if "error:" in l]) == 1 and "Traceback" not in err, err


def test_checkpoint_path_is_gpt_fasts_name_for_checkpoint():
    assert eval_ppl.parse_args(["--checkpoint_path", "m.pth"]).checkpoint == Path("m.pth")


def test_missing_checkpoint(tmp_path):
    code, err = run_main(["--checkpoint", tmp_path / "model.pth"])
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_tiny_model_dense_needs_no_thresholds_and_short_text_is_refused(tmp_path):
    from test_generate import write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")  # no thresholds.json beside it
    (tmp_path / "one.txt").write_text("a")
    code, err = run_main(["--checkpoint", ckpt, "--sparsity", "0", "--text", tmp_path / "one.txt", "--device", "cpu"])
    assert code == 1 and err.startswith("error: ") and "at least 2" in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "some.txt").write_text("the cat sat on the mat and the dog sat on the log " * 4)
    code, err = run_main(["--checkpoint", ckpt, "--sparsity", "0", "--text", tmp_path / "some.txt", "--seq_len", "8",
                          "--device", "cpu"])
    assert code == 0 and "warning: " in err and "tokens: perplexity and achieved sparsity over so few" in err, err
    code, err = run_main(["--checkpoint", ckpt, "--sparsity", "0,0.4", "--text", tmp_path / "some.txt", "--device",
                          "cpu"])
    assert code == 1 and "thresholds file not found" in err, err
    code, err = run_main(["--checkpoint", ckpt, "--sparsity", "0", "--text", tmp_path / "some.txt", "--device", "cpu",
                          "--json", tmp_path / "r.png", "--plot", tmp_path / "r.png"])
    assert code == 1 and "--plot and --json name the same file" in err and not (tmp_path / "r.png").exists(), err


def test_seq_len_follows_the_model_context(tmp_path):
    """Without --seq_len, windows of 512 tokens cut to the tiny model's context of 32; a --seq_len past the context
    is refused, naming the flag and the context."""
    from test_generate import write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")  # context 32
    (tmp_path / "some.txt").write_text("the cat sat on the mat and the dog sat on the log " * 4)
    base = ["--checkpoint", ckpt, "--sparsity", "0", "--text", tmp_path / "some.txt", "--device", "cpu"]
    code, err = run_main([*base, "--json", tmp_path / "r.json"])
    assert code == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    n = data["tokens"]
    assert n > 64 and data["seq_len"] == 32
    assert data["predicted"] == n - math.ceil(n / 32)  # every token but each 32-token window's first
    code, err = run_main([*base, "--seq_len", "33"])
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "--seq_len 33" in err and "context of 32" in err, err
    code, out, _ = run_script("scripts/eval_ppl.py", ["--help"])
    assert code == 0 and "window length (default: 512, or the model's context where shorter)" in " ".join(out.split())


def test_inputs_checked_before_the_weights_load(tmp_path, monkeypatch):
    """--seq_len, the text and the thresholds file are checked against config.json alone, before the weights load."""
    import checkpoint
    from test_generate import tiny_thresholds, write_tiny_checkpoint

    def no_load(*a, **k):
        raise AssertionError("the weights loaded before the inputs were checked")
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")  # context 32, 2 layers
    (tmp_path / "some.txt").write_text("the cat sat on the mat and the dog sat on the log " * 4)
    other = tiny_thresholds(ckpt, tmp_path / "t.json", n_layer=3)
    other_weighted = tiny_thresholds(ckpt, tmp_path / "w.json", n_layer=3, score="weighted")
    no_greedy = tiny_thresholds(ckpt, tmp_path / "u.json")
    monkeypatch.setattr(checkpoint, "load_model", no_load)
    base = ["--checkpoint", ckpt, "--text", tmp_path / "some.txt", "--device", "cpu"]
    for extra, want in ((["--seq_len", "33"], "--seq_len 33"),
                        (["--sparsity", "0.4", "--thresholds", other], "another model"),
                        (["--sparsity", "0", "--thresholds", other], "another model"),  # named: checked when dense
                        (["--sparsity", "0", "--method", "weighted", "--weighted_thresholds", other_weighted],
                         "another model"),

                        (["--sparsity", "0.4", "--thresholds", no_greedy, "--method", "uniform,greedy"], "greedy")):
        code, err = run_main([*base, *extra])
        assert code == 1 and want in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("n_ids", [30, 33, 17, 9, 2])
def test_perplexity_scores_every_window_whole(tmp_path, n_ids):
    """Against the model run on each window alone: the shorter last window must not cut the others in its batch
    (cut to it, 30 ids in windows of 8 would score 4 * 5 predictions instead of 26)."""
    from test_generate import write_tiny_checkpoint
    m = load_model(write_tiny_checkpoint(tmp_path / "tiny"), "cpu", torch.float32)
    ids = torch.randint(0, m.config.vocab_size, (n_ids,)).tolist()
    seq_len = 8
    nll, n = 0.0, 0
    m.setup_caches(1, seq_len)
    with torch.no_grad():
        for i in range(0, n_ids - 1, seq_len):
            w = torch.tensor([ids[i:i + seq_len]])
            logits = m(w, torch.arange(w.shape[1]))
            nll += F.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    ppl, stats, predicted = eval_ppl.perplexity(m, ids, seq_len)
    assert predicted == n
    assert ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert stats.shape == (m.config.n_layer, len(PROJECTIONS), 4)


def test_a_perplexity_past_the_float_range_is_an_error(tmp_path):
    """Finite logits, yet a mean loss whose exp overflows (a badly scaled checkpoint): one line, not OverflowError."""
    from test_generate import write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    state = torch.load(ckpt)
    state["norm.weight"] *= 1e5
    torch.save(state, ckpt)
    (tmp_path / "some.txt").write_text("the cat sat on the mat and the dog sat on the log " * 4)
    code, err = run_main(["--checkpoint", ckpt, "--sparsity", "0", "--text", tmp_path / "some.txt", "--seq_len", "8",
                          "--device", "cpu"])
    line = [l for l in err.splitlines() if not l.startswith("warning: ")]
    assert code == 1 and len(line) == 1 and "perplexity overflows" in line[0], err


def test_method_without_its_table_fails_before_any_work(tmp_path):
    from test_generate import tiny_thresholds, write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    tiny_thresholds(ckpt, ckpt.parent / "thresholds.json")  # magnitude levels only, no greedy allocation
    (tmp_path / "some.txt").write_text("the cat sat on the mat and the dog sat on the log " * 4)
    out = io.StringIO()
    with pytest.raises(ValueError, match="greedy"), redirect_stdout(out):
        eval_ppl.main(["--checkpoint", str(ckpt), "--sparsity", "0,0.4", "--method", "uniform,greedy", "--text",
                       str(tmp_path / "some.txt"), "--device", "cpu"])
    assert out.getvalue() == ""  # not even the table's header: uniform did not run first


def test_thresholds_file_of_the_other_score_is_refused(tmp_path):
    from test_generate import tiny_thresholds, write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    tiny_thresholds(ckpt, ckpt.parent / "thresholds.json")  # magnitude scores
    (tmp_path / "some.txt").write_text("the cat sat on the mat and the dog sat on the log " * 4)
    base = ["--checkpoint", ckpt, "--sparsity", "0.4", "--text", tmp_path / "some.txt", "--device", "cpu", "--seq_len", "16"]
    code, err = run_main([*base, "--method", "weighted", "--weighted_thresholds", ckpt.parent / "thresholds.json"])
    assert code == 1 and "holds magnitude scores; --weighted_thresholds takes weighted ones" in err, err
    assert len(err.strip().splitlines()) == 1
    code, err = run_main([*base, "--method", "uniform"])
    assert code == 0, err


def test_achieved_sparsity_is_parameter_weighted(tmp_path, monkeypatch):
    """Per projection: dropped / total inputs summed over layers; overall: weighted by each projection's
    parameters (written out from the tiny config here), not a plain mean of the seven."""
    from test_generate import tiny_thresholds, write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    tiny_thresholds(ckpt, ckpt.parent / "thresholds.json")
    (tmp_path / "some.txt").write_text("the cat sat on the mat and the dog sat on the log " * 4)
    stats = torch.zeros(2, len(PROJECTIONS), 4, dtype=torch.float64)
    stats[0, :, 0] = torch.arange(1, 8)  # layer 0 drops 1..7 of 10, layer 1 drops 3 of 30: (1..7 + 3) / 40
    stats[0, :, 1] = 10
    stats[1, :, 0] = 3
    stats[1, :, 1] = 30
    monkeypatch.setattr(eval_ppl, "perplexity", lambda m, ids, seq_len: (5.0, stats, len(ids) - 1))
    with redirect_stdout(io.StringIO()):
        res = eval_ppl.main(["--checkpoint", str(ckpt), "--sparsity", "0.4", "--text", str(tmp_path / "some.txt"),
                             "--device", "cpu"])
    per = (torch.arange(1, 8, dtype=torch.float64) + 3) / 40
    dim, q, kv, ff = 64, 4 * 16, 2 * 16, 128  # write_tiny_checkpoint's config
    params = torch.tensor([q * dim, kv * dim, kv * dim, dim * q, dim * ff, dim * ff, dim * ff], dtype=torch.float64)
    assert list(res[0]["achieved_per_projection"].values()) == pytest.approx(per.tolist(), abs=1e-5)
    assert res[0]["achieved_sparsity"] == pytest.approx(float((per * params).sum() / params.sum()), abs=1e-5)


def test_dense_level_after_a_sparse_one_reports_no_drops(tmp_path):
    """--sparsity 0.4,0: the dense row is computed after the sparse one, whose thresholds are still set; it must
    count nothing dropped (gate and up were once counted against them) and equal a dense run alone."""
    from test_generate import tiny_thresholds, write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    tiny_thresholds(ckpt, ckpt.parent / "thresholds.json")
    (tmp_path / "some.txt").write_text("the cat sat on the mat and the dog sat on the log " * 4)
    base = ["--checkpoint", str(ckpt), "--text", str(tmp_path / "some.txt"), "--device", "cpu", "--seq_len", "16"]
    with redirect_stdout(io.StringIO()):
        both = eval_ppl.main([*base, "--sparsity", "0.4,0"])
        alone = eval_ppl.main([*base, "--sparsity", "0"])
    assert both[0]["achieved_sparsity"] > 0.05
    assert both[1]["achieved_sparsity"] == 0 and set(both[1]["achieved_per_projection"].values()) == {0}
    assert both[1]["ppl"] == alone[0]["ppl"]


def test_weighted_method_alone_needs_only_the_weighted_file(tmp_path):
    from test_generate import tiny_thresholds, write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    tiny_thresholds(ckpt, ckpt.parent / "thresholds_weighted.json", score="weighted")  # no thresholds.json
    (tmp_path / "some.txt").write_text("the cat sat on the mat and the dog sat on the log " * 4)
    with redirect_stdout(io.StringIO()):
        res = eval_ppl.main(["--checkpoint", str(ckpt), "--sparsity", "0,0.4", "--method", "weighted", "--text",
                             str(tmp_path / "some.txt"), "--device", "cpu", "--seq_len", "16"])
    assert [r["method"] for r in res] == ["weighted", "weighted"] and res[1]["achieved_sparsity"] > 0.05


def test_uniform_is_teal_and_sparse_aware_its_own_method(tmp_path):
    """A file with a sparse_aware table: uniform still reads the dense activations' quantiles (as from a file
    without the table), sparse_aware reads the corrected table; sparse_aware without that table, or above its
    last level, is refused before any work."""
    import thresholds
    from test_generate import tiny_thresholds, write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    plain = tiny_thresholds(ckpt, tmp_path / "plain.json")
    config = load_model(ckpt, "cpu", torch.float32).config
    cal = thresholds.load(plain, config)
    with_sa = tmp_path / "sa.json"
    sa_table = cal["table"][..., 1:2] * 3  # a corrected level 0.5 that drops far more than the plain one
    thresholds.save(with_sa, config, cal["levels"].tolist(), cal["table"], "test", 1, "magnitude",
                    sparse_aware={"levels": [0.5], "table": sa_table})
    (tmp_path / "some.txt").write_text("the cat sat on the mat and the dog sat on the log " * 4)
    base = ["--checkpoint", str(ckpt), "--text", str(tmp_path / "some.txt"), "--device", "cpu", "--seq_len", "16",
            "--sparsity", "0.5"]
    with redirect_stdout(io.StringIO()):
        ref = eval_ppl.main([*base, "--thresholds", str(plain)])
        both = eval_ppl.main([*base, "--thresholds", str(with_sa), "--method", "uniform,sparse_aware"])
    assert both[0]["ppl"] == ref[0]["ppl"] and both[0]["achieved_sparsity"] == ref[0]["achieved_sparsity"]
    assert both[1]["method"] == "sparse_aware" and both[1]["achieved_sparsity"] > both[0]["achieved_sparsity"] + 0.05
    weighted = tiny_thresholds(ckpt, tmp_path / "w.json", score="weighted")  # no sparse_aware table either
    out = io.StringIO()
    with pytest.raises(ValueError, match="w.json has no sparse_aware table"), redirect_stdout(out):
        eval_ppl.main([*base, "--weighted_thresholds", str(weighted), "--method", "sparse_aware+weighted"])
    for path, sparsity, want in ((plain, "0.5", "no sparse_aware table"), (with_sa, "0.6", "above the sparse_aware")):
        out = io.StringIO()
        with pytest.raises(ValueError, match=want), redirect_stdout(out):
            eval_ppl.main([*base[:-1], sparsity, "--thresholds", str(path), "--method", "sparse_aware"])
        assert out.getvalue() == ""


def test_uniform_after_cats_is_teal(tmp_path):
    """--method cats,uniform: CATS replaces the MLP's forward for its rows; the uniform rows after them are those of
    uniform alone (TEAL on all seven projections), not CATS's MLP left in place."""
    import thresholds
    from test_generate import tiny_thresholds, write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    config = load_model(ckpt, "cpu", torch.float32).config
    cal = thresholds.load(tiny_thresholds(ckpt, tmp_path / "plain.json"), config)
    thresholds.save(ckpt.parent / "thresholds.json", config, cal["levels"].tolist(), cal["table"], "test", 1,
                    "magnitude", cats=cal["table"][:, 4] * 2)
    (tmp_path / "some.txt").write_text("the cat sat on the mat and the dog sat on the log " * 4)
    base = ["--checkpoint", str(ckpt), "--text", str(tmp_path / "some.txt"), "--device", "cpu", "--seq_len", "16",
            "--sparsity", "0.5"]
    with redirect_stdout(io.StringIO()):
        alone = eval_ppl.main([*base, "--method", "uniform"])
        both = eval_ppl.main([*base, "--method", "cats,uniform"])
    assert [r["method"] for r in both] == ["cats", "uniform"]
    assert both[1]["ppl"] == alone[0]["ppl"] and both[1]["achieved_sparsity"] == alone[0]["achieved_sparsity"]
    assert both[0]["ppl"] != alone[0]["ppl"]


def plain_perplexity(m, ids: list, seq_len: int) -> float:
    """Model forward + cross-entropy over each seq_len window on its own (as the model is set: dense or sparse)."""
    nll, n = 0.0, 0
    m.setup_caches(1, seq_len)
    with torch.no_grad():
        for i in range(0, len(ids) - 1, seq_len):
            w = torch.tensor([ids[i:i + seq_len]])
            logits = m(w, torch.arange(w.shape[1]))
            nll += F.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum").item()
            n += w.shape[1] - 1
    return math.exp(nll / n)


@pytest.mark.parametrize("corpus", ["pydoc-heldout", "stdlib-docstrings"])
def test_corpus_and_max_tokens(tmp_path, corpus):
    """--corpus picks the text, --max_tokens its first N tokens; the JSON names them, with every token but each
    window's first predicted, and holds the rows returned."""
    from test_generate import write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")  # context 32
    out = tmp_path / "r.json"
    with redirect_stdout(io.StringIO()):
        res = eval_ppl.main(["--checkpoint", str(ckpt), "--sparsity", "0", "--corpus", corpus, "--max_tokens", "100",
                             "--device", "cpu", "--json", str(out)])
    text = textdata.heldout_text() if corpus == "pydoc-heldout" else textdata.docstring_text()
    ids = get_tokenizer(ckpt.parent).encode(text)[:100]
    want = plain_perplexity(load_model(ckpt, "cpu", torch.float32), ids, 32)
    assert res[0]["ppl"] == pytest.approx(want, rel=1e-4)
    data = json.loads(out.read_text())
    assert (data["text"], data["tokens"], data["predicted"], data["seq_len"]) == (corpus, 100, 100 - 4, 32)
    assert data["results"] == res


def greedy_file(ckpt, path):
    """Thresholds |x| = 0.2 * level up to 0.5 (tiny_thresholds' table), and a greedy allocation whose block
    sparsity 0.4 puts attention at 0.2 and the MLP at 0.5 (parameter-weighted: (12288 * 0.2 + 24576 * 0.5) / 36864)."""
    import thresholds
    from test_generate import tiny_thresholds
    config = load_model(ckpt, "cpu", torch.float32).config
    cal = thresholds.load(tiny_thresholds(ckpt, path), config)
    alloc = {p: [0.0, 0.2 if p in ("q", "k", "v", "o") else 0.5] for p in PROJECTIONS}
    thresholds.save(path, config, cal["levels"].tolist(), cal["table"], "test", 1, "magnitude",
                    greedy={"levels": [0.0, 0.4], "layers": [alloc] * config.n_layer})
    return path


def test_greedy_reads_the_greedy_allocation(tmp_path):
    """--method greedy at 0.4: each projection at its allocated level (thresholds 0.04 for attention, 0.1 for the
    MLP, read off the table by hand), against the model run with those thresholds; uniform 0.4 (0.08 everywhere)
    differs."""
    from test_generate import write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    greedy_file(ckpt, ckpt.parent / "thresholds.json")
    (tmp_path / "some.txt").write_text("the cat sat on the mat and the dog sat on the log " * 4)
    with redirect_stdout(io.StringIO()):
        res = eval_ppl.main(["--checkpoint", str(ckpt), "--sparsity", "0.4", "--method", "greedy,uniform", "--text",
                             str(tmp_path / "some.txt"), "--device", "cpu", "--seq_len", "16"])
    m = load_model(ckpt, "cpu", torch.float32)
    ids = get_tokenizer(ckpt.parent).encode((tmp_path / "some.txt").read_text())
    m.set_sparse(decode=True, prefill=True)
    for row, attention, mlp in ((res[0], 0.04, 0.1), (res[1], 0.08, 0.08)):
        thr = torch.tensor([attention] * 4 + [mlp] * 3).expand(m.config.n_layer, 7).contiguous()
        m.set_thresholds(thr)
        assert row["ppl"] == pytest.approx(plain_perplexity(m, ids, 16), rel=1e-4), row["method"]
    per = res[0]["achieved_per_projection"]
    assert per["q"] < per["gate"] and res[0]["ppl"] != res[1]["ppl"]


def test_cats_counts_up_and_down(tmp_path):
    """CATS drops rows of up and down where |silu(gate)| is at or below the layer's threshold (counted here by a
    hook on w1); q, k, v, o and gate stay dense."""
    import thresholds
    from test_generate import tiny_thresholds, write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    m = load_model(ckpt, "cpu", torch.float32)
    cal = thresholds.load(tiny_thresholds(ckpt, tmp_path / "t.json"), m.config)
    cal["cats"] = torch.tensor([[0.0, 0.02, 0.2], [0.0, 0.05, 0.3]], dtype=torch.float64)
    ids = torch.randint(0, m.config.vocab_size, (40,)).tolist()
    eval_ppl.configure(m, "cats", 0.5, {"magnitude": cal})
    counts = torch.zeros(m.config.n_layer, 2)

    def hook(mod, inp, out, l):
        counts[l] += torch.tensor([(F.silu(out).abs() <= cal["cats"][l, 1]).sum().item(), out.numel()])
    for l, b in enumerate(m.layers):
        b.feed_forward.w1.register_forward_hook(functools.partial(hook, l=l))
    _, stats, _ = eval_ppl.perplexity(m, ids, 16)
    got = stats[..., 0] / stats[..., 1].clamp_min(1)
    want = counts[:, 0] / counts[:, 1]
    assert (want > 0.05).all() and (got[:, :5] == 0).all()
    torch.testing.assert_close(got[:, 5].float(), want)
    torch.testing.assert_close(got[:, 6].float(), want)


def test_plot_draws_perplexity_against_achieved_sparsity(tmp_path, monkeypatch):
    """--plot: one line per method through (achieved sparsity, perplexity) of its rows, as the JSON holds them."""
    import matplotlib.figure
    from test_generate import write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    greedy_file(ckpt, ckpt.parent / "thresholds.json")
    (tmp_path / "some.txt").write_text("the cat sat on the mat and the dog sat on the log " * 4)
    lines = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: lines.extend(
        (line.get_label(), list(zip(line.get_xdata(), line.get_ydata()))) for line in fig.axes[0].get_lines())
        or real(fig, *a, **k))
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    code, err = run_main(["--checkpoint", ckpt, "--sparsity", "0,0.2,0.4", "--method", "uniform,greedy", "--text",
                          tmp_path / "some.txt", "--device", "cpu", "--seq_len", "16", "--json", out, "--plot", png])
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(out.read_text())["results"]
    assert lines == [(m, [(r["achieved_sparsity"], r["ppl"]) for r in rows if r["method"] == m])
                     for m in ("uniform", "greedy")]
