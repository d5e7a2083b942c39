"""Decode's fused residual add + RMSNorm (+ kept-channel lists) against plain torch (interpreter on CPU, GPU)."""
import pytest
import torch

from conftest import rel_err
from sparse_ops import add_rmsnorm, add_rmsnorm_ref, sparse_glu, sparse_glu_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def inputs(D, n_parts, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, D, generator=g) * 3).to(dtype).to(DEV)
    pdt = torch.float32 if n_parts > 1 else dtype  # several partials are fp32, one is the linear's output
    parts = torch.randn(n_parts, 1, D, generator=g).to(pdt).to(DEV)
    w = (torch.rand(D, generator=g) + 0.5).to(dtype).to(DEV)
    return x, parts, w


def oracle(x, parts, w, eps):
    """fp64 from the rounded sum, as the unfused model: h = x + round(sum(parts)); y = round(w * h / rms(h))."""
    h = (x.double() + parts.double().sum(0).to(x.dtype).double()).to(x.dtype)
    hd = h.double()
    return h, (w.double() * hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def kept_from_scores(y, thr, scale):
    """Channel ids that gate or up keeps, from scratch (independent of the op's list format)."""
    keep = torch.zeros(y.shape[1], dtype=torch.bool, device=y.device)
    for s in range(thr.shape[0]):
        keep |= (y[0].abs().float() * (1 if scale is None else scale[s])) > thr[s]
    return torch.nonzero(keep).flatten()


def check_lists(kept, y, thr, scale):
    """The list holds exactly the channels gate or up keeps, in order, then -1s, then their count."""
    D = y.shape[1]
    assert kept.shape == (1, D + 1) and kept.dtype == torch.int32
    want = kept_from_scores(y, thr, scale)
    assert kept[0, D] == want.numel()
    assert torch.equal(kept[0, :want.numel()].long(), want) and (kept[0, want.numel():D] == -1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_parts", [1, 3, 8])
@pytest.mark.parametrize("D", [576, 208, 64, 16])
def test_add_and_norm(D, n_parts, dtype):
    x, parts, w = inputs(D, n_parts, dtype, seed=D + n_parts)
    thr = torch.tensor([0.5, 1.0], device=DEV)
    h, y, kept = add_rmsnorm(x, parts, w, 1e-5, thr)
    h_ref, y_ref = oracle(x, parts, w, 1e-5)
    assert h.shape == y.shape == x.shape and h.dtype == y.dtype == dtype
    assert rel_err(h, h_ref) < TOL[dtype] and rel_err(y, y_ref) < TOL[dtype]
    if n_parts == 1 and (dtype != torch.bfloat16 or DEV == "cuda"):
        # one partial: no summation order to differ in (Triton's interpreter truncates to bf16)
        assert torch.equal(h, h_ref)
    check_lists(kept, y, thr, None)


def test_residual_rounds_the_linear_output_first():
    # h = x + round(sum of fp32 partials): the unfused model rounds the linear's output to the model dtype before
    # the add. Emulated exactly here (fp32 sum in partial order, then fp16): adding the fp32 sum would differ.
    x, parts, w = inputs(576, 3, torch.float16, seed=21)
    thr = torch.tensor([0.5, 0.5], device=DEV)
    h = add_rmsnorm(x, parts, w, 1e-5, thr)[0]
    s = parts[0].float()
    for p in parts[1:]:
        s = s + p.float()
    want = (x.float() + s.to(torch.float16).float()).to(torch.float16)
    assert torch.equal(h, want)
    assert torch.equal(add_rmsnorm_ref(x, parts, w, 1e-5, thr)[0], want)  # the reference, the same contract


def test_kept_lists_break_ties_as_the_keep_rule():
    # TEAL keeps |y| > t, strictly: a channel exactly at its threshold, or a zero at threshold 0, is not listed
    x, parts, w = inputs(256, 2, torch.float32, seed=9)
    w[::5] = 0  # channels whose output is exactly 0
    y = add_rmsnorm(x, parts, w, 1e-5, torch.zeros(2, device=DEV))[1]
    assert (y[0, ::5] == 0).all()
    at7, at130 = y[0, 7].abs().float(), y[0, 130].abs().float()
    for t in (torch.stack([at7, at130]), torch.zeros(2, device=DEV)):
        _, y_op, kept = add_rmsnorm(x, parts, w, 1e-5, t)
        assert torch.equal(y_op, y)
        check_lists(kept, y, t, None)
    kept = add_rmsnorm(x, parts, w, 1e-5, torch.stack([at7, at7]))[2]
    assert 7 not in kept[0, :256].tolist()


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_norm_of_a_small_residual(eps):
    # activations as small as eps: where eps enters the normalisation shows
    x, parts, w = inputs(576, 3, torch.float32, seed=11)
    x, parts = x * 1e-3, parts * 1e-3
    h, y, _ = add_rmsnorm(x, parts, w, eps, torch.zeros(2, device=DEV))
    assert rel_err(y, oracle(x, parts, w, eps)[1]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [576, 512, 256, 64, 16])  # 256 and 512: whole slices, as every 4096-wide model
@pytest.mark.parametrize("scaled", [False, True])
def test_kept_lists(D, dtype, scaled):
    x, parts, w = inputs(D, 3, dtype, seed=D)
    g = torch.Generator().manual_seed(D + 1)
    y = add_rmsnorm(x, parts, w, 1e-5, torch.zeros(2, device=DEV))[1]
    for levels in ([0.5, 0.5], [0.25, 0.65], [0.0, 0.9]):  # gate's and up's
        scale = (torch.rand(2, D, generator=g) + 0.5).to(DEV) if scaled else None
        score = y.abs().float() * (scale if scaled else 1)
        thr = torch.stack([torch.quantile(score[s if scaled else 0].cpu(), q) if q else torch.tensor(0.0)
                           for s, q in enumerate(levels)]).float().to(DEV)
        h2, y2, kept = add_rmsnorm(x, parts, w, 1e-5, thr, scale)
        assert torch.equal(y2, y)
        check_lists(kept, y, thr, scale)


def test_nothing_kept_and_everything_kept():
    x, parts, w = inputs(576, 2, torch.bfloat16, seed=5)
    thr = torch.tensor([1e9, 0.0], device=DEV)
    _, y, kept = add_rmsnorm(x, parts, w, 1e-5, thr)
    check_lists(kept, y, thr, None)
    assert kept[0, -1] == (y[0] != 0).sum()  # the union: everything one segment keeps
    nothing = torch.tensor([1e9, 1e9], device=DEV)
    check_lists(add_rmsnorm(x, parts, w, 1e-5, nothing)[2], y, nothing, None)
    assert add_rmsnorm(x, parts, w, 1e-5, nothing)[2][0, -1] == 0


@pytest.mark.parametrize("scaled", [False, True])
def test_glu_with_kept_lists(scaled):
    # the GLU kernel reading add_rmsnorm's list (a union over gate and up, each applying its own threshold) gives
    # what the reference gives
    K, dtype = 576, torch.bfloat16
    x, parts, w = inputs(K, 4, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    wa, wb = ((torch.randn(K, 1536, generator=g) / 24).to(dtype).to(DEV) for _ in range(2))
    thr = torch.tensor([0.4, 1.2], device=DEV)
    scale = (torch.rand(2, K, generator=g) + 0.5).to(DEV) if scaled else None
    _, y, kept = add_rmsnorm(x, parts, w, 1e-5, thr, scale)
    got = sparse_glu(y, wa, wb, thr, scale, kept)
    assert rel_err(got, sparse_glu_ref(y.double(), wa.double(), wb.double(), thr, scale)) < TOL[dtype]


def test_reference_matches_the_op():
    x, parts, w = inputs(576, 3, torch.bfloat16, seed=3)
    thr = torch.tensor([0.5, 1.0], device=DEV)
    h, y, kept = add_rmsnorm(x, parts, w, 1e-5, thr)
    h_r, y_r, kept_r = add_rmsnorm_ref(x, parts, w, 1e-5, thr)
    assert rel_err(h, h_r) < 1e-2 and rel_err(y, y_r) < 1e-2
    check_lists(kept_r, y_r, thr, None)


def test_opcheck():
    x, parts, w = inputs(96, 3, torch.bfloat16, seed=0)
    thr = torch.tensor([0.2, 0.5], device=DEV)
    utils = "ALL" if DEV == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")
    op = torch.ops.tealfast.add_rmsnorm.default
    torch.library.opcheck(op, (x, parts, w, 1e-5, thr, None), test_utils=utils)
    torch.library.opcheck(op, (x, parts, w, 1e-5, thr, torch.rand(2, 96, device=DEV)), test_utils=utils)


def test_bad_input():
    x, parts, w = inputs(64, 2, torch.bfloat16, seed=0)
    thr = torch.zeros(2, device=DEV)
    with pytest.raises(ValueError, match="parts"):
        add_rmsnorm(x, parts[:, :, :32], w, 1e-5, thr)
    with pytest.raises(ValueError, match="parts"):
        add_rmsnorm(x, parts.double(), w, 1e-5, thr)
    with pytest.raises(ValueError, match="parts"):
        add_rmsnorm(x, parts.to(x.dtype), w, 1e-5, thr)  # several partial sums come in fp32
    with pytest.raises(ValueError, match="weight"):
        add_rmsnorm(x, parts, w.float(), 1e-5, thr)
    with pytest.raises(ValueError, match="thresholds"):
        add_rmsnorm(x, parts, w, 1e-5, torch.zeros(4, device=DEV))
    with pytest.raises(ValueError, match="thresholds"):
        add_rmsnorm(x, parts, w, 1e-5, torch.zeros(1, device=DEV))  # gate's and up's: two
    with pytest.raises(ValueError, match="one row"):
        add_rmsnorm(torch.cat([x, x]), torch.cat([parts, parts], 1), w, 1e-5, thr)
    with pytest.raises(ValueError, match="parts"):
        add_rmsnorm(x, parts[:0], w, 1e-5, thr)  # no partials: nothing to add
    with pytest.raises(ValueError, match="multiple of 16"):
        add_rmsnorm(x[:, :40].contiguous(), parts[:, :, :40].contiguous(), w[:40], 1e-5, thr)
    with pytest.raises(ValueError, match="scale"):
        add_rmsnorm(x, parts, w, 1e-5, thr, torch.ones(1, 64, device=DEV))  # one row: gate's and up's are two
    with pytest.raises(ValueError, match="contiguous"):
        add_rmsnorm(torch.randn(64, 2, device=DEV, dtype=torch.bfloat16).t(), parts, w, 1e-5, thr)
    # strided views the kernel would read as packed arrays
    with pytest.raises(ValueError, match="weight must be contiguous"):
        add_rmsnorm(x, parts, torch.stack([w, w], 1)[:, 0], 1e-5, thr)
    with pytest.raises(ValueError, match="thresholds must be contiguous"):
        add_rmsnorm(x, parts, w, 1e-5, torch.zeros(2, 2, device=DEV)[:, 0])
    with pytest.raises(ValueError, match="scale must be contiguous"):
        add_rmsnorm(x, parts, w, 1e-5, thr, torch.ones(64, 2, device=DEV).t())
    kept = add_rmsnorm(x, parts, w, 1e-5, thr)[2]
    wt = torch.randn(64, 32, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="kept"):
        sparse_glu(x, wt, wt, thr, None, torch.cat([kept, kept]))  # one list, not one per segment
    with pytest.raises(ValueError, match="kept"):
        sparse_glu(x, wt, wt, thr, None, kept[:, :-1].contiguous())
    with pytest.raises(ValueError, match="kept"):
        sparse_glu(torch.cat([x, x]), wt, wt, thr, None, kept)  # the list is for one row
    with pytest.raises(ValueError, match="kept"):
        sparse_glu(x, wt, wt, thr, None, kept.long())


def test_norm_of_the_rounded_residual():
    # y normalises h as stored, rounded to the model dtype, as the unfused model does: normalising the fp32 sum
    # instead moves about a quarter of fp16's y by an ulp, within any relative tolerance. (fp16: Triton's
    # interpreter rounds to bf16 by truncation.) A few channels may round apart where fp32's rsqrt and fp64's differ.
    for seed in (0, 1):
        x, parts, w = inputs(576, 3, torch.float16, seed=seed)
        y = add_rmsnorm(x, parts, w, 1e-5, torch.zeros(2, device=DEV))[1]
        assert (y != oracle(x, parts, w, 1e-5)[1]).sum() <= 5


# ---- GPU only ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("n_parts", [1, 5, 8])
@pytest.mark.parametrize("D", [4096, 5120])
def test_llama_sizes_gpu(D, n_parts):
    x, parts, w = inputs(D, n_parts, torch.bfloat16, seed=D + n_parts)
    thr = torch.tensor([0.3, 0.9], device=DEV)
    h, y, kept = add_rmsnorm(x, parts, w, 1e-5, thr)
    h_ref, y_ref = oracle(x, parts, w, 1e-5)
    assert rel_err(h, h_ref) < 1e-2 and rel_err(y, y_ref) < 1e-2
    check_lists(kept, y, thr, None)


@pytest.mark.gpu
def test_cuda_graph_replay_follows_threshold_changes():
    # norm lists -> GLU, compiled with CUDA graphs: new thresholds change the lists and the output, no recompile
    x, parts, w = inputs(4096, 8, torch.bfloat16, seed=1)
    wa, wb = (torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(2))
    thr = torch.zeros(2, device="cuda")

    def f(x, parts):
        _, y, kept = add_rmsnorm(x, parts, w, 1e-5, thr)
        return sparse_glu(y, wa, wb, thr, None, kept)

    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(f, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        compiled(x, parts)
    outs = []
    for level in (0.3, 0.6, 1.0):
        thr.copy_(torch.tensor([level, level / 2]))
        outs.append(compiled(x, parts).clone())
        y = oracle(x, parts, w, 1e-5)[1]
        assert rel_err(outs[-1], sparse_glu_ref(y.double(), wa.double(), wb.double(), thr)) < 1e-2
    assert (outs[0] - outs[2]).abs().max() > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 1
