"""calibrate.py: one calibration of the real SmolLM2 (4096 tokens), checked for a valid file and for achieving the
requested sparsity on held-out text; errors, --plot and determinism on a tiny checkpoint."""
import json
from pathlib import Path

import pytest
import torch

import calibrate
import textdata
import thresholds
from conftest import needs_gguf, run_script
from checkpoint import load_model
from model import PROJECTIONS
from test_generate import write_tiny_checkpoint
from tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
HELDOUT_TOKENS, WINDOW = 2048, 512
TOLERANCE = 0.015  # 1.5 points

_CACHE = {}


def real_calibration(smollm2_dir, tmp_path_factory) -> dict:
    """The one calibration of the real SmolLM2 (also used by test_eval_ppl.py): its folder, JSON and plot."""
    if "cal" not in _CACHE:
        d = tmp_path_factory.mktemp("smollm2_calibrated")
        for f in Path(smollm2_dir).iterdir():
            if f.is_file() and not f.name.startswith("thresholds"):
                (d / f.name).symlink_to(f)
        out, png = d / "thresholds.json", d / "scores.png"
        calibrate.main(["--checkpoint", str(d / "model.pth"), "--tokens", "4096", "--seq_len", "512",
                        "--dtype", "fp32", "--device", "cpu", "--out", str(out), "--plot", str(png),
                        "--sparse_aware", "--sparse_aware_levels", "0.25,0.4,0.5", "--sparse_aware_tokens", "2048"])
        _CACHE["cal"] = {"dir": d, "ckpt": d / "model.pth", "json": out, "png": png}
    return _CACHE["cal"]


@pytest.fixture(scope="module")
def calibrated(smollm2_dir, tmp_path_factory):
    return real_calibration(smollm2_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def smollm2(calibrated):
    m = load_model(calibrated["ckpt"], "cpu", torch.float32)
    return m, get_tokenizer(calibrated["dir"]), thresholds.load(calibrated["json"], m.config)


@needs_gguf
def test_file_valid(calibrated, smollm2):
    m, _, cal = smollm2
    levels, table = cal["levels"], cal["table"]
    assert levels[0] == 0 and levels.tolist() == [round(x, 6) for x in calibrate.LEVELS]
    assert table.shape == (m.config.n_layer, len(PROJECTIONS), len(levels))
    assert (table[..., 0] == 0).all()
    assert (table[..., 1:] >= table[..., :-1]).all()
    assert (table[..., -1] > 0).all()
    data = json.loads(calibrated["json"].read_text())
    assert data["calibration"]["tokens"] == 4096 and data["calibration"]["score"] == "magnitude"
    # q, k and v share their input: identical magnitude thresholds
    assert torch.equal(table[:, 0], table[:, 1]) and torch.equal(table[:, 0], table[:, 2])
    assert cal["cats"] is not None and (cal["cats"][:, 1:] >= cal["cats"][:, :-1]).all()


@needs_gguf
def test_plot_written(calibrated):
    png = calibrated["png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def heldout_sparsity(m, ids, thr) -> torch.Tensor:
    """(n_layer, 7) fraction of inputs dropped on ids in WINDOW windows, by the model's own counters."""
    m.set_thresholds(thr)
    m.set_sparse(decode=True, prefill=True)
    m.setup_caches(1, WINDOW)
    m.start_stats()
    with torch.no_grad():
        for i in range(0, len(ids) - WINDOW + 1, WINDOW):
            m(torch.tensor([ids[i:i + WINDOW]]), torch.arange(WINDOW))
    stats = m.pop_stats()
    m.set_sparse(decode=False, prefill=False)
    m.set_thresholds(torch.zeros_like(thr))
    return stats[..., 0] / stats[..., 1]


LEVELS = (0.25, 0.4, 0.5)
# On the dense model's activations (what the quantile table promises) every projection is within 0.4 points.
# Under sparse prefill each layer sees the activations of the sparse layers before it, and with the dense table
# alone the attention output (o) and down inputs drift upward (here o 27.1% / 43.0% at 25% / 40%, down 41.5% at
# 40%). calibrate.py --sparse_aware corrects that on the sparse model itself; test_achieved_sparsity_heldout
# checks the corrected thresholds on the sparse model's own counters.
# (name, per-projection levels in PROJECTIONS order, tolerance): TEAL's uniform levels, and an unequal allocation
# like calibrate.py --greedy produces (issue #5: each projection reaches its own level within 2 points).
ALLOCATIONS = [(f"uniform {s}", [s] * 7, TOLERANCE) for s in LEVELS] + [
    ("per-projection", [0.3, 0.55, 0.65, 0.45, 0.4, 0.6, 0.5], 0.02)]


@needs_gguf
def test_achieved_sparsity_heldout_dense_activations(smollm2):
    """What calibration promises: on the dense model's activations of unseen text, each threshold drops its level."""
    m, tok, cal = smollm2
    ids = tok.encode(textdata.heldout_text())[:HELDOUT_TOKENS]
    targets = [torch.tensor(a, dtype=torch.float64).expand(m.config.n_layer, 7) for _, a, _ in ALLOCATIONS]
    thr = [thresholds.interp(cal["levels"], cal["table"], t.contiguous()).float() for t in targets]
    counts = torch.zeros(len(ALLOCATIONS), m.config.n_layer, len(PROJECTIONS), 2, dtype=torch.float64)
    handles = []
    for l, b in enumerate(m.layers):
        for lin, projs in ((b.attention.wqkv, (0, 1, 2)), (b.attention.wo, (3,)), (b.feed_forward.w1, (4, 5)),
                           (b.feed_forward.w2, (6,))):
            def hook(mod, inp, l=l, projs=projs):
                x = inp[0].abs().double()
                for i in range(len(ALLOCATIONS)):
                    for p in projs:
                        counts[i, l, p] += torch.tensor([(x <= thr[i][l, p]).sum().item(), x.numel()])
            handles.append(lin.register_forward_pre_hook(hook))
    m.set_sparse(decode=False, prefill=False)
    m.setup_caches(1, WINDOW)
    try:
        with torch.no_grad():
            for i in range(0, len(ids) - WINDOW + 1, WINDOW):
                m(torch.tensor([ids[i:i + WINDOW]]), torch.arange(WINDOW))
    finally:
        for h in handles:
            h.remove()
    for (name, alloc, tol), c in zip(ALLOCATIONS, counts):
        per_proj = (c[..., 0] / c[..., 1]).mean(0)
        print(name, " ".join(f"{p}={v:.4f}" for p, v in zip(PROJECTIONS, per_proj.tolist())))
        assert ((per_proj - torch.tensor(alloc, dtype=torch.float64)).abs() <= tol).all(), (name, per_proj)


@needs_gguf
def test_achieved_sparsity_heldout(smollm2):
    """The sparse model's own counters (sparse prefill, as scripts/eval_ppl.py measures), sparse-aware thresholds."""
    m, tok, cal = smollm2
    assert cal["sparse_aware"] is not None
    ids = tok.encode(textdata.heldout_text())[:HELDOUT_TOKENS]
    assert len(ids) == HELDOUT_TOKENS
    report = []
    for s in LEVELS:
        per_layer = heldout_sparsity(m, ids, thresholds.thresholds_for(cal, s))
        per_proj = per_layer.mean(0)
        report.append(f"{s}: " + " ".join(f"{p}={v:.4f}" for p, v in zip(PROJECTIONS, per_proj.tolist()))
                      + f" (layers {per_layer.min():.3f}..{per_layer.max():.3f})")
        print(report[-1])
        assert ((per_proj - s).abs() <= TOLERANCE).all(), "\n".join(report)


# ---- tiny checkpoint: errors, determinism ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_cal")
    ckpt = write_tiny_checkpoint(d / "ckpt", max_pos=64)
    text = d / "text.txt"
    text.write_text(textdata.calibration_text()[:3000])
    return ckpt, text


def run_main(argv) -> tuple:
    return run_script("calibrate.py", argv)


@pytest.mark.parametrize("score, uneven", [("magnitude", False), ("weighted", False), ("weighted", True)])
def test_record_against_quantiles_of_the_inputs(score, uneven):
    """calibrate.record against quantiles of each projection's dense input scores, taken here with hooks of
    test_generate (the recorder samples with replacement, hence the tolerance; a wrong input or norm is far off).
    uneven: the tiny model's column norms are all near 1; scaled to 0.25..4.25 apart, as a real model's are, a
    weighted score that left out a projection's norms would be far off too."""
    from test_generate import TINY, dense_inputs, modules, segments, tiny_model
    m = tiny_model(seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for l in range(m.config.n_layer * uneven):
            for lin in modules(m, l).values():
                lin.weight.mul_(torch.rand(lin.weight.shape[1], generator=g) * 4 + 0.25)
    ids = torch.randint(0, TINY["vocab_size"], (128,), generator=torch.Generator().manual_seed(2)).tolist()
    table, n_tokens, _ = calibrate.record(m, ids, 32, score, 200_000, "cpu", progress=False)
    assert n_tokens == 128 and (table[..., 0] == 0).all()
    if score == "magnitude":  # inputs shared by q, k, v and by gate, up: one sample, one threshold
        assert torch.equal(table[:, 0], table[:, 1]) and torch.equal(table[:, 0], table[:, 2])
        assert torch.equal(table[:, 4], table[:, 5])
    xs = dense_inputs(m, torch.tensor(ids).view(4, 32))  # four windows as rows: the same activations
    levels = torch.tensor(calibrate.LEVELS, dtype=torch.float64)
    mid = (levels >= 0.05) & (levels <= 0.95)
    for l in range(m.config.n_layer):
        for name, segs in segments(m, l).items():
            x = xs[(l, name)].reshape(-1, xs[(l, name)].shape[-1]).double()
            W = modules(m, l)[name].weight.double()
            for p, rows in segs:
                s = x.abs() * (W[rows].norm(dim=0) if score == "weighted" else 1)
                # each threshold drops its level's fraction of the true scores
                frac = (s.flatten()[:, None] <= table[l, p, mid][None]).double().mean(0)
                err = (frac - levels[mid]).abs().max().item()
                assert err < 0.03, (l, PROJECTIONS[p], err)


def test_record_takes_every_score_where_the_sample_would_hold_more():
    """With more samples per call than a call has scores, the table is the exact quantiles of all the scores (each
    taken once), the same for any seed."""
    from test_generate import TINY, dense_inputs, tiny_model
    m = tiny_model(seed=3)
    ids = torch.randint(0, TINY["vocab_size"], (64,), generator=torch.Generator().manual_seed(2)).tolist()
    table, _, _ = calibrate.record(m, ids, 32, "magnitude", 10_000_000, "cpu", progress=False)
    again, _, _ = calibrate.record(m, ids, 32, "magnitude", 10_000_000, "cpu", progress=False, seed=5)
    assert torch.equal(table, again)
    x = dense_inputs(m, torch.tensor(ids).view(2, 32))[(1, "w2")]  # layer 1's down input
    want = torch.quantile(x.abs().flatten().double(), torch.tensor(calibrate.LEVELS).double())
    # (the two runs batch the windows differently: float rounding, not sampling, which would be ~1e-2 off)
    torch.testing.assert_close(table[1, PROJECTIONS.index("down"), 1:], want[1:], rtol=1e-5, atol=1e-6)


def test_sparse_aware_thresholds_never_fall():
    """Anchors closer than the correction's noise: each anchor corrected on its own (one call per anchor) crosses
    its neighbours somewhere; together, each threshold is the running maximum of those, so none falls."""
    from test_generate import TINY, tiny_model
    m = tiny_model(seed=3)
    ids = torch.randint(0, TINY["vocab_size"], (128,), generator=torch.Generator().manual_seed(5)).tolist()
    table, _, _ = calibrate.record(m, ids, 32, "magnitude", 200_000, "cpu", progress=False)
    anchors = [0.3, 0.301, 0.302, 0.303]
    alone = torch.cat([calibrate.sparse_aware(m, ids, 32, table, [a], "magnitude", "cpu", progress=False)
                       for a in anchors], dim=-1)
    assert (alone[..., 1:] < alone[..., :-1]).any()  # the case this test is about
    want = alone.clone()
    for i in range(1, len(anchors)):
        want[..., i] = torch.maximum(want[..., i], want[..., i - 1])
    together = calibrate.sparse_aware(m, ids, 32, table, anchors, "magnitude", "cpu", progress=False)
    assert torch.equal(together, want)


def test_deterministic(tiny, tmp_path):
    ckpt, text = tiny
    outs = []
    for i, seed in enumerate((0, 0, 1)):
        out = tmp_path / f"t{i}.json"
        code, _, err = run_main(["--checkpoint", ckpt, "--text", text, "--tokens", "256", "--seq_len", "64",
                                 "--samples", "2000", "--dtype", "fp32", "--device", "cpu", "--seed", seed,
                                 "--out", out])
        assert code == 0, err
        assert "warning: 256 calibration tokens" in err, err
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]  # the seed does drive the sampling
    cal = thresholds.load(tmp_path / "t0.json", load_model(ckpt, "cpu", torch.float32).config)
    assert cal["levels"][0] == 0 and (cal["table"][..., 1:] >= cal["table"][..., :-1]).all()
    assert json.loads(outs[0])["calibration"]["source"] == str(text)


def test_a_pass_with_fewer_tokens_than_asked_says_so(tiny, tmp_path):
    """--greedy_tokens past the calibration's tokens (here --tokens 256) is not cut without a word."""
    ckpt, text = tiny
    code, _, err = run_main(["--checkpoint", ckpt, "--text", text, "--tokens", "256", "--seq_len", "64", "--greedy",
                             "--greedy_tokens", "512", "--dtype", "fp32", "--device", "cpu", "--out",
                             tmp_path / "t.json"])
    assert code == 0, err
    assert "note: --greedy_tokens 512: the calibration has 256 tokens, all of which the pass uses" in err, err
    # calibrated again without --greedy: the greedy section it drops is named before the work
    code, _, err = run_main(["--checkpoint", ckpt, "--text", text, "--tokens", "256", "--seq_len", "64", "--dtype",
                             "fp32", "--device", "cpu", "--out", tmp_path / "t.json"])
    assert code == 0 and "holds a greedy section (--greedy) that this run does not compute" in err, err
    assert "greedy" not in json.loads((tmp_path / "t.json").read_text())
    # a default budget past the text is not a note: the user asked for nothing
    assert "note: --tokens" not in err, err


def test_seq_len_follows_the_model_context(tiny, tmp_path):
    """Without --seq_len, windows of 512 tokens cut to the tiny model's context of 64: --tokens 200 calibrates on
    three of them. A --seq_len past the context is refused, naming the flag and the context."""
    ckpt, text = tiny
    base = ["--checkpoint", ckpt, "--text", text, "--tokens", "200", "--samples", "2000", "--dtype", "fp32",
            "--device", "cpu"]
    code, _, err = run_main([*base, "--out", tmp_path / "t.json"])
    assert code == 0, err
    assert json.loads((tmp_path / "t.json").read_text())["calibration"]["tokens"] == 3 * 64
    code, _, err = run_main([*base, "--seq_len", "65", "--out", tmp_path / "u.json"])
    assert code == 1 and err.strip().splitlines() == [err.strip()], err
    assert "--seq_len 65" in err and "context of 64" in err, err
    assert not (tmp_path / "u.json").exists()
    code, out, _ = run_main(["--help"])
    assert code == 0 and "tokens per forward pass (default: 512, or the model's context where shorter)" in \
        " ".join(out.split())


def test_flags_and_text_checked_before_the_weights_load(tiny, tmp_path, monkeypatch):
    """--seq_len against the context, --tokens against --seq_len and the text's length come from config.json and
    the tokenizer alone: refused before the weights load."""
    import checkpoint

    def no_load(*a, **k):
        raise AssertionError("the weights loaded before the flags were checked")
    monkeypatch.setattr(checkpoint, "load_model", no_load)
    ckpt, text = tiny
    (tmp_path / "short.txt").write_text("a few words")
    for extra, want in ((["--seq_len", "65"], "--seq_len 65"), (["--tokens", "32", "--seq_len", "64"], "--tokens"),
                        (["--text", tmp_path / "short.txt"], "fewer than --seq_len")):
        code, _, err = run_main(["--checkpoint", ckpt, "--text", text, "--device", "cpu", "--out", tmp_path / "t.json",
                                 *extra])
        assert code == 1 and want in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("case", ["missing_text", "tokens_0", "text_too_short", "nan", "overflow",
                                  "sparse_aware_tokens", "greedy_tokens", "plot_in_missing_folder", "plot_format",
                                  "out_is_a_folder", "device", "dataset_file_without_dataset",
                                  "greedy_tokens_without_greedy", "abbreviated_flag_without_its_pass"])
def test_errors(tiny, tmp_path, case):
    ckpt, text = tiny
    args, exit_code = ["--tokens", "256", "--seq_len", "64"], 1
    if case in ("sparse_aware_tokens", "greedy_tokens"):  # fewer than one window: refused on load, before the work
        flag = case.split("_tokens")[0]
        args += ["--text", text, f"--{flag}", f"--{case}", "10"]
    elif case == "plot_in_missing_folder":
        args, exit_code = args + ["--text", text, "--plot", tmp_path / "no" / "p.png"], 2
    elif case == "plot_format":  # refused before calibrating, not after
        args, exit_code = args + ["--text", text, "--plot", tmp_path / "p.txt"], 2
    elif case == "out_is_a_folder":
        args, exit_code = args + ["--text", text, "--out", tmp_path], 2
    elif case == "device":
        args, exit_code = args + ["--text", text, "--device", "bogus"], 2
    elif case == "dataset_file_without_dataset":  # would calibrate on the default text instead, without a word
        args, exit_code = args + ["--dataset_file", "x.parquet"], 2
    elif case == "greedy_tokens_without_greedy":
        args, exit_code = args + ["--text", text, "--greedy_tokens=512"], 2
    elif case == "abbreviated_flag_without_its_pass":  # argparse takes --sparse_aware_t for --sparse_aware_tokens
        args, exit_code = args + ["--text", text, "--sparse_aware_t", "512"], 2
    elif case == "missing_text":
        args += ["--text", tmp_path / "nope.txt"]
    elif case == "tokens_0":
        args, exit_code = ["--tokens", "0", "--seq_len", "64", "--text", text], 2
    elif case == "text_too_short":
        (tmp_path / "short.txt").write_text("hi there")
        args += ["--text", tmp_path / "short.txt"]
    elif case in ("nan", "overflow"):  # refused at load; activations that overflow, in the calibration pass
        ckpt = write_tiny_checkpoint(tmp_path / case, max_pos=64, **{case: True})
        args += ["--text", text]
    code, _, err = run_main(["--checkpoint", ckpt, "--dtype", "fp32", "--device", "cpu",
                             "--out", tmp_path / "t.json", *args])
    assert code == exit_code, err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1 and "Traceback" not in err, err
    if exit_code == 1:
        assert err.splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "t.json").exists()


def test_token_defaults_follow_a_long_seq_len():
    """A --seq_len past a pass's default budget raises that default to one window; a budget given below it is
    refused, naming the flag the user gave."""
    from model import ModelArgs
    config = ModelArgs(vocab_size=32, dim=64, n_layer=1, n_head=4, n_local_heads=2, head_dim=16,
                       intermediate_size=128, block_size=65536)
    args = calibrate.parse_args(["--checkpoint", "m.pth", "--greedy", "--sparse_aware", "--seq_len", "32768"])
    calibrate.set_seq_len(args, config)
    assert (args.tokens, args.greedy_tokens, args.sparse_aware_tokens) == (32768, 32768, 32768)
    args = calibrate.parse_args(["--checkpoint", "m.pth", "--greedy", "--seq_len", "4096"])
    calibrate.set_seq_len(args, config)
    assert (args.tokens, args.greedy_tokens) == (calibrate.TOKENS_DEFAULT, 4096)
    for flag in ("--tokens", "--greedy_tokens"):
        args = calibrate.parse_args(["--checkpoint", "m.pth", "--greedy", "--seq_len", "4096", flag, "2048"])
        with pytest.raises(ValueError, match=f"{flag} must be at least --seq_len"):
            calibrate.set_seq_len(args, config)
    # a budget of exactly one window is enough
    args = calibrate.parse_args(["--checkpoint", "m.pth", "--greedy", "--sparse_aware", "--seq_len", "4096", "--tokens",
                                 "4096", "--greedy_tokens", "4096", "--sparse_aware_tokens", "4096"])
    calibrate.set_seq_len(args, config)
    assert (args.tokens, args.greedy_tokens, args.sparse_aware_tokens) == (4096, 4096, 4096)


def test_plot_of_weighted_scores_has_a_panel_per_projection(tiny, tmp_path, monkeypatch):
    """Magnitudes: one panel per distinct linear input (q/k/v and gate/up score the same |x|); weighted scores
    differ per projection: seven panels, each named."""
    import matplotlib.figure
    ckpt, text = tiny
    titles = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: titles.append(
        [ax.get_title() for ax in fig.axes]) or real(fig, *a, **k))
    for score in ("magnitude", "weighted"):
        code, _, err = run_main(["--checkpoint", ckpt, "--text", text, "--tokens", "256", "--seq_len", "64",
                                 "--samples", "2000", "--dtype", "fp32", "--device", "cpu", "--score", score,
                                 "--out", tmp_path / f"{score}.json", "--plot", tmp_path / f"{score}.png"])
        assert code == 0 and (tmp_path / f"{score}.png").stat().st_size > 0, err
    assert titles[0] == ["attention input (q/k/v)", "attention output (o)", "MLP input (gate/up)", "down input"]
    assert titles[1] == [f"{p} input" for p in PROJECTIONS]


def test_dataset_file_type_refused_at_parse_time(tmp_path):
    code, _, err = run_main(["--checkpoint", tmp_path / "m.pth", "--dataset", "org/data", "--dataset_file", "a.csv"])
    assert code == 2 and "--dataset_file: unsupported dataset file type '.csv'" in err and len(err.splitlines()) == 1
    # the default file is wikitext's: another dataset must name its own
    code, _, err = run_main(["--checkpoint", tmp_path / "m.pth", "--dataset", "org/data"])
    assert code == 2 and "--dataset org/data needs --dataset_file" in err and len(err.splitlines()) == 1, err
    args = calibrate.parse_args(["--checkpoint", "m.pth", "--dataset", "Salesforce/wikitext"])
    assert args.dataset_file == "wikitext-2-raw-v1/train-00000-of-00001.parquet"
    for name in ("wikitext", "salesforce/WikiText"):  # the hub's short name, any case: the same default file
        assert calibrate.parse_args(["--checkpoint", "m.pth", "--dataset", name]).dataset_file == args.dataset_file


def test_checkpoint_path_is_gpt_fasts_name_for_checkpoint():
    assert calibrate.parse_args(["--checkpoint_path", "m.pth"]).checkpoint == Path("m.pth")


def test_out_onto_the_other_scores_file_is_refused(tiny, tmp_path):
    """--out may name the checkpoint's thresholds file of the run's own score, not the other score's; --plot not
    the --out file."""
    ckpt, text = tiny
    code, _, err = run_main(["--checkpoint", ckpt, "--text", text, "--device", "cpu", "--out",
                             Path(ckpt).parent / "thresholds_weighted.json"])
    assert code == 1 and "would overwrite the checkpoint's own thresholds_weighted.json" in err, err
    code, _, err = run_main(["--checkpoint", ckpt, "--text", text, "--device", "cpu", "--out", tmp_path / "t.png",
                             "--plot", tmp_path / "t.png"])
    assert code == 1 and "--plot and --out name the same file" in err and not (tmp_path / "t.png").exists(), err


@pytest.mark.parametrize("flag", ["greedy", "sparse_aware"])
def test_a_pass_runs_on_the_first_of_the_tokens(tiny, tmp_path, monkeypatch, flag):
    """--greedy_tokens / --sparse_aware_tokens N: the pass sees the first N calibration tokens, not all of --tokens."""
    import greedy
    ckpt, text = tiny
    module, name = (greedy, "search") if flag == "greedy" else (calibrate, "sparse_aware")
    real, seen = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda model, ids, *a, **k: seen.append(list(ids)) or real(model, ids, *a, **k))
    extra = ["--sparse_aware_levels", "0.5"] if flag == "sparse_aware" else []
    calibrate.main(["--checkpoint", str(ckpt), "--text", str(text), "--tokens", "256", "--seq_len", "64",
                    "--samples", "2000", "--dtype", "fp32", "--device", "cpu", "--out", str(tmp_path / "t.json"),
                    f"--{flag}", f"--{flag}_tokens", "128", *extra])
    assert seen == [get_tokenizer(Path(ckpt).parent).encode(text.read_text())[:128]]


def test_a_default_budget_past_the_text_is_no_note(tiny, tmp_path):
    """No --tokens: a text shorter than the default budget is calibrated on whole, without a note about a flag the
    user did not give."""
    ckpt, text = tiny
    code, _, err = run_main(["--checkpoint", ckpt, "--text", text, "--seq_len", "64", "--samples", "2000",
                             "--dtype", "fp32", "--device", "cpu", "--out", tmp_path / "t.json"])
    assert code == 0, err
    n = len(get_tokenizer(Path(ckpt).parent).encode(text.read_text()))
    assert n < calibrate.TOKENS_DEFAULT and "note:" not in err, err
    assert json.loads((tmp_path / "t.json").read_text())["calibration"]["tokens"] == n // 64 * 64


def test_dataset_text_column(tiny, tmp_path, monkeypatch):
    """--dataset ... --text_column: the text is that column of the downloaded file (the download stood in for here:
    no network)."""
    import huggingface_hub
    ckpt, text = tiny
    rows = [p for p in text.read_text().split("\n\n") if p.strip()]

    def download(repo_id, filename, repo_type=None):
        f = tmp_path / Path(filename).name
        f.write_text("\n".join(json.dumps({"content": r, "id": i}) for i, r in enumerate(rows)))
        return str(f)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    out = tmp_path / "t.json"
    calibrate.main(["--checkpoint", str(ckpt), "--dataset", "org/data", "--dataset_file", "train.jsonl",
                    "--text_column", "content", "--tokens", "256", "--seq_len", "64", "--samples", "2000",
                    "--dtype", "fp32", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["calibration"] == {"source": "hf-dataset:org/data/train.jsonl", "tokens": 256,
                                                          "score": "magnitude"}


@pytest.mark.parametrize("levels", ["0,0.5", "0.5,0.25"])
def test_sparse_aware_levels_must_increase_above_0(tmp_path, levels):
    """0 is the dense model, not a level to correct; levels out of order would be refused only by the file's
    reader, after the calibration: both refused as the flags are parsed."""
    code, _, err = run_main(["--checkpoint", tmp_path / "m.pth", "--sparse_aware", "--sparse_aware_levels", levels])
    assert code == 2 and "--sparse_aware_levels must increase within (0, 1)" in err and len(err.splitlines()) == 1, err


def test_replaced_sections_names_only_those_not_computed_again(tmp_path):
    from types import SimpleNamespace
    out = tmp_path / "t.json"
    out.write_text(json.dumps({"greedy": {"levels": [0.0]}, "sparse_aware": {"levels": [0.5]}, "cats": [[0.0]]}))
    names = {"greedy": "a greedy section (--greedy)", "sparse_aware": "a sparse_aware section (--sparse_aware)"}
    for greedy in (False, True):
        for sparse_aware in (False, True):
            got = calibrate.replaced_sections(out, SimpleNamespace(greedy=greedy, sparse_aware=sparse_aware))
            assert got == [names[n] for n, on in (("greedy", greedy), ("sparse_aware", sparse_aware)) if not on]
    out.write_text(json.dumps({"greedy": None}))
    assert calibrate.replaced_sections(out, SimpleNamespace(greedy=False, sparse_aware=False)) == []


def test_record_takes_every_score_where_the_rounded_up_share_holds_them():
    """--samples spread over the windows, rounded up: 4095 over 2 windows is 2048 per call, every one of a window's
    32 x 64 attention inputs (q/k/v and o): their quantiles are exact, whatever the seed; the down input (32 x 128)
    is sampled."""
    from test_generate import TINY, dense_inputs, tiny_model
    m = tiny_model(seed=3)
    ids = torch.randint(0, TINY["vocab_size"], (64,)).tolist()
    table, _, rec = calibrate.record(m, ids, 32, "magnitude", 4095, "cpu", progress=False)
    again, _, _ = calibrate.record(m, ids, 32, "magnitude", 4095, "cpu", progress=False, seed=5)
    assert all(sum(len(s) for s in rec.samples[0][p]) == 4096 for p in range(len(PROJECTIONS)))
    xs = dense_inputs(m, torch.tensor(ids).view(2, 32))
    levels = torch.tensor(calibrate.LEVELS, dtype=torch.float64)
    for p, name in ((0, "wqkv"), (3, "wo")):
        assert torch.equal(table[:, p], again[:, p])
        for l in range(m.config.n_layer):
            want = torch.quantile(xs[(l, name)].abs().flatten().double(), levels)
            torch.testing.assert_close(table[l, p, 1:], want[1:], rtol=1e-5, atol=1e-6)
    assert not torch.equal(table[:, 6], again[:, 6])


def test_cats_table_is_the_quantiles_of_silu_gate(tiny, tmp_path):
    """The file's cats section: per layer the quantiles of |silu(x W1^T)| (CATS thresholds the gate's activation,
    not its input or the raw gate), level 0 keeping everything; here every score is taken (--samples past them)."""
    from test_generate import dense_inputs
    ckpt, text = tiny
    out = tmp_path / "t.json"
    code, _, err = run_main(["--checkpoint", ckpt, "--text", text, "--tokens", "256", "--seq_len", "64", "--samples",
                             "10000000", "--dtype", "fp32", "--device", "cpu", "--out", out])
    assert code == 0, err
    m = load_model(ckpt, "cpu", torch.float32)
    cats = thresholds.load(out, m.config)["cats"]
    assert cats is not None and cats.shape == (m.config.n_layer, len(calibrate.LEVELS)) and (cats[:, 0] == 0).all()
    ids = get_tokenizer(Path(ckpt).parent).encode(text.read_text())[:256]
    xs = dense_inputs(m, torch.tensor(ids).view(4, 64))
    levels = torch.tensor(calibrate.LEVELS, dtype=torch.float64)
    for l, b in enumerate(m.layers):
        x = xs[(l, "w1")].double()
        a = torch.nn.functional.silu(x @ b.feed_forward.w1.weight.double().T).abs()
        want = torch.quantile(a.flatten(), levels)
        torch.testing.assert_close(cats[l, 1:], want[1:], rtol=1e-4, atol=1e-6)


def test_sparse_aware_hits_its_levels_on_the_sparse_model():
    """The corrected thresholds drop each anchor's fraction of every projection's input on the sparse model's own
    activations (its counters, on the calibration ids), where the dense quantiles drift above it."""
    from test_generate import TINY, tiny_model
    m = tiny_model(seed=3)
    ids = torch.randint(0, TINY["vocab_size"], (128,)).tolist()
    table, _, _ = calibrate.record(m, ids, 32, "magnitude", 200_000, "cpu", progress=False)
    anchors = [0.5, 0.7]
    corrected = calibrate.sparse_aware(m, ids, 32, table, anchors, "magnitude", "cpu", progress=False)
    levels = torch.tensor(calibrate.LEVELS, dtype=torch.float64)

    def dropped(thr):
        m.set_thresholds(thr.float())
        m.set_sparse(decode=True, prefill=True)
        m.setup_caches(1, 32)
        m.start_stats()
        with torch.no_grad():
            for i in range(0, len(ids), 32):
                m(torch.tensor([ids[i:i + 32]]), torch.arange(32))
        stats = m.pop_stats()
        m.set_sparse(decode=False, prefill=False)
        return stats[..., 0] / stats[..., 1]
    dense_miss = (dropped(thresholds.interp(levels, table, torch.full((2, 7), 0.7, dtype=torch.float64))) - 0.7)
    assert dense_miss.abs().max() > 0.03  # the drift that the correction is for
    for i, s in enumerate(anchors):
        miss = (dropped(corrected[..., i]) - s).abs().max().item()
        assert miss < 0.012, (s, miss)


def test_plot_panels_hold_their_projection_of_the_first_middle_and_last_layers(tmp_path, monkeypatch):
    """Each panel's histograms are the sampled scores of its projection (magnitudes: q/k/v, o, gate/up, down), one
    per layer 0, n // 2 and n - 1. The samples here are tagged: 100 * layer + projection + a fraction."""
    import matplotlib
    matplotlib.use("Agg")
    from types import SimpleNamespace
    import matplotlib.axes
    n = 5
    rec = SimpleNamespace(samples=[[[100 * l + p + torch.rand(50)] for p in range(len(PROJECTIONS))]
                                   for l in range(n)])
    drawn = []
    real = matplotlib.axes.Axes.hist
    monkeypatch.setattr(matplotlib.axes.Axes, "hist", lambda ax, v, *a, **k: drawn.append(
        (ax, {int(x) for x in v.tolist()}, k.get("label"))) or real(ax, v, *a, **k))
    for score, projs in (("magnitude", (0, 3, 4, 6)), ("weighted", range(len(PROJECTIONS)))):
        drawn.clear()
        calibrate.plot(rec, tmp_path / f"{score}.png", "t", score)
        assert (tmp_path / f"{score}.png").stat().st_size > 0
        axes = list(dict.fromkeys(ax for ax, _, _ in drawn))
        assert [[(tags, label) for ax, tags, label in drawn if ax is a] for a in axes] == \
            [[({100 * l + p}, f"layer {l}") for l in (0, 2, 4)] for p in projs], score


def test_calibration_tokens_of_a_dataset_and_of_one_window(tmp_path, monkeypatch):
    """--dataset: the first --tokens tokens of the file's text, read up to 8 characters per token (here a word-level
    tokenizer, 4 characters a token: reading only --tokens characters would give a quarter of them); a text of
    exactly --seq_len tokens is one window, one token fewer is refused."""
    import huggingface_hub
    from types import SimpleNamespace

    class Tok:
        vocab = {}

        def encode(self, t):
            return [self.vocab.setdefault(w, len(self.vocab)) for w in t.split()]
    rows = [" ".join(f"w{(7 * r + i) % 97:02d}" for i in range(5)) for r in range(200)]

    def download(repo_id, filename, repo_type=None):
        f = tmp_path / Path(filename).name
        f.write_text("\n".join(json.dumps({"text": r}) for r in rows))
        return str(f)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    args = SimpleNamespace(text=None, dataset="org/data", dataset_file="train.jsonl", text_column="text", tokens=300,
                           seq_len=64)
    ids, source = calibrate.calibration_tokens(args, Tok())
    assert ids == Tok().encode(" ".join(rows))[:300] and source == "hf-dataset:org/data/train.jsonl"
    for n, ok in ((64, True), (63, False)):
        (tmp_path / "t.txt").write_text(" ".join(rows)[:4 * n - 1])  # n words of 3 characters and a space
        args = SimpleNamespace(text=tmp_path / "t.txt", dataset=None, tokens=1000, seq_len=64)
        if ok:
            assert len(calibrate.calibration_tokens(args, Tok())[0]) == 64
        else:
            with pytest.raises(ValueError, match="calibration text has 63 tokens, fewer than --seq_len 64"):
                calibrate.calibration_tokens(args, Tok())


def test_default_out_checked_before_the_weights_load(tmp_path, monkeypatch):
    """No --out: the default file beside the checkpoint is checked as a given --out is, before the weights load
    (not after the calibration's work)."""
    import checkpoint

    def no_load(*a, **k):
        raise AssertionError("the weights loaded before the default output was checked")
    monkeypatch.setattr(checkpoint, "load_model", no_load)
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", max_pos=64)
    (ckpt.parent / "thresholds.json").mkdir()
    (tmp_path / "text.txt").write_text(textdata.calibration_text()[:3000])
    code, _, err = run_main(["--checkpoint", ckpt, "--text", tmp_path / "text.txt", "--device", "cpu"])
    assert code == 1 and "thresholds.json is a folder" in err and len(err.strip().splitlines()) == 1, err
