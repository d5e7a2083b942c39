"""generate.py: sparse decode against an independent masked-activation reference, greedy generate() against a
naive loop, achieved_sparsity(), the command line on the real SmolLM2 and every bad input as one `error:` line."""
import builtins
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import generate
import model
import sparse_ops
import sparse_ops.gemv as gemv
import textdata
from conftest import needs_gguf, run_script
from model import PROJECTIONS
from test_model import randomize_, write_tokenizer_json
from tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
PROMPT, TOTAL = 5, 14  # decode feeds positions PROMPT..TOTAL-1


# ---- a tiny random model ------------------------------------------------------------------------------------
TINY = dict(vocab_size=258, dim=64, n_layer=2, n_head=4, n_local_heads=2, head_dim=16, intermediate_size=128,
            block_size=64)


def tiny_model(qkv_bias=True, seed=0, **config) -> model.Transformer:
    torch.manual_seed(seed)
    m = model.Transformer(model.ModelArgs(**{**TINY, **config}, qkv_bias=qkv_bias)).float().eval()
    randomize_(m, seed)
    model.to_column_major(m)
    return m


def segments(m: model.Transformer, l: int) -> dict:
    """module name -> list of (projection index, output rows) sharing that module's input. Written from the config."""
    c = m.config
    q, kv = c.n_head * c.head_dim, c.n_local_heads * c.head_dim
    return {"wqkv": [(0, slice(0, q)), (1, slice(q, q + kv)), (2, slice(q + kv, q + 2 * kv))],
            "wo": [(3, slice(None))], "w1": [(4, slice(None))], "w3": [(5, slice(None))], "w2": [(6, slice(None))]}


def modules(m: model.Transformer, l: int) -> dict:
    b = m.layers[l]
    return {"wqkv": b.attention.wqkv, "wo": b.attention.wo, "w1": b.feed_forward.w1, "w3": b.feed_forward.w3,
            "w2": b.feed_forward.w2}


class MaskedReference:
    """Forward hooks on the dense model's nn.Linear modules that replace each output by W (x * keep_s) + b per output
    segment s, keep_s = score(x) > t_s; score = |x| or |x_i| * ||W[s rows, i]||. Rows at positions < `from_pos`
    (the dense prefill) stay unmasked. Also counts per projection on the masked rows: dropped / total inputs, then
    channels that no batch row keeps / channels; at batch 1 gate's and up's channels that neither keeps, as
    decode's gate|up kernel reads both weights' rows for one list (where the MLP norm can list: a width that is a
    multiple of LIST_GROUP)."""

    def __init__(self, m: model.Transformer, thr: torch.Tensor, weighted: bool, from_pos: int):
        self.counts = torch.zeros(len(PROJECTIONS), 4, dtype=torch.float64)
        self.handles = []
        for l in range(m.config.n_layer):
            for name, lin in modules(m, l).items():
                self.handles.append(lin.register_forward_hook(self.hook(lin, segments(m, l)[name], thr[l], weighted,
                                                                        from_pos)))

    def hook(self, lin, segs, thr, weighted, from_pos):
        def fn(module, inputs, out):
            x = inputs[0]
            W = lin.weight
            ys = []
            for p, rows in segs:
                score = x.abs()
                if weighted:
                    score = score * W[rows].pow(2).sum(0).sqrt()
                keep = score > thr[p]
                keep[:, :from_pos] = True
                xm = torch.where(keep, x, torch.zeros_like(x))
                y = xm @ W[rows].T
                if lin.bias is not None:
                    y = y + lin.bias[rows]
                ys.append(y)
                k = keep[:, from_pos:]
                u = k.any(0)  # per position: kept by some batch row
                glu = p in (4, 5) and x.shape[0] == 1 and x.shape[-1] % sparse_ops.LIST_GROUP == 0
                if glu and p == 4:  # w1's hook runs first, on the same input: its rows are counted with up's
                    self.gate_kept = u
                elif glu:
                    u = u | self.gate_kept
                self.counts[p, :2] += torch.tensor([k.numel() - k.sum().item(), k.numel()], dtype=torch.float64)
                skipped = torch.tensor([u.numel() - u.sum().item(), u.numel()], dtype=torch.float64)
                for q in ((4, 5) if glu and p == 5 else () if glu else (p,)):
                    self.counts[q, 2:] += skipped
            return torch.cat(ys, dim=-1)
        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


def dense_inputs(m: model.Transformer, idx: torch.Tensor) -> dict:
    """(layer, module name) -> the dense model's input to that module over idx."""
    seen, handles = {}, []
    for l in range(m.config.n_layer):
        for name, lin in modules(m, l).items():
            handles.append(lin.register_forward_pre_hook(
                lambda mod, inp, key=(l, name): seen.__setitem__(key, inp[0].detach().clone())))
    m.set_sparse(decode=False, prefill=False)
    m.setup_caches(idx.shape[0], idx.shape[1])
    with torch.no_grad():
        m(idx, torch.arange(idx.shape[1], device=idx.device))
    for h in handles:
        h.remove()
    return seen


def random_thresholds(m: model.Transformer, idx: torch.Tensor, weighted: bool, seed: int) -> torch.Tensor:
    """(n_layer, 7): each projection's threshold at a random quantile in [0.2, 0.7] of its dense input scores."""
    g = torch.Generator().manual_seed(seed)
    xs = dense_inputs(m, idx)
    thr = torch.zeros(m.config.n_layer, len(PROJECTIONS))
    for l in range(m.config.n_layer):
        for name, segs in segments(m, l).items():
            x = xs[(l, name)].reshape(-1, xs[(l, name)].shape[-1])
            W = modules(m, l)[name].weight
            for p, rows in segs:
                score = x.abs() * (W[rows].norm(dim=0) if weighted else 1)
                thr[l, p] = torch.quantile(score.flatten(), 0.2 + 0.5 * torch.rand((), generator=g).item())
    return thr


def reference_logits(m, idx, thr, weighted, from_pos):
    """Full forward over idx (no step-by-step cache use), masked at positions >= from_pos."""
    m.set_sparse(decode=False, prefill=False)
    m.set_scores(False)
    ref = MaskedReference(m, thr, weighted, from_pos)
    try:
        m.setup_caches(idx.shape[0], idx.shape[1])
        with torch.no_grad():
            return m(idx, torch.arange(idx.shape[1], device=idx.device)), ref.counts
    finally:
        ref.remove()


def achieved_as_reference(m, idx, thr, weighted) -> torch.Tensor:
    """generate.achieved_sparsity over idx (a dense prompt of PROMPT tokens, then decode steps) against the masked
    reference's counts of the same masks; returns it."""
    _, counts = reference_logits(m, idx[:, :-1], thr, weighted, PROMPT)
    m.set_thresholds(thr)
    m.set_scores(weighted)
    m.set_sparse(decode=True, prefill=False)
    ach = generate.achieved_sparsity(m, PROMPT, idx)
    assert torch.allclose(ach[0].double(), counts[:, 0] / counts[:, 1], atol=1e-6)
    assert torch.allclose(ach[1].double(), counts[:, 2] / counts[:, 3], atol=1e-6)
    return ach


def sparse_decode_logits(m, idx, thr, weighted):
    """Dense prefill of the first PROMPT tokens, then one token at a time through the KV cache, sparse."""
    m.set_thresholds(thr)
    m.set_scores(weighted)
    m.set_sparse(decode=True, prefill=False)
    B, L = idx.shape
    m.setup_caches(B, L)
    out = []
    with torch.no_grad():
        out.append(m(idx[:, :PROMPT], torch.arange(PROMPT, device=idx.device))[:, -1:])
        for t in range(PROMPT, L - 1):
            out.append(m(idx[:, t:t + 1], torch.tensor([t], device=idx.device)))
    m.set_sparse(decode=False, prefill=False)
    m.set_scores(False)
    return torch.cat(out, dim=1)


def max_rel_err(a, b):
    """Largest deviation against the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("batch", [1, 3])
def test_sparse_decode_matches_masked_reference(batch, backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if backend == "triton" else "0")
    calls = []  # Triton launches: the backend really is the one asked for
    launch = gemv._launch
    monkeypatch.setattr(gemv, "_launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    # Triton's kernels run on CUDA tensors where there is a GPU (the interpreter cannot be chosen after import)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    m = tiny_model().to(dev)
    idx = torch.randint(0, TINY["vocab_size"], (batch, TOTAL), generator=torch.Generator().manual_seed(batch)).to(dev)
    thr = random_thresholds(m, idx, weighted=False, seed=batch)
    want, counts = reference_logits(m, idx, thr, False, PROMPT)
    dense, _ = reference_logits(m, idx, torch.zeros_like(thr), False, TOTAL)
    got = sparse_decode_logits(m, idx, thr, False)
    assert got.shape == (batch, TOTAL - PROMPT, TINY["vocab_size"])
    want = want[:, PROMPT - 1:TOTAL - 1]
    assert max_rel_err(got, want) <= TOL
    # the masks matter: the sparse logits are far from the dense ones, and a real share of inputs was dropped
    assert max_rel_err(dense[:, PROMPT - 1:TOTAL - 1], want) > 100 * TOL
    frac = counts[:, 0] / counts[:, 1]
    assert ((frac > 0.1) & (frac < 0.8)).all(), frac
    assert (len(calls) > 0) == (backend == "triton")


def test_sparse_decode_weighted_scores():
    m = tiny_model(seed=1)
    idx = torch.randint(0, TINY["vocab_size"], (2, TOTAL), generator=torch.Generator().manual_seed(7))
    thr = random_thresholds(m, idx, weighted=True, seed=7)
    want, counts = reference_logits(m, idx, thr, True, PROMPT)
    got = sparse_decode_logits(m, idx, thr, True)
    assert max_rel_err(got, want[:, PROMPT - 1:TOTAL - 1]) <= TOL
    frac = counts[:, 0] / counts[:, 1]
    assert ((frac > 0.1) & (frac < 0.8)).all(), frac
    # the scores matter: magnitude-only masks with the same thresholds give other logits
    plain, _ = reference_logits(m, idx, thr, False, PROMPT)
    assert max_rel_err(plain[:, PROMPT - 1:TOTAL - 1], want[:, PROMPT - 1:TOTAL - 1]) > 100 * TOL
    # the drop counts behind the achieved-sparsity report apply the same weighted scores
    achieved_as_reference(m, idx, thr, True)
    m.set_scores(False)
    m.set_sparse(decode=False, prefill=False)


def thresholds_with_margin(m: model.Transformer, idx: torch.Tensor, seed: int, margin: float = 1e-4) -> torch.Tensor:
    """(n_layer, 7) thresholds that no input score of the masked decode positions lies near. Each is set in the
    widest gap between neighbouring scores around a random quantile in [0.2, 0.7] of its input, one input after
    another in forward order (an input depends on the thresholds before it). A real model makes tens of thousands
    of keep decisions per token; a score within rounding of its threshold (random_thresholds can even pick one
    exactly) flips between two ways of computing the same sum, which changes the logits by percents."""
    g = torch.Generator().manual_seed(seed)
    thr = torch.zeros(m.config.n_layer, len(PROJECTIONS))
    for l in range(m.config.n_layer):
        for name in ("wqkv", "wo", "w1", "w2"):  # w3 reads w1's input
            seen = []
            h = modules(m, l)[name].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0][:, PROMPT:]))
            try:
                reference_logits(m, idx, thr, False, PROMPT)
            finally:
                h.remove()
            scores = seen[0].abs().flatten().sort().values.cpu().double()
            segs = segments(m, l)[name] + (segments(m, l)["w3"] if name == "w1" else [])
            for p, _ in segs:
                i = int((0.2 + 0.5 * torch.rand((), generator=g).item()) * (len(scores) - 1))
                near = scores[max(i - 20, 0):i + 21]
                j = (near[1:] - near[:-1]).argmax()
                thr[l, p] = (near[j] + near[j + 1]) / 2
                assert (near[j + 1] - near[j]) / 2 > margin * thr[l, p], (l, name, near[j:j + 2])
    return thr


@needs_gguf
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("batch", [1, 2])
def test_real_smollm2_sparse_decode_matches_masked_reference(smollm2_dir, batch, device, monkeypatch):
    """The real SmolLM2-135M on held-out text, fp32: 30 layers of real activations, outlier channels and all,
    decoded sparse one token at a time give the masked reference's logits; on a GPU through the kernels at its
    shapes (576, 1536, 192 per k/v), on a CPU through the reference ops (the interpreter would take minutes)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = checkpoint.load_model(smollm2_dir / "model.pth", device=device, dtype=torch.float32)
    ids = textdata.encode_head(get_tokenizer(smollm2_dir), textdata.heldout_text(), 2000)
    idx = torch.tensor([ids[100 + 500 * b:100 + 500 * b + TOTAL] for b in range(batch)], device=device)
    thr = thresholds_with_margin(m, idx, seed=batch)
    want, counts = reference_logits(m, idx, thr, False, PROMPT)
    dense, _ = reference_logits(m, idx, torch.zeros_like(thr), False, TOTAL)
    got = sparse_decode_logits(m, idx, thr, False)
    want = want[:, PROMPT - 1:TOTAL - 1]
    assert max_rel_err(got, want) <= TOL
    assert max_rel_err(dense[:, PROMPT - 1:TOTAL - 1], want) > 100 * TOL
    frac = counts[:, 0] / counts[:, 1]
    assert ((frac > 0.1) & (frac < 0.8)).all(), frac


def test_mlp_norm_lists_what_gate_and_up_keep(monkeypatch):
    """Batch-1 decode with the kernels: the norm before the MLP lists exactly the channels that gate's or up's
    threshold (and scale) keeps. The decode test above cannot see a superset: each segment re-applies its own."""
    from sparse_ops.norm import kept_list
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # as above: on a GPU the kernels take CUDA tensors
    m = tiny_model(seed=4).to(dev)
    idx = torch.randint(0, TINY["vocab_size"], (1, TOTAL), generator=torch.Generator().manual_seed(8)).to(dev)
    seen = []
    glu = sparse_ops.sparse_glu

    def spy(x, wt_gate, wt_up, thresholds, scale=None, kept=None):
        seen.append(kept is not None and torch.equal(kept, kept_list(x, thresholds, scale)))
        return glu(x, wt_gate, wt_up, thresholds, scale, kept)

    monkeypatch.setattr(sparse_ops, "sparse_glu", spy)
    for weighted in (False, True):
        thr = random_thresholds(m, idx, weighted=weighted, seed=9)
        thr[:, 5] = thr[:, 4] * 3  # gate and up far apart: a list from one of them, or from down's, differs
        sparse_decode_logits(m, idx, thr, weighted)
    assert seen and all(seen), seen
    m.set_scores(False)
    m.set_sparse(decode=False, prefill=False)


@pytest.mark.parametrize("weighted", [False, True])
def test_rows_skipped_at_batch_1_count_what_the_glu_kernel_reads(weighted, monkeypatch):
    """At batch 1 decode's gate|up kernel reads both weights' rows for each channel that gate or up keeps: the
    rows-skipped figure (and the bytes-read bandwidth from it) counts the channels neither keeps, while the inputs
    dropped stay each projection's own."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = tiny_model(seed=5)
    idx = torch.randint(0, TINY["vocab_size"], (1, TOTAL), generator=torch.Generator().manual_seed(6))
    thr = random_thresholds(m, idx, weighted=weighted, seed=6)
    # Magnitude scores rank gate's and up's channels alike (one input): up, at a higher threshold, keeps a subset of
    # gate's. Weighted scores rank them by each weight's column norms too: at one threshold neither set holds the other.
    thr[:, 5] = thr[:, 4] * (1 if weighted else 3)
    ach = achieved_as_reference(m, idx, thr, weighted)
    assert ach[1, 4] == ach[1, 5]
    if weighted:  # fewer rows skipped than either one's inputs dropped
        assert ach[1, 4] < ach[0, 4] and ach[1, 4] < ach[0, 5], ach
    else:
        assert ach[1, 4] == ach[0, 4] < ach[0, 5], ach
    assert torch.allclose(ach[1, :4], ach[0, :4]) and torch.allclose(ach[1, 6], ach[0, 6])  # one row: the same
    m.set_scores(False)
    m.set_sparse(decode=False, prefill=False)


def test_hidden_size_the_mlp_norm_cannot_list(monkeypatch):
    """A hidden size that is not a multiple of LIST_GROUP: the MLP norm makes no list, so gate and up go through
    the pair kernel, each reading its own kept rows; decode still matches the masked reference, and each one's
    rows skipped is its own, not their union's."""
    m = tiny_model(seed=5, dim=72)
    assert m.config.dim % sparse_ops.LIST_GROUP
    idx = torch.randint(0, TINY["vocab_size"], (1, TOTAL), generator=torch.Generator().manual_seed(6))
    thr = random_thresholds(m, idx, weighted=False, seed=6)
    thr[:, 5] = thr[:, 4] * 3  # up keeps a subset of gate's channels
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ach = achieved_as_reference(m, idx, thr, False)
    assert torch.allclose(ach[1], ach[0]) and ach[1, 4] < ach[1, 5], ach
    want = reference_logits(m, idx, thr, False, PROMPT)[0][:, PROMPT - 1:TOTAL - 1]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # as test_sparse_decode_matches_masked_reference
    got = sparse_decode_logits(m.to(dev), idx.to(dev), thr.to(dev), False)
    assert max_rel_err(got.cpu(), want) <= TOL


def naive_greedy(m, prompt, n, thr=None):
    """Recompute the full forward each step (no KV cache reuse), masked at generated positions when thr is given."""
    seq = prompt.clone()
    for _ in range(n):
        if thr is None:
            m.set_sparse(decode=False, prefill=False)
            m.setup_caches(seq.shape[0], seq.shape[1])
            with torch.no_grad():
                logits = m(seq, torch.arange(seq.shape[1]))
        else:
            logits, _ = reference_logits(m, seq, thr, False, prompt.shape[1])
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("sparse", [False, True])
def test_generate_greedy_matches_naive_loop(sparse, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels are checked above; this is about generate()
    m = tiny_model(seed=2)
    prompt = torch.randint(0, TINY["vocab_size"], (2, PROMPT), generator=torch.Generator().manual_seed(3))
    n = 10
    thr = None
    if sparse:
        thr = random_thresholds(m, torch.randint(0, TINY["vocab_size"], (2, TOTAL),
                                                 generator=torch.Generator().manual_seed(4)), False, seed=5)
    want = naive_greedy(m, prompt, n, thr)
    m.set_sparse(decode=thr is not None, prefill=False)
    if thr is not None:
        m.set_thresholds(thr)
    m.setup_caches(2, PROMPT + n)
    with torch.no_grad():
        got = generate.generate(m, prompt, n, generate.decode_one_token, temperature=0.0)
    assert torch.equal(got, want)
    if thr is not None:
        # generate.py's report replays the decode steps on the prompt's keys and values that generate() left in
        # the cache; they must be what the full replay's prompt pass writes again (a cache zeroed instead differs)
        cached = generate.achieved_sparsity(m, PROMPT, got, prompt_cached=True)
        ach = achieved_as_reference(m, got, thr, False)  # replays the decode steps that generate ran
        assert torch.equal(cached, ach)
        for b in m.layers:
            b.attention.kv_cache.k_cache.zero_()
        assert not torch.equal(generate.achieved_sparsity(m, PROMPT, got, prompt_cached=True), ach)
        # two rows: a weight row is skipped only where both rows drop its channel
        assert (ach[0] > 0).all() and (ach[1] > 0).all() and (ach[1] < ach[0]).all()
    m.set_sparse(decode=False, prefill=False)


def test_generate_stops_on_stop_id():
    m = tiny_model(seed=2)
    prompt = torch.randint(0, TINY["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(3))
    m.setup_caches(1, PROMPT + 10)
    with torch.no_grad():
        full = generate.generate(m, prompt, 10, generate.decode_one_token, temperature=0.0)
    stop = int(full[0, PROMPT + 3])
    first = (full[0, PROMPT:] == stop).nonzero()[0].item()
    m.setup_caches(1, PROMPT + 10)
    with torch.no_grad():
        cut = generate.generate(m, prompt, 10, generate.decode_one_token, temperature=0.0, stop_ids=(stop,),
                                on_token=lambda s: None)
    assert torch.equal(cut, full[:, :PROMPT + first + 1])


@pytest.mark.parametrize("vocab", [5, 1024, 1500, 49152, 128256])
def test_argmax_matches_torch(vocab):
    torch.manual_seed(vocab)
    x = torch.randn(3, vocab)
    ties = torch.randint(0, 4, (3, vocab)).float()  # many equal maxima: the first one must win
    ties[1, -1] = 9.0  # the maximum in the padded last chunk
    for t in (x, ties, x.to(torch.bfloat16)):
        assert torch.equal(generate.argmax(t), torch.argmax(t, dim=-1, keepdim=True))
    assert torch.equal(generate.argmax(x, chunk=7), torch.argmax(x, dim=-1, keepdim=True))


def test_sample_top_k():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]]).repeat(400, 1)
    tok = generate.sample(logits, temperature=1.0, top_k=2)
    assert set(tok.flatten().tolist()) == {1, 2}
    assert torch.equal(generate.sample(logits[:3], 0.0, None), torch.ones(3, 1, dtype=torch.long))


def test_argmax_of_all_negative_logits():
    # the padding of the last chunk must never win: rows of only negative logits (V not a multiple of the chunk)
    x = -torch.rand(4, 1500, generator=torch.Generator().manual_seed(0)) - 1
    assert torch.equal(generate.argmax(x), torch.argmax(x, dim=-1, keepdim=True))
    assert torch.equal(generate.argmax(x[:, :5], chunk=7), torch.argmax(x[:, :5], dim=-1, keepdim=True))


def test_sample_distribution_follows_temperature():
    # Exponential-race sampling draws softmax(logits / T): frequencies against the closed form, many rows at once
    torch.manual_seed(0)
    n = 20000
    logits = torch.tensor([[0.0, 1.0, 2.0]]).log_softmax(-1).repeat(n, 1)
    for t in (0.5, 1.0, 3.0):
        want = torch.softmax(logits[0] / t, dim=-1)
        got = torch.bincount(generate.sample(logits, t, None).flatten(), minlength=3).double() / n
        assert (got - want).abs().max() < 0.02, (t, got, want)


def test_sample_top_k_larger_than_the_vocab():
    torch.manual_seed(0)
    tok = generate.sample(torch.randn(3, 5), temperature=1.0, top_k=200)
    assert tok.shape == (3, 1) and ((tok >= 0) & (tok < 5)).all()


class ScriptedModel:
    """A stand-in model: the k-th call (0 the prefill) puts all the weight on script[:, k] at the last position."""

    def __init__(self, script, vocab=16):
        self.script, self.vocab, self.calls = torch.tensor(script), vocab, 0

    def __call__(self, idx, input_pos, prefill=None):
        logits = torch.zeros(idx.shape[0], idx.shape[1], self.vocab)
        logits[torch.arange(idx.shape[0]), -1, self.script[:, self.calls]] = 10.0
        self.calls += 1
        return logits


@pytest.mark.parametrize("stream", [False, True])
def test_generate_stops_when_every_row_has_stopped(stream):
    # row 0 stops with the prefill's token, row 1 two steps later: the batch stops then (streaming checks every
    # step, otherwise every 16), and not before
    script = [[0, 3, 3, 3, 3, 3, 3, 3], [6, 6, 0, 9, 9, 9, 9, 9]]
    prompt = torch.tensor([[1, 2], [1, 2]])
    seq = generate.generate(ScriptedModel(script), prompt, 8, generate.decode_one_token, stop_ids=(0,),
                            on_token=(lambda s: None) if stream else None)
    n = 3 if stream else 8
    assert torch.equal(seq, torch.cat([prompt, torch.tensor(script)[:, :n]], dim=1))


# ---- the command line ------------------------------------------------------------------------------------------


def write_tiny_checkpoint(d: Path, max_pos=32, nan=False, n_layer=2, intermediate=128, overflow=False) -> Path:
    """model.pth + config.json + tokenizer.json + tealfast.json, as the converters write them. nan: a NaN weight
    (refused at load); overflow: finite weights whose activations overflow (attention scores past fp32's range)."""
    d.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer_json(d / "tokenizer.json")
    cfg = dict(model_type="llama", vocab_size=vocab, hidden_size=64, num_hidden_layers=n_layer,
               num_attention_heads=4, num_key_value_heads=2, intermediate_size=intermediate, rms_norm_eps=1e-5,
               max_position_embeddings=max_pos, rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=0)
    m = model.Transformer(checkpoint.from_hf_config(cfg))
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    if nan:
        state["layers.0.feed_forward.w2.weight"][3, 5] = float("nan")
    if overflow:
        state["layers.0.attention_norm.weight"].fill_(1e30)
    torch.save(state, d / "model.pth")
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tealfast.json").write_text(json.dumps({"schema_version": 1, "tokenizer": "hf", "source": "test"}))
    return d / "model.pth"


def tiny_thresholds(ckpt: Path, path: Path, n_layer=2, score="magnitude") -> Path:
    import thresholds
    c = checkpoint.from_hf_config(json.loads((ckpt.parent / "config.json").read_text()))
    c.n_layer = n_layer
    levels = [0.0, 0.5, 0.9]
    table = torch.tensor([0.0, 0.1, 0.5], dtype=torch.float64).expand(n_layer, len(PROJECTIONS), 3)
    thresholds.save(path, c, levels, table, "test", 1, score)
    return path


def run_main(argv) -> tuple:
    return run_script("generate.py", argv)


def assert_one_error(code, err, exit_code=1):
    assert code == exit_code, err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    if exit_code == 1:
        assert err.splitlines()[-1].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


BASE = ["--device", "cpu", "--dtype", "fp32", "--temperature", "0", "--max_new_tokens", "4", "--prompt", "the"]
INTERACTIVE = BASE[:-2]  # prompts from standard input: --prompt excluded


def test_tiny_cli_runs(tiny_ckpt, tmp_path):
    """The tiny checkpoint itself works, dense and sparse: the failures below are the bad input's doing."""
    code, out, err = run_main(["--checkpoint", tiny_ckpt, *BASE])
    assert code == 0, err
    assert "tokens/s" in out
    # the prompt, then its continuation, as gpt-fast prints them; streamed token by token or at the end, the same
    assert out.startswith("the"), out
    code, out_at_end, err = run_main(["--checkpoint_path", tiny_ckpt, *BASE, "--no_stream"])  # gpt-fast's name
    assert code == 0 and out_at_end.split("\n\nsample")[0] == out.split("\n\nsample")[0], (out, out_at_end)
    thr = tiny_thresholds(tiny_ckpt, tmp_path / "t.json")
    code, out, err = run_main(["--checkpoint", tiny_ckpt, *BASE, "--sparsity", "0.4", "--thresholds", thr])
    assert code == 0, err
    assert "achieved sparsity" in out and "weight rows skipped" not in out
    # the bytes-read bandwidth only where the kernels ran: on CPU tensors, under Triton's interpreter (CI)
    assert ("on the bytes read" in out) == gemv.use_triton(torch.zeros(1))
    code, out, err = run_main(["--checkpoint", tiny_ckpt, *BASE, "--sparsity", "0.4", "--thresholds", thr,
                               "--batch_size", "2"])
    assert code == 0, err
    assert "weight rows skipped (kept by no batch row)" in out


def test_cli_reports_parameter_weighted_sparsity(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """The achieved-sparsity line weights each projection by its parameters (written out from the config here),
    and the rows skipped by the block linears' bytes, not by all the model's."""
    thr = tiny_thresholds(tiny_ckpt, tmp_path / "t.json")
    s = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    skipped = s / 2
    monkeypatch.setattr(generate, "achieved_sparsity", lambda *a, **k: torch.stack([s, skipped]))
    generate.main(["--checkpoint", str(tiny_ckpt), *BASE, "--sparsity", "0.4", "--thresholds", str(thr),
                   "--batch_size", "2", "--no_stream"])
    out = capsys.readouterr().out
    dim, q, kv, ff = 64, 4 * 16, 2 * 16, 128  # write_tiny_checkpoint's config
    params = torch.tensor([q * dim, kv * dim, kv * dim, dim * q, dim * ff, dim * ff, dim * ff], dtype=torch.float64)
    weighted = float((params * s.double()).sum() / params.sum())
    rows = float((params * skipped.double()).sum() / params.sum())
    assert f"parameter-weighted {weighted:.1%}" in out, out
    assert f"weight rows skipped (kept by no batch row) {rows:.1%}" in out, out


@pytest.mark.parametrize("sparse_prefill", [False, True])
def test_sparse_prefill_masks_the_prompt(sparse_prefill, tiny_ckpt, tmp_path, monkeypatch):
    """--sparse_prefill: the prompt's forward drops every block linear's inputs at or under the thresholds (here a
    plain dense forward with the inputs masked by hooks); without it the prompt runs dense."""
    thr = tiny_thresholds(tiny_ckpt, tmp_path / "t.json")  # at sparsity 0.5: threshold 0.1 for every projection
    seen = []
    real = generate.decode_one_token

    def spy(m, cur, input_pos, *rest, **kw):
        if cur.shape[1] > 1:  # the prefill
            seen.append((cur.clone(), m(cur, input_pos)[:, -1].clone()))  # rewrites the same cache entries
        return real(m, cur, input_pos, *rest, **kw)
    monkeypatch.setattr(generate, "decode_one_token", spy)
    generate.main(["--checkpoint", str(tiny_ckpt), *BASE, "--prompt", "the cat sat on the mat", "--sparsity", "0.5",
                   "--thresholds", str(thr), "--no_stream", *(["--sparse_prefill"] if sparse_prefill else [])])
    (ids, logits), = seen
    ref = checkpoint.load_model(tiny_ckpt, dtype=torch.float32)
    ref.setup_caches(1, ids.shape[1])
    with torch.no_grad():
        dense = ref(ids, torch.arange(ids.shape[1]))[:, -1]
        hooks = [lin.register_forward_pre_hook(lambda mod, inp: inp[0] * (inp[0].abs() > 0.1))
                 for b in ref.layers for lin in (b.attention.wqkv, b.attention.wo, b.feed_forward.w1,
                                                 b.feed_forward.w3, b.feed_forward.w2)]
        masked = ref(ids, torch.arange(ids.shape[1]))[:, -1]
        for h in hooks:
            h.remove()
    assert ids.shape[1] >= 4 and (masked - dense).abs().max() > 1e-2  # the masks matter for this prompt
    torch.testing.assert_close(logits, masked if sparse_prefill else dense, rtol=1e-4, atol=1e-4)


def test_widths_the_kernels_cannot_split(tmp_path, monkeypatch):
    """An MLP width that is not a multiple of 16: sparse decode through the kernels is refused before the load with
    one line naming the width; dense decode and the CPU's reference ops run it."""
    ckpt = write_tiny_checkpoint(tmp_path / "odd", intermediate=120)
    thr = tiny_thresholds(ckpt, tmp_path / "t.json")
    kernels = ["--device", "cuda"] if torch.cuda.is_available() else []  # else the interpreter (conftest)
    line = assert_one_error(*run_main(["--checkpoint", ckpt, *BASE, *kernels, "--sparsity", "0.5", "--thresholds",
                                       thr])[::2])
    assert "intermediate_size 120" in line and "multiples of 16" in line, line
    code, _, err = run_main(["--checkpoint", ckpt, *BASE, *kernels])
    assert code == 0, err
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU's reference ops
    code, _, err = run_main(["--checkpoint", ckpt, *BASE, "--sparsity", "0.5", "--thresholds", thr])
    assert code == 0, err


@pytest.mark.parametrize("sparse_prefill", [False, True])
def test_one_token_prompt_is_a_prefill(sparse_prefill, tiny_ckpt, tmp_path):
    """A prompt of one token runs with the prefill's sparsity (dense unless --sparse_prefill), not the decode's:
    the model is told it is a prefill, since one token per row looks like a decode step."""
    import thresholds
    m = checkpoint.load_model(tiny_ckpt, torch.device("cpu"), torch.float32)
    cal = thresholds.load(tiny_thresholds(tiny_ckpt, tmp_path / "t.json"), m.config)
    thresholds.apply(m, cal, 0.5, False, prefill=sparse_prefill)
    ref = checkpoint.load_model(tiny_ckpt, torch.device("cpu"), torch.float32)
    for x in (m, ref):
        x.setup_caches(1, 4)
    ids, pos = torch.tensor([[7]]), torch.arange(1)
    seen = []
    real = m.forward
    m.forward = lambda *a, **kw: seen.append(real(*a, **kw)[:, -1]) or real(*a, **kw)
    generate.prefill(m, ids, pos, 0.0, None)
    with torch.no_grad():
        dense, decode_step = ref(ids, pos)[:, -1], real(ids, pos)[:, -1]
    assert (decode_step - dense).abs().max() > 1e-3  # the thresholds matter for this token
    torch.testing.assert_close(seen[0], decode_step if sparse_prefill else dense, rtol=1e-5, atol=1e-5)


def test_compile_prefill_compiles_the_prefill_apart(tiny_ckpt, monkeypatch, capsys):
    """--compile_prefill compiles generate.prefill (dynamic shapes) and not decode; the first run compiles, untimed.
    (Whether it compiles is tested on the GPU; a CPU compile takes minutes.)"""
    compiled, calls = [], []

    def fake_compile(fn, **kw):
        compiled.append((fn, kw))

        def run(*a):
            calls.append((fn, a[1].shape[1]))
            return fn(*a)
        return run
    monkeypatch.setattr(torch, "compile", fake_compile)
    generate.main(["--checkpoint", str(tiny_ckpt), *BASE, "--prompt", "the cat sat", "--compile_prefill",
                   "--no_stream"])
    assert compiled == [(generate.prefill, {"fullgraph": True})]
    assert [fn for fn, _ in calls] == [generate.prefill] * 2 and all(t > 1 for _, t in calls)  # warm-up, sample
    captured = capsys.readouterr()
    assert "compiled and warmed up" in captured.err and "sample 1:" in captured.out and "sample 2" not in captured.out


@pytest.mark.parametrize("rows", [1, 2])
def test_compiled_prefill_serves_every_prompt_length(rows, tiny_ckpt):
    """generate() makes the prompt's length a dynamic dim of its own: a first prompt as long as another size (the
    batch, RoPE's cos|sin, the 7 thresholds of sparse prefill) shares no symbol with it, so a later length does not
    recompile, nor a prompt whose first positions are cached (a chat's turn); a one-token prompt runs the eager
    prefill (no second graph for dynamo's size-1 rule). Dynamo's guards alone (no inductor: seconds, not minutes
    on a CPU)."""
    m = checkpoint.load_model(tiny_ckpt, torch.device("cpu"), torch.float32)
    m.set_sparse(decode=True, prefill=True)  # the thresholds buffer enters the prefill's graph
    m.setup_caches(rows, 32)
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(generate.prefill, fullgraph=True,
                             backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    for t, cached in ((2, 0), (7, 0), (1, 0), (9, 4), (5, 0), (11, 3), (12, 11)):
        prompt = torch.arange(rows * t).view(rows, t) % 50 + 3
        want = generate.generate(m, prompt, 1, generate.decode_one_token, cached=cached)
        got = generate.generate(m, prompt, 1, generate.decode_one_token, prefill_fn=compiled, cached=cached)
        assert torch.equal(got, want)
    assert len(graphs) == 1


@pytest.mark.parametrize("sparsity", ["0", "0.4"])
def test_dense_decode_keeps_row_major_weights(sparsity, tiny_ckpt, tmp_path, monkeypatch):
    """The sparse ops read column-major block weights; dense decode keeps them as stored, where inductor's one-row
    GEMVs read them along contiguous rows."""
    loaded = []
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: loaded.append(checkpoint.load_model(*a, **k))
                        or loaded[-1])
    thr = tiny_thresholds(tiny_ckpt, tmp_path / "t.json")
    generate.main(["--checkpoint", str(tiny_ckpt), *BASE, "--sparsity", sparsity, "--thresholds", str(thr),
                   "--no_stream"])
    w = loaded[0].layers[0].feed_forward.w1.weight
    assert w.is_contiguous() == (sparsity == "0") and w.t().is_contiguous() == (sparsity != "0")


def test_decode_compiles_as_gpt_fast_does(tiny_ckpt, monkeypatch):
    """On a GPU: one graph, CUDA graphs, and coordinate-descent tuning (inductor's own fused GEMVs at batch 1, which
    docs/benchmarks.md times against cuBLAS; test_bench_scripts checks on the GPU that no cuBLAS kernel runs then);
    on a CPU one graph. --compile goes through it."""
    devices = []
    monkeypatch.setattr(generate, "compile_decode", lambda device: devices.append(device) or generate.decode_one_token)
    generate.main(["--checkpoint", str(tiny_ckpt), *BASE, "--compile", "--no_stream"])
    assert devices == [torch.device("cpu")]
    monkeypatch.undo()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (fn, kw))
    assert generate.compile_decode(torch.device("cuda", 0)) == (generate.decode_one_token, dict(
        fullgraph=True, options={"triton.cudagraphs": True, "coordinate_descent_tuning": True}))
    assert generate.compile_decode(torch.device("cpu")) == (generate.decode_one_token, dict(fullgraph=True))


def write_byte_fallback_tokenizer(d: Path) -> dict:
    """Overwrite d's tokenizer.json with a Llama-2/Mistral-style one: byte-fallback BPE, ids 0-255 the byte pieces
    <0x00>..<0xFF>, then "a" and "b" (258 ids: write_tiny_checkpoint's vocab). Returns the piece -> id map."""
    from tokenizers import Tokenizer, decoders, models
    vocab = {f"<0x{i:02X}>": i for i in range(256)}
    vocab.update({"a": 256, "b": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.save(str(d / "tokenizer.json"))
    return vocab


def test_streamed_text_is_the_text_at_the_end_with_byte_fallback(tmp_path, monkeypatch, capsys):
    """HF's ByteFallback decoder (Llama-2's and Mistral's tokenizer.json) decodes a run of byte pieces as a whole: a
    character it completed turns into U+FFFDs where a later byte of the run is not UTF-8. The streamed text must
    still be the one --no_stream prints: a run's text is held back until the run ends."""
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    v = write_byte_fallback_tokenizer(ckpt.parent)
    script = [v["b"], v["<0xE4>"], v["<0xB8>"], v["<0xAD>"], v["<0xFF>"], v["a"], v["<0xE4>"], v["<0xB8>"],
              v["<0xAD>"]]  # b 中 then a byte that is not UTF-8 (the run is four U+FFFDs), a 中
    assert get_tokenizer(ckpt.parent).decode(script) == "b\ufffd\ufffd\ufffd\ufffda\u4e2d"

    texts = []
    for flags in ([], ["--no_stream"]):
        calls = iter(script)  # the k-th call (0 the prefill) makes script[k]
        monkeypatch.setattr(generate, "decode_one_token", lambda m, cur, *a, **k: (
            torch.full((cur.shape[0], 1), next(calls)), torch.tensor(True)))
        generate.main(["--checkpoint", str(ckpt), *BASE[:-3], str(len(script)), "--prompt", "a", *flags])
        texts.append(capsys.readouterr().out.split("\n\nsample")[0])
    assert texts[0] == texts[1] == "ab\ufffd\ufffd\ufffd\ufffda\u4e2d", texts


def fake_stdin(monkeypatch, lines):
    """input() reading these lines, then the end of the input."""
    it = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("builtins.input", fake_input)
    return it


def sample_text(out: str, prompt: str) -> str:
    """The text printed for the prompt that starts with `prompt`: it runs up to its statistics."""
    return prompt + out.split(prompt, 1)[1].split("\n\nsample")[0]


@pytest.mark.parametrize("flags", [[], ["--compile"], ["--compile_prefill"]])
def test_interactive_decodes_each_prompt_as_prompt_would(flags, tiny_ckpt, monkeypatch, capsys):
    """--interactive (gpt-fast's): a prompt per input line, each decoded as --prompt would be (its samples from the
    seed); a prompt too long for the context, or not UTF-8, is an error line and the next one is asked for; an
    empty line ends it. Compiled, one warm-up serves every prompt (one cache: the whole context, under
    INTERACTIVE_CACHE); else each prompt gets a cache of its own length."""
    sampled = ["--temperature", "0.8", "--num_samples", "2"]  # after BASE: its greedy decoding made sampling
    left = fake_stdin(monkeypatch, ["the cat", "the " * 40, "caf\udce9", "the dog sat", "", "never read"])
    compiled, caches = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    real_setup = model.Transformer.setup_caches
    monkeypatch.setattr(model.Transformer, "setup_caches",
                        lambda m, b, n, keep=0: caches.append(n) or real_setup(m, b, n, keep))
    with pytest.raises(ValueError, match="^2 prompts were refused"):  # the exit status says it, after the session
        generate.main(["--checkpoint", str(tiny_ckpt), *INTERACTIVE, *sampled, "--interactive", "--no_stream", *flags])
    out, err = capsys.readouterr()
    assert next(left) == "never read"  # the empty line ended the session
    assert out.count("sample 1:") == 2 and out.count("sample 2:") == 2
    assert err.count("compiled and warmed up") == (1 if flags else 0) and len(compiled) == len(flags)
    assert err.count("error: prompt (") == 1 and "exceeds the model's context of 32 tokens" in err, err
    assert "error: the prompt is not valid UTF-8 text" in err
    tok = get_tokenizer(tiny_ckpt.parent)
    assert caches == ([32] if flags else [len(tok.encode(t)) + 4 for t in ("the cat", "the dog sat")]), caches
    for prompt in ("the cat", "the dog sat"):  # the same text as a --prompt run (the first sample of each)
        generate.main(["--checkpoint", str(tiny_ckpt), *BASE, *sampled, "--prompt", prompt, "--no_stream", *flags])
        alone = capsys.readouterr().out
        assert sample_text(out, prompt) == sample_text(alone, prompt), (out, alone)


def spy_generate(monkeypatch) -> tuple:
    """generate.generate recording each call's prompt (row 1), returned sequence and positions cached before the
    prefill: (prompts, seqs, cached), filled as it runs."""
    prompts, seqs, cached = [], [], []
    real_generate = generate.generate

    def spy(m, prompt, *a):
        prompts.append(prompt[0].tolist())
        cached.append(a[-1])
        seqs.append(real_generate(m, prompt, *a))
        return seqs[-1]
    monkeypatch.setattr(generate, "generate", spy)
    return prompts, seqs, cached


def test_chat_wraps_each_prompt_and_prints_the_reply(tmp_path, monkeypatch, capsys):
    """--chat: the prompt goes through the folder's chat template (no BOS of ours added) and only the reply is
    printed; an --interactive line the same."""
    ckpt = write_tiny_checkpoint(tmp_path / "chat")
    (ckpt.parent / "chat_template.jinja").write_text("U:{{ messages[0]['content'] }}\n{% if add_generation_prompt "
                                                     "%}A:{% endif %}")
    tok = get_tokenizer(ckpt.parent)
    prompts, seqs, _ = spy_generate(monkeypatch)
    assert generate.parse_args(["--checkpoint", str(ckpt), "--chat"]).prompt == generate.DEFAULT_CHAT_PROMPT
    generate.main(["--checkpoint", str(ckpt), *BASE[:-1], "the cat", "--chat", "--no_stream"])
    reply = capsys.readouterr().out.split("\n\nsample 1:")[0]
    assert prompts == [tok.encode("U:the cat\nA:")]
    assert reply and reply == tok.decode(seqs[0][0, len(prompts[0]):].tolist())  # eos 0 is not among them
    fake_stdin(monkeypatch, ["the cat"])
    generate.main(["--checkpoint", str(ckpt), *INTERACTIVE, "--interactive", "--chat", "--no_stream"])
    out = capsys.readouterr().out
    assert prompts[1] == prompts[0] and out.split("\n\nsample 1:")[0] == reply, (out, reply)
    # --system: a turn the template sees before the user's (this one writes the first message's content only)
    generate.main(["--checkpoint", str(ckpt), *BASE[:-1], "the cat", "--chat", "--system", "be brief", "--no_stream"])
    assert prompts[2] == tok.encode("U:be brief\nA:")
    with pytest.raises(SystemExit):
        generate.parse_args(["--checkpoint", str(ckpt), "--system", "be brief"])  # no --chat
    assert "--system is a turn of --chat's template" in capsys.readouterr().err


def write_chat_checkpoint(d: Path, max_pos: int) -> Path:
    """A tiny checkpoint whose chat template writes each turn as "<role's initial>:<content>" on a line of its own,
    then "a:" for the reply."""
    ckpt = write_tiny_checkpoint(d, max_pos=max_pos)
    (ckpt.parent / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}")
    return ckpt


def test_interactive_chat_is_one_conversation(tmp_path, monkeypatch, capsys):
    """--interactive --chat: each line is the next user turn after the earlier turns and their replies (what was
    printed); where the whole would not fit the context, the oldest exchanges are left out, with a note."""
    ckpt = write_chat_checkpoint(tmp_path / "chat", max_pos=48)
    tok = get_tokenizer(ckpt.parent)
    prompts, seqs, _ = spy_generate(monkeypatch)
    fake_stdin(monkeypatch, ["the cat", "the dog", "a hat", "x" * 40])  # the last too long even alone
    with pytest.raises(ValueError, match="1 prompt was refused"):
        generate.main(["--checkpoint", str(ckpt), *INTERACTIVE, "--interactive", "--chat", "--system", "hi",
                       "--no_stream"])
    out, err = capsys.readouterr()
    assert "exceeds the model's context of 48 tokens; the conversation goes on without it" in err, err
    replies = [tok.decode(s[0, len(p):].tolist()) for p, s in zip(prompts, seqs)]  # eos 0 is not among them
    assert [r for r in replies if r] == replies and out.count("sample 1:") == 3
    assert prompts[0] == tok.encode("s:hi\nu:the cat\na:")
    assert prompts[1] == tok.encode(f"s:hi\nu:the cat\na:{replies[0]}\nu:the dog\na:")
    third = f"s:hi\nu:the cat\na:{replies[0]}\nu:the dog\na:{replies[1]}\nu:a hat\na:"
    assert len(tok.encode(third)) + 4 > 48  # so the first exchange goes
    assert prompts[2] == tok.encode(f"s:hi\nu:the dog\na:{replies[1]}\nu:a hat\na:")
    assert err.count("(the oldest exchange left out of the conversation: the whole would not fit the model's "
                     "context of 48 tokens)") == 1, err


@pytest.mark.parametrize("flags", [[], ["--compile_prefill"], ["--batch_size", "2", "--sparsity", "0.4",
                                                                  "--sparse_prefill"]])
def test_interactive_chat_prefills_only_what_the_cache_lacks(flags, tmp_path, monkeypatch, capsys):
    """--interactive --chat keeps the last turn in the KV cache (its prompt, and with one row the reply as decoded):
    a turn prefills from the first token where its prompt differs (after the oldest exchange is left out, from
    there), and the replies are those of a session that prefills every turn whole. --compile_prefill: one cache
    serves the session (compiled eagerly here); else each turn's cache takes the cached positions over from the
    last."""
    ckpt = write_chat_checkpoint(tmp_path / "chat", max_pos=48)
    if "--sparsity" in flags:
        flags = [*flags, "--thresholds", str(tiny_thresholds(ckpt, tmp_path / "t.json"))]
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)

    def session(reuse: bool) -> tuple:
        with monkeypatch.context() as mp:
            fake_stdin(mp, ["the cat", "the dog", "a hat"])
            if not reuse:
                mp.setattr(generate, "common_prefix", lambda a, b: 0)
            prompts, seqs, cached = spy_generate(mp)
            generate.main(["--checkpoint", str(ckpt), *INTERACTIVE, "--interactive", "--chat", "--system", "hi",
                           "--no_stream", *flags])
        return prompts, seqs, cached, capsys.readouterr()

    prompts, seqs, cached, (out, err) = session(reuse=True)
    assert "oldest exchange left out" in err  # the third turn's prompt starts differing after the system turn
    # a turn's last call (a compile's warm-up repeats the first): what it leaves in the cache
    turns = [i for i, p in enumerate(prompts) if i + 1 == len(prompts) or prompts[i + 1] != p]
    rows = 2 if "--batch_size" in flags else 1
    left = [prompts[i] if rows > 1 else seqs[i][0, :-1].tolist() for i in turns]
    lcp = [len(os.path.commonprefix([a, prompts[i]])) for a, i in zip(left, turns[1:])]
    assert 0 < lcp[1] < lcp[0] and (lcp[0] == len(prompts[0]) if rows > 1 else lcp[0] > len(prompts[0])), lcp
    assert cached == [0 if p == prompts[0] else lcp[turns.index(i) - 1] for i, p in enumerate(prompts)], (cached, lcp)
    for c, i in zip(lcp, turns[1:]):
        n = len(prompts[i])
        assert f"(prefill included: {n - c} of the prompt's {n} tokens, the rest cached" in out, out
    whole_prompts, whole_seqs, whole_cached, (whole_out, _) = session(reuse=False)
    assert whole_cached == [0] * len(prompts) and whole_prompts == prompts
    for a, b in zip(seqs, whole_seqs):
        assert torch.equal(a, b), (a, b)
    assert achieved_line(out) == achieved_line(whole_out)  # '' where dense


def test_interactive_ends_at_the_end_of_the_input(tiny_ckpt, monkeypatch, capsys):
    fake_stdin(monkeypatch, ["the cat"])
    generate.main(["--checkpoint", str(tiny_ckpt), *INTERACTIVE, "--interactive", "--no_stream"])
    out = capsys.readouterr().out
    assert out.count("sample 1:") == 1 and out.endswith("\n\n")  # the prompt line left, then a line of its own


def test_interactive_exit_status_tells_of_refused_prompts(tiny_ckpt, monkeypatch):
    """A prompt refused in --interactive does not end the session, but the exit status is 1 (with a last error
    line), so that a script piping prompts in sees it."""
    fake_stdin(monkeypatch, ["the " * 40, "the cat"])
    code, out, err = run_main(["--checkpoint", tiny_ckpt, *INTERACTIVE, "--interactive", "--no_stream"])
    assert code == 1 and out.count("sample 1:") == 1, err
    assert err.count("error:") == 2 and err.splitlines()[-1] == "error: 1 prompt was refused (the errors above)", err


def test_interactive_windows_line_ends_and_a_blank_line(tiny_ckpt, monkeypatch, capsys):
    """A prompt line read with its Windows \\r\\n decodes as the same prompt without it; a line of spaces (or a
    lone \\r) ends the session like an empty one."""
    left = fake_stdin(monkeypatch, ["the cat\r", "  \r", "never read"])
    generate.main(["--checkpoint", str(tiny_ckpt), *INTERACTIVE, "--interactive", "--no_stream"])
    out = capsys.readouterr().out
    assert next(left) == "never read" and out.count("sample 1:") == 1
    generate.main(["--checkpoint", str(tiny_ckpt), *INTERACTIVE, "--prompt", "the cat", "--no_stream"])
    alone = capsys.readouterr().out
    assert sample_text(out, "the cat") == sample_text(alone, "the cat") and "\r" not in out


def test_interactive_max_new_tokens_that_leave_no_room(tiny_ckpt, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the weights loaded although no prompt could fit")
    monkeypatch.setattr(checkpoint, "load_model", no_load)
    code, _, err = run_main(["--checkpoint", tiny_ckpt, *INTERACTIVE, "--interactive", "--max_new_tokens", "32"])
    assert code == 1 and "--max_new_tokens 32 leaves no room for a prompt in the model's context of 32" in err, err
    # with --chat the template's own tokens count: here 12, one per character
    chat = tmp_path / "chat"
    shutil.copytree(tiny_ckpt.parent, chat)
    (chat / "chat_template.jinja").write_text("system\nU:{{ messages[0]['content'] }}\nA:")
    code, _, err = run_main(["--checkpoint", chat / "model.pth", *INTERACTIVE, "--interactive", "--chat",
                             "--max_new_tokens", "20"])
    assert code == 1 and "--max_new_tokens 20 leaves no room" in err and "chat template takes 12 tokens" in err, err
    # a template that refuses every prompt: once, at start-up
    (chat / "chat_template.jinja").write_text("{{ raise_exception('no user turns') }}")
    code, _, err = run_main(["--checkpoint", chat / "model.pth", *INTERACTIVE, "--interactive", "--chat"])
    assert code == 1 and "refuses the prompt: no user turns" in err, err


def test_profile_writes_a_trace_of_the_last_sample(tiny_ckpt, tmp_path, capsys):
    trace = tmp_path / "trace.json"
    generate.main(["--checkpoint", str(tiny_ckpt), *BASE, "--num_samples", "2", "--no_stream", "--profile",
                   str(trace)])
    out = capsys.readouterr().out
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::" in e.get("name", "") for e in events)
    assert out.count("profiler trace") == 1 and out.index("profiler trace") > out.index("sample 2:")
    # written through a link into its target, as the other outputs are (torch's writer would replace the link: a
    # device file such as /dev/null, which a command run as root would have turned into a plain file)
    link, target = tmp_path / "link.json", tmp_path / "target.json"
    target.write_text("old")
    link.symlink_to(target)
    generate.main(["--checkpoint", str(tiny_ckpt), *BASE, "--no_stream", "--profile", str(link)])
    assert link.is_symlink() and "traceEvents" in json.loads(target.read_text())


def test_sparsity_0_is_dense_with_every_flag(tiny_ckpt, tmp_path, capsys):
    """--sparsity 0 runs the dense model (cuBLAS linears on a GPU) whatever else is asked; the named file is checked."""
    thr = tiny_thresholds(tiny_ckpt, tmp_path / "t.json")
    generate.main(["--checkpoint", str(tiny_ckpt), *BASE, "--sparsity", "0", "--sparse_prefill", "--thresholds",
                   str(thr), "--no_stream"])
    captured = capsys.readouterr()
    assert "; dense" in captured.err and "achieved sparsity" not in captured.out, captured


@pytest.mark.parametrize("dropped", [0.4, 0.45, 0.9, 0.1])
def test_warns_when_the_achieved_sparsity_is_far_from_the_asked(dropped, tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Thresholds of another model with the same shapes pass the fingerprint; the run says so when the inputs it
    dropped are more than 10 points from --sparsity."""
    thr = tiny_thresholds(tiny_ckpt, tmp_path / "t.json")
    monkeypatch.setattr(generate, "achieved_sparsity", lambda *a, **k: torch.full((2, len(PROJECTIONS)), dropped))
    generate.main(["--checkpoint", str(tiny_ckpt), *BASE, "--sparsity", "0.4", "--thresholds", str(thr), "--no_stream",
                   "--max_new_tokens", "20"])
    err = capsys.readouterr().err
    assert ("warning:" in err and "calibrated on this model" in err and "source: test" in err) == (dropped > 0.5 or
                                                                                                    dropped < 0.3), err


def test_empty_prompt_starts_from_bos(tmp_path, capsys):
    ckpt = write_tiny_checkpoint(tmp_path / "bos")
    cfg = json.loads((ckpt.parent / "config.json").read_text())
    (ckpt.parent / "config.json").write_text(json.dumps({**cfg, "bos_token_id": 1}))
    seqs = []
    real = generate.generate
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate, "generate", lambda model, prompt, *a, **k: seqs.append(prompt) or real(model, prompt, *a, **k))
        generate.main(["--checkpoint", str(ckpt), "--prompt", "", "--max_new_tokens", "2", "--device", "cpu",
                       "--temperature", "0", "--no_stream"])
    assert seqs and seqs[0].tolist() == [[1]] and "tokens/s" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing_checkpoint", "sparsity_1", "sparsity_negative", "past_block_size",
                                  "thresholds_other_model", "thresholds_corrupt", "thresholds_missing", "nan",
                                  "temperature", "top_k", "max_new_tokens_0", "device", "batch_size_9",
                                  "checkpoint_folder", "thresholds_checked_when_dense", "greedy_without_table",
                                  "prompt_not_utf8", "score_not_the_files", "score_file_missing_when_dense",
                                  "interactive_profile", "interactive_prompt", "profile_onto_config",
                                  "interactive_stdin_closed", "overflow"])
def test_bad_input(case, tiny_ckpt, tmp_path, monkeypatch):
    ckpt, extra, exit_code = tiny_ckpt, [], 1
    if case == "missing_checkpoint":
        ckpt = tmp_path / "none" / "model.pth"
    elif case == "sparsity_1":
        extra, exit_code = ["--sparsity", "1.0"], 2
    elif case == "sparsity_negative":
        extra, exit_code = ["--sparsity", "-0.1"], 2
    elif case == "past_block_size":
        extra = ["--max_new_tokens", "40"]  # block size 32
    elif case == "thresholds_other_model":
        extra = ["--sparsity", "0.4", "--thresholds", tiny_thresholds(tiny_ckpt, tmp_path / "t.json", n_layer=3)]
    elif case == "thresholds_corrupt":
        (tmp_path / "t.json").write_text('{"schema_version": 1, "model": {')
        extra = ["--sparsity", "0.4", "--thresholds", tmp_path / "t.json"]
    elif case == "thresholds_missing":  # default path beside the checkpoint, not written
        extra = ["--sparsity", "0.4"]
    elif case in ("nan", "overflow"):
        ckpt = write_tiny_checkpoint(tmp_path / case, **{case: True})
    elif case == "temperature":
        extra, exit_code = ["--temperature", "-1"], 2
    elif case == "top_k":
        extra, exit_code = ["--top_k", "0"], 2
    elif case == "max_new_tokens_0":
        extra, exit_code = ["--max_new_tokens", "0"], 2
    elif case == "device":
        extra, exit_code = ["--device", "mps"], 2
    elif case == "batch_size_9":  # refused before the model loads
        ckpt, extra, exit_code = tmp_path / "none" / "model.pth", ["--batch_size", "9", "--sparsity", "0.4"], 2
    elif case == "checkpoint_folder":
        ckpt = tiny_ckpt.parent
    elif case == "thresholds_checked_when_dense":  # a sweep that starts at 0% fails at once on a bad file
        (tmp_path / "t.json").write_text('{"schema_version": 1, "model": {')
        extra = ["--sparsity", "0", "--thresholds", tmp_path / "t.json"]
    elif case == "greedy_without_table":
        extra = ["--greedy", "--thresholds", tiny_thresholds(tiny_ckpt, tmp_path / "t.json")]
    elif case == "prompt_not_utf8":  # a Latin-1 terminal's byte 0xe9 reaches Python as a lone surrogate
        extra, exit_code = ["--prompt", "caf\udce9"], 2
    elif case == "score_not_the_files":  # a magnitude file named with --score weighted
        extra = ["--sparsity", "0.4", "--score", "weighted", "--thresholds", tiny_thresholds(tiny_ckpt, tmp_path / "t.json")]
    elif case == "interactive_profile":  # which prompt's sample would the trace hold?
        extra, exit_code = ["--interactive", "--profile", tmp_path / "trace.json"], 2
    elif case == "interactive_prompt":  # would be ignored without a word
        extra, exit_code = ["--interactive", "--prompt", "the cat"], 2
    elif case == "profile_onto_config":  # refused before the run, not found broken on the next one
        extra = ["--profile", tiny_ckpt.parent / "config.json"]
    elif case == "score_file_missing_when_dense":  # --score names thresholds_weighted.json: checked at 0% too
        extra = ["--sparsity", "0", "--score", "weighted"]
    elif case == "interactive_stdin_closed":  # `generate.py --interactive <&-`: input() would raise RuntimeError
        monkeypatch.setattr(sys, "stdin", None)
        extra, exit_code = ["--interactive"], 2
    code, out, err = run_main(["--checkpoint", ckpt, *(INTERACTIVE if case.startswith("interactive") else BASE),
                               *extra])
    line = assert_one_error(code, err, exit_code)
    expect = {"missing_checkpoint": "not found", "sparsity_1": "--sparsity", "sparsity_negative": "--sparsity",
              "past_block_size": "exceeds", "thresholds_other_model": "another model",
              "overflow": "NaN or infinite logits",
              "thresholds_corrupt": "corrupt", "thresholds_missing": "calibrate.py",
              "nan": "holds NaN or infinite values",
              "temperature": "--temperature", "top_k": "--top_k", "max_new_tokens_0": "--max_new_tokens",
              "device": "--device", "batch_size_9": "--batch_size", "checkpoint_folder": "is a folder",
              "thresholds_checked_when_dense": "corrupt", "greedy_without_table": "greedy",
              "prompt_not_utf8": "--prompt", "score_not_the_files": "holds magnitude scores, not the --score weighted",
              "score_file_missing_when_dense": "calibrate.py --score weighted", "interactive_profile": "--profile",
              "interactive_prompt": "--prompt and --interactive exclude each other",
              "profile_onto_config": "would overwrite the checkpoint's own config.json",
              "interactive_stdin_closed": "standard input, which is closed"}[case]
    assert expect in line, line


@pytest.mark.parametrize("case", ["thresholds_other_model", "past_block_size", "tokenizer_missing",
                                  "no_chat_template", "batch_past_memory", "batch_past_free_memory"])
def test_inputs_checked_before_the_weights_load(case, tiny_ckpt, tmp_path, monkeypatch):
    """Thresholds file, prompt length and tokenizer are checked against config.json alone: a mistake is reported
    before the weights load (seconds to minutes for a large model)."""
    def no_load(*a, **k):
        raise AssertionError("the weights loaded before the inputs were checked")
    monkeypatch.setattr(checkpoint, "load_model", no_load)
    ckpt, extra = tiny_ckpt, []
    if case == "thresholds_other_model":
        extra = ["--sparsity", "0.4", "--thresholds", tiny_thresholds(tiny_ckpt, tmp_path / "t.json", n_layer=3)]
    elif case == "past_block_size":
        extra = ["--max_new_tokens", "40"]  # block size 32
    elif case == "no_chat_template":
        extra = ["--chat"]
    elif case == "batch_past_memory":  # past any memory: torch's size arithmetic would overflow with a traceback
        extra = ["--batch_size", str(10 ** 22)]
    elif case == "batch_past_free_memory":  # a CPU process would be killed without a word
        monkeypatch.setattr(builtins, "open", fake_meminfo(open, available_kb=1000))
        extra = ["--batch_size", "1000"]  # a few MB of cache, against 1 MB available
    else:
        ckpt = write_tiny_checkpoint(tmp_path / "no_tok")
        (ckpt.parent / "tokenizer.json").unlink()
    line = assert_one_error(*run_main(["--checkpoint", ckpt, *BASE, *extra])[::2])
    assert {"thresholds_other_model": "another model", "past_block_size": "exceeds", "tokenizer_missing": "tokenizer",
            "no_chat_template": "chat_template.jinja: the model has no chat template",
            "batch_past_memory": "GB free on the cpu", "batch_past_free_memory": "--batch_size 1000 with a"}[case] \
        in line, line


def fake_meminfo(real_open, available_kb: int):
    """open() with /proc/meminfo saying that available_kb are available."""
    def fake(path, *a, **k):
        if str(path) == "/proc/meminfo":
            return io.StringIO(f"MemTotal: 99999999 kB\nMemAvailable: {available_kb} kB\n")
        return real_open(path, *a, **k)
    return fake


def test_memory_check_counts_the_cache(tiny_ckpt, monkeypatch):
    """The estimate is the KV cache that setup_caches allocates, the causal mask, and on a GPU the weights."""
    from checkpoint import load_config
    config = load_config(tiny_ckpt)
    m = model.Transformer(config)
    m.setup_caches(3, 20)
    cache = sum(b.numel() * b.element_size() for n, b in m.named_buffers() if "cache" in n) + 20 * 20
    free_memory = generate.free_memory
    monkeypatch.setattr(generate, "free_memory", lambda device: cache)
    generate.check_memory(config, torch.float32, torch.device("cpu"), 3, 20)  # fits exactly
    monkeypatch.setattr(generate, "free_memory", lambda device: cache - 1)
    with pytest.raises(ValueError, match="--batch_size 3 with a 20-token KV cache needs at least"):
        generate.check_memory(config, torch.float32, torch.device("cpu"), 3, 20)
    monkeypatch.setattr(builtins, "open", fake_meminfo(open, available_kb=7))
    assert free_memory(torch.device("cpu")) == 7 * 1024


def test_bad_input_subprocess(tmp_path):
    """The same through a real interpreter: exit status 1, one `error:` line, no traceback."""
    ckpt = write_tiny_checkpoint(tmp_path / "overflow", overflow=True)
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(ckpt), *BASE],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert_one_error(r.returncode, r.stderr)
    assert "NaN" in r.stderr
    assert r.stdout.startswith("the") and r.stdout.endswith("\n")  # streamed text, then a line of its own for the error


def test_interactive_goes_on_after_bytes_not_utf8(tiny_ckpt):
    """A line of another encoding on standard input is an error line and the session goes on, however the locale
    decodes standard input (PYTHONIOENCODING=utf-8:strict stands for one such as en_US.UTF-8)."""
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(tiny_ckpt), *INTERACTIVE,
                        "--interactive"],
                       input=b"caf\xe9\nthe cat\n", capture_output=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    err = r.stderr.decode()
    assert r.returncode == 1 and "error: the prompt is not valid UTF-8 text\nerror: 1 prompt was refused" in err, err
    assert "the cat" in r.stdout.decode() and "Traceback" not in err


def achieved_line(out: str) -> str:
    return next((line for line in out.splitlines() if line.startswith("achieved sparsity (decode): ")), "")


@pytest.mark.gpu
def test_compiled_decode_and_prefill_on_the_gpu(tiny_ckpt, tmp_path, monkeypatch):
    """--compile (CUDA graphs) and --compile_prefill give the eager run's greedy text, dense and sparse (fp32: the
    rounding differences between fused and eager kernels stay too small to tip an argmax); so does --interactive,
    whose prompts share one captured graph over a cache of the whole context."""
    thr = tiny_thresholds(tiny_ckpt, tmp_path / "t.json")
    base = ["--checkpoint", tiny_ckpt, "--device", "cuda", "--dtype", "fp32", "--temperature", "0",
            "--max_new_tokens", "8", "--no_stream", "--thresholds", thr]
    prompt = ["--prompt", "the cat sat on the mat"]
    for sparsity in ("0", "0.4"):
        code, eager, err = run_main([*base, *prompt, "--sparsity", sparsity])
        assert code == 0, err
        code, comp, err = run_main([*base, *prompt, "--sparsity", sparsity, "--compile", "--compile_prefill",
                                    "--profile", tmp_path / "trace.json"])
        assert code == 0, err
        assert comp.split("\n\nsample")[0] == eager.split("\n\nsample")[0], (eager, comp)
        if sparsity != "0":  # the report replays on the prompt's keys and values that the CUDA graphs left in the cache
            assert achieved_line(comp) and achieved_line(comp) == achieved_line(eager), (eager, comp)
        events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
        assert any(e.get("cat") == "kernel" for e in events)  # the GPU's kernels, not only the host's calls
    lines = iter(["the dog", "the cat sat on the mat", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, chat, err = run_main([*base, "--sparsity", "0.4", "--compile", "--interactive"])
    assert code == 0 and err.count("compiled and warmed up") == 1, err
    assert chat.startswith("the dog") and "\n" + eager.split("\n\nsample")[0] + "\n\nsample" in chat, (eager, chat)


@pytest.mark.gpu
def test_compiled_chat_keeps_the_conversation_on_the_gpu(tmp_path, monkeypatch):
    """--interactive --chat --compile --compile_prefill: the turns after the first prefill only what they add to the
    captured graphs' cache, and the replies are the eager session's (sparse, fp32)."""
    ckpt = write_chat_checkpoint(tmp_path / "chat", max_pos=64)
    base = ["--checkpoint", ckpt, "--device", "cuda", "--dtype", "fp32", "--temperature", "0", "--max_new_tokens",
            "6", "--no_stream", "--interactive", "--chat", "--sparsity", "0.4",
            "--thresholds", tiny_thresholds(ckpt, tmp_path / "t.json")]
    outs = []
    for flags in ([], ["--compile", "--compile_prefill"]):
        lines = iter(["the cat", "the dog", "a hat", ""])
        monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
        code, out, err = run_main([*base, *flags])
        assert code == 0 and out.count("the rest cached from the conversation") == 2, (out, err)
        outs.append([line for line in out.splitlines() if not line.startswith(("sample", "bandwidth", "peak"))])
    assert outs[0] == outs[1], outs


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_sparse_decode_on_a_second_gpu(tiny_ckpt, tmp_path):
    """--device cuda:1: the eager Triton kernels launch on the current device, which must become cuda:1."""
    thr = tiny_thresholds(tiny_ckpt, tmp_path / "t.json")
    current = torch.cuda.current_device()
    try:
        code, out, err = run_main(["--checkpoint", tiny_ckpt, "--device", "cuda:1", "--dtype", "bf16", "--temperature",
                                   "0", "--max_new_tokens", "6", "--prompt", "the", "--sparsity", "0.4",
                                   "--thresholds", thr])
    finally:
        torch.cuda.set_device(current)  # generate made cuda:1 current in this process
    assert code == 0, err
    assert "achieved sparsity (decode)" in out and "peak memory" in out


# ---- the real SmolLM2 --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_copy(smollm2_dir, tmp_path_factory):
    """The session's SmolLM2 folder, linked into a private one so thresholds.json written here stays here."""
    d = tmp_path_factory.mktemp("smollm2_generate")
    for f in Path(smollm2_dir).iterdir():
        if f.is_file() and not f.name.startswith("thresholds"):
            (d / f.name).symlink_to(f)
    return d


def run_cli(script, *args):
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the reference ops: the kernels are tested above
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return r.stdout


GEN = ["--device", "cpu", "--dtype", "fp32", "--temperature", "0", "--max_new_tokens", "8",
       "--prompt", "The capital of France is"]


@needs_gguf
def test_cli_dense_smollm2(smollm2_copy):
    out = run_cli("generate.py", "--checkpoint", smollm2_copy / "model.pth", *GEN)
    assert out.startswith("The capital of France is") and "Paris" in out, out
    assert "tokens/s" in out
    assert "achieved sparsity" not in out


@needs_gguf
def test_cli_sparse_smollm2(smollm2_copy):
    run_cli("calibrate.py", "--checkpoint", smollm2_copy / "model.pth", "--tokens", "1024", "--seq_len", "256", "--samples", "20000",
            "--dtype", "fp32", "--device", "cpu")
    assert (smollm2_copy / "thresholds.json").is_file()
    out = run_cli("generate.py", "--checkpoint", smollm2_copy / "model.pth", *GEN, "--sparsity", "0.4")
    assert "tokens/s" in out
    line = next(l for l in out.splitlines() if l.startswith("achieved sparsity"))
    values = [float(v.split()[-1].rstrip("%;")) / 100 for v in line.split(":", 1)[1].split(";")[0].split(",")]
    assert len(values) == len(PROJECTIONS)
    # 7 decode tokens only, on a 1024-token calibration: loose bounds around 40%
    assert all(0.15 < v < 0.65 for v in values), line


@needs_gguf
def test_cli_prompt_that_starts_with_the_bos_token_is_printed_whole(smollm2_copy):
    """SmolLM2's BOS id is <|im_start|>'s, and its tokenizer adds no BOS: a chat prompt's first token is the prompt's
    own and must be printed."""
    prompt = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    out = run_cli("generate.py", "--checkpoint", smollm2_copy / "model.pth", *GEN[:-2], "--max_new_tokens", "3",
                  "--prompt", prompt)
    assert out.startswith(prompt), out


def test_decode_runs_without_autograd(tmp_path):
    # `generate.py --compile --sparsity` on the GPU once failed to compile: the loaded parameters required grad,
    # so AOT autograd traced a backward through the sparse custom ops, which have none. Loading must give an
    # inference-only model, and generate() must call the (compiled) decode step with grad mode off.
    m = checkpoint.load_model(write_tiny_checkpoint(tmp_path / "ckpt"), torch.device("cpu"), torch.float32)
    assert not any(p.requires_grad for p in m.parameters())
    m.setup_caches(1, 32)
    grad_modes = []

    def decode_fn(*a):
        grad_modes.append(torch.is_grad_enabled())
        return generate.decode_one_token(*a)

    generate.generate(m, torch.tensor([[1, 5, 9, 2]]), 4, decode_fn)
    assert grad_modes == [False] * 3


def test_report_counts_the_steps_past_the_stop(tiny_ckpt, capsys):
    """Without streaming, decoding looks for the stop every 16 steps: the report says how many of the tokens it
    counts came after the stop, which the text does not show."""
    m = checkpoint.load_model(tiny_ckpt, torch.device("cpu"), torch.float32)
    args = generate.parse_args(["--checkpoint", str(tiny_ckpt), "--no_stream"])
    generate.report(m, None, args, 2, torch.tensor([[1, 2, 5, 0, 7, 7, 7]]), 1.0, 1, (0,))
    out = capsys.readouterr().out
    assert "5 tokens x 1 row in" in out and "3 decoded after the end-of-sequence token" in out, out
    generate.report(m, None, args, 2, torch.tensor([[1, 2, 5, 6, 7, 7, 0]]), 1.0, 1, (0,))
    assert "after the end-of-sequence" not in capsys.readouterr().out
    # a batch: counted from the last row's stop; none while a row has not stopped
    args = generate.parse_args(["--checkpoint", str(tiny_ckpt), "--no_stream", "--batch_size", "2"])
    generate.report(m, None, args, 2, torch.tensor([[1, 2, 0, 7, 7, 7, 7], [1, 2, 5, 0, 7, 7, 7]]), 1.0, 1, (0,))
    out = capsys.readouterr().out
    assert "5 tokens x 2 rows" in out and "3 decoded after every row's end-of-sequence token" in out, out
    generate.report(m, None, args, 2, torch.tensor([[1, 2, 0, 7, 7, 7, 7], [1, 2, 5, 6, 7, 7, 7]]), 1.0, 1, (0,))
    assert "after every row's" not in capsys.readouterr().out


@pytest.mark.parametrize("prompt_cached", [True, False])
def test_achieved_sparsity_puts_the_cache_back(prompt_cached, tiny_ckpt):
    """The report's replay writes the cache (its steps attend to one another) and puts back what decode wrote: a
    chat's next turn reuses decode's own keys and values, which the replay's one multi-token forward would round
    otherwise."""
    m = checkpoint.load_model(tiny_ckpt, torch.device("cpu"), torch.float32, column_major=True)
    m.set_sparse(decode=True)
    m.set_thresholds(torch.full((m.config.n_layer, len(PROJECTIONS)), 0.3))
    m.setup_caches(2, 24)
    prompt = torch.tensor([[5, 9, 13, 2, 7], [5, 9, 13, 2, 7]])
    seq = generate.generate(m, prompt, 12, generate.decode_one_token)
    before = [(b.attention.kv_cache.k_cache.clone(), b.attention.kv_cache.v_cache.clone()) for b in m.layers]
    dropped = generate.achieved_sparsity(m, prompt.shape[1], seq, prompt_cached)
    assert 0 < dropped[0].mean() < 1
    for b, (k, v) in zip(m.layers, before):
        assert torch.equal(b.attention.kv_cache.k_cache, k) and torch.equal(b.attention.kv_cache.v_cache, v)


def test_loaded_line_names_the_thresholds_in_use(tiny_ckpt, tmp_path):
    """A file with a sparse-aware table: the start-up line says whether its corrected thresholds or TEAL's serve
    the level asked for."""
    import thresholds
    config = checkpoint.load_config(tiny_ckpt)
    cal = thresholds.load(tiny_thresholds(tiny_ckpt, tmp_path / "plain.json"), config)
    thresholds.save(tmp_path / "sa.json", config, cal["levels"].tolist(), cal["table"], "test", 1, "magnitude",
                    sparse_aware={"levels": [0.5], "table": cal["table"][..., 1:2]})
    for sparsity, want in (("0.4", "(magnitude scores, sparse-aware thresholds)"),
                           ("0.6", "(magnitude scores, TEAL's thresholds: --sparsity is above the file's sparse-aware levels)")):
        code, _, err = run_main(["--checkpoint", tiny_ckpt, *BASE, "--sparsity", sparsity, "--thresholds",
                                 tmp_path / "sa.json"])
        assert code == 0 and want in err, err
    code, _, err = run_main(["--checkpoint", tiny_ckpt, *BASE, "--sparsity", "0.4", "--thresholds",
                             tmp_path / "plain.json"])
    assert code == 0 and "(magnitude scores)" in err, err


@pytest.mark.parametrize("rows", [sparse_ops.MAX_BATCH, sparse_ops.MAX_BATCH + 1])
def test_decode_takes_the_sparse_gemv_up_to_max_batch(rows, monkeypatch):
    """A decode step of up to MAX_BATCH rows runs the sparse GEMV op (its kernel on a GPU); more rows the masked
    dense reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = tiny_model()
    m.set_thresholds(torch.full((TINY["n_layer"], len(PROJECTIONS)), 0.1))
    m.set_sparse(decode=True, prefill=False)
    calls = []
    gemv = sparse_ops.sparse_gemv
    monkeypatch.setattr(sparse_ops, "sparse_gemv", lambda *a, **k: calls.append(1) or gemv(*a, **k))
    m.setup_caches(rows, 8)
    idx = torch.randint(0, TINY["vocab_size"], (rows, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m(idx[:, :4], torch.arange(4))
        assert not calls  # prefill is dense
        m(idx[:, 4:], torch.tensor([4]))
    # q|k|v, o and down per layer
    assert len(calls) == (3 * TINY["n_layer"] if rows <= sparse_ops.MAX_BATCH else 0)
    m.set_sparse(decode=False, prefill=False)


def test_chat_history_is_cut_only_where_it_does_not_fit(capsys):
    """encode_prompt keeps the whole conversation while it and --max_new_tokens fit the room exactly; one token
    more and the oldest exchange goes, with a note."""
    import argparse

    class Turns:  # a token per character of each turn
        def encode_chat(self, text, system, history):
            return [0] * (len(text) + sum(len(t["content"]) for t in history))

    args = argparse.Namespace(chat=True, system=None, max_new_tokens=5)
    history = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "defg"}]
    ids, _ = generate.encode_prompt(Turns(), "hi", args, 2 + 7 + 5, "the room", history)
    assert len(ids) == 9 and len(history) == 2 and "left out" not in capsys.readouterr().err
    ids, _ = generate.encode_prompt(Turns(), "hi!", args, 2 + 7 + 5, "the room", history)
    assert len(ids) == 3 and history == [] and "oldest exchange left out" in capsys.readouterr().err
