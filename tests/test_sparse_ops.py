"""Sparse GEMV kernels against the plain-torch reference (Triton interpreter on CPU, real kernels on GPU)."""
import pytest
import torch

import sparse_ops
from conftest import rel_err
from sparse_ops import sparse_gemv, sparse_gemv_pair, sparse_gemv_pair_ref, sparse_gemv_ref, sparse_glu
from sparse_ops.norm import kept_list

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def quantile_thresholds(x, levels):
    """Thresholds that drop about `level` of the entries of x."""
    return torch.tensor([torch.quantile(x.abs().float().flatten().cpu(), s).item() if s > 0 else 0.0
                         for s in levels], dtype=torch.float32, device=x.device)


def check_single(B, K, seg_sizes, dtype, levels, scaled=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = sum(seg_sizes)
    x = torch.randn(B, K, generator=g).to(dtype).to(DEV)
    wt = (torch.randn(K, N, generator=g) / K ** 0.5).to(dtype).to(DEV)
    scale = torch.rand(len(seg_sizes), K, generator=g).to(DEV) + 0.5 if scaled else None
    thr = quantile_thresholds(x, levels)
    ends = torch.tensor(seg_sizes).cumsum(0).tolist()
    y = sparse_gemv(x, wt, thr, ends, scale)
    assert y.shape == (B, N) and y.dtype == dtype
    ref = sparse_gemv_ref(x.double(), wt.double(), thr, ends, scale)
    assert rel_err(y, ref) < TOL[dtype], (B, K, seg_sizes, dtype, levels)
    return y, ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 2, 5, 8])
def test_qkv_segments(dtype, B):
    # SmolLM2 sizes: q 576, k/v 192 on a 576-wide input, each segment with its own threshold
    check_single(B, 576, [576, 192, 192], dtype, [0.25, 0.5, 0.65], seed=B)


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("K,N", [(1536, 576), (200, 72), (17, 16), (77, 300), (64, 1)])
def test_odd_and_tiny_sizes(B, K, N):
    # sizes that are not multiples of the tile sizes, and tiny ones
    for dtype in (torch.bfloat16, torch.float32):
        check_single(B, K, [N], dtype, [0.4], seed=K + N)


@pytest.mark.parametrize("B", [1, 4])
def test_unreduced_partials(B):
    # reduce=False hands over the split-K partial sums (what decode attention takes): fp32, and they add up
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, 576, generator=g).to(torch.bfloat16).to(DEV)
    wt = (torch.randn(576, 960, generator=g) / 24).to(torch.bfloat16).to(DEV)
    thr = quantile_thresholds(x, [0.3, 0.5, 0.6])
    parts = sparse_gemv(x, wt, thr, [576, 768, 960], reduce=False)
    assert parts.dim() == 3 and parts.shape[0] > 1 and parts.shape[1:] == (B, 960) and parts.dtype == torch.float32
    ref = sparse_gemv_ref(x.double(), wt.double(), thr, [576, 768, 960])
    assert rel_err(parts.sum(0), ref) < 1e-5
    assert torch.equal(sparse_gemv(x, wt, thr, [576, 768, 960]), parts.sum(0).to(torch.bfloat16))


@pytest.mark.parametrize("scaled", [False, True])
def test_windows_and_lists(scaled):
    # batch 1 has two paths: small weights run windows of rows masked by the keep mask, larger ones list the kept
    # channels first (sparse_ops.pick_config); both against the reference, with segments and weighted scores
    from sparse_ops.gemv import pick_config
    dev = torch.device(DEV)
    for K, segs in ((128, [64, 32, 32]), (200, [48]), (1536, [256, 128, 128])):
        cfg = pick_config(1, K, sum(segs), tuple(torch.tensor(segs).cumsum(0).tolist()[:-1]), dev)
        assert (cfg["WINDOWS"] > 0) == (K * sum(segs) <= (2 ** 24 if DEV == "cuda" else 2 ** 16)), cfg
        assert cfg["WINDOWS"] & (cfg["WINDOWS"] - 1) == 0, cfg  # a power of two (pick_config says why)
        for levels in ([0.3, 0.5, 0.7], [0.0, 0.0, 0.0], [0.95, 0.9, 1.0]):
            check_single(1, K, segs, torch.bfloat16, levels[:len(segs)], scaled=scaled, seed=K)
    assert pick_config(1, 4096, 4096, (), dev, listed=True)["WINDOWS"] == 0  # a given list is streamed


def poisoned(wt, keep):
    """wt with NaN in the rows of the channels no row keeps (keep (B, K)): an op that reads one returns NaN, where
    a clean weight could not show it (its input there is zero)."""
    wt = wt.clone()
    wt[~keep.any(0)] = float("nan")
    return wt


@pytest.mark.parametrize("B,path", [(1, "windows"), (1, "listed"), (3, "tiles"), (8, "tiles")])
@pytest.mark.parametrize("scaled", [False, True])
def test_dropped_rows_are_never_read(B, path, scaled):
    # What the kernels are for: the weight rows of dropped channels stay unread on every path (batch 1 in
    # windows and listed, a batch's tiles, the pair and the GLU), or their NaN would reach the output
    from sparse_ops.gemv import pick_config
    K, N = {"windows": (128, 96), "listed": (8192, 4096) if DEV == "cuda" else (1024, 192), "tiles": (200, 48)}[path]
    g = torch.Generator().manual_seed(K + B)
    x = torch.randn(B, K, generator=g).to(torch.bfloat16).to(DEV)
    wt = (torch.randn(K, N, generator=g) / K ** 0.5).to(torch.bfloat16).to(DEV)
    scale = torch.rand(2, K, generator=g).to(DEV) + 0.5 if scaled else None
    thr = quantile_thresholds(x, [0.5, 0.6])
    keep = [sparse_ops.keep_mask(x, thr[s], None if scale is None else scale[s]) for s in (0, 1)]
    if B == 1:
        windows = pick_config(1, K, N, (), torch.device(DEV))["WINDOWS"] > 0
        assert windows == (path == "windows")  # both batch-1 paths run
    s0 = None if scale is None else scale[:1]
    y = sparse_gemv(x, poisoned(wt, keep[0]), thr[:1], [N], s0)
    assert rel_err(y, sparse_gemv_ref(x.double(), wt.double(), thr[:1], [N], s0)) < TOL[torch.bfloat16]
    wt_b = wt.flip(1)  # a second weight: the pair (a list each) and the GLU (one list, gate's and up's union)
    y = sparse_gemv_pair(x, poisoned(wt, keep[0]), poisoned(wt_b, keep[1]), thr, scale)
    assert rel_err(y, sparse_gemv_pair_ref(x.double(), wt.double(), wt_b.double(), thr, scale)) < TOL[torch.bfloat16]
    if B == 1:
        both = keep[0] | keep[1]
        y = sparse_glu(x, poisoned(wt, both), poisoned(wt_b, both), thr, scale, kept_list(x, thr, scale))
        assert rel_err(y, glu_oracle(x, wt, wt_b, thr, scale)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("scaled", [False, True])
def test_zero_threshold_still_masks(scaled):
    # Threshold 0 (0% sparsity) on the listing path: inputs of exactly 0, NaN ones and (weighted) scores of 0 must
    # still drop, as in the reference: their weight rows unread (NaN there would show), the output equal to it
    from sparse_ops.gemv import pick_config
    g = torch.Generator().manual_seed(7)
    K, N = (8192, 4096) if DEV == "cuda" else (1024, 192)  # large enough to list (pick_config), on either device
    assert pick_config(1, K, N, (), torch.device(DEV))["WINDOWS"] == 0
    x = torch.randn(1, K, generator=g)
    x[0, ::9] = 0.0
    x[0, 5::97] = float("nan")
    x = x.to(torch.bfloat16).to(DEV)
    wt = (torch.randn(K, N, generator=g) / 32).to(torch.bfloat16).to(DEV)
    scale = None
    if scaled:
        scale = torch.rand(1, K, generator=g) + 0.5
        scale[0, 1::7] = 0.0
        scale = scale.to(DEV)
    thr = torch.zeros(1, device=DEV)
    y = sparse_gemv(x, poisoned(wt, sparse_ops.keep_mask(x, thr, scale)), thr, [N], scale)
    ref = sparse_gemv_ref(x.double(), wt.double(), thr, [N], scale)
    assert torch.isfinite(ref).all() and rel_err(y, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("level", [0.0, 0.9])
def test_threshold_extremes(level):
    check_single(1, 256, [128], torch.bfloat16, [level])
    check_single(4, 256, [128], torch.bfloat16, [level])


def test_nothing_kept_and_everything_kept():
    x = torch.randn(3, 96, device=DEV, dtype=torch.bfloat16)
    wt = torch.randn(96, 64, device=DEV, dtype=torch.bfloat16)
    big = torch.tensor([1e9], device=DEV)
    y = sparse_gemv(x, wt, big, [64])
    assert torch.count_nonzero(y) == 0  # every input dropped: exactly zero output, not stale memory
    y0 = sparse_gemv(x, wt, torch.zeros(1, device=DEV), [64])
    dense = (x.double() @ wt.double())
    assert rel_err(y0, dense) < TOL[torch.bfloat16]


def test_batch_rows_use_their_own_masks():
    # Row 0 keeps everything, row 1 nothing: a union mask applied to all rows would give row 1 non-zeros.
    x = torch.randn(2, 128, device=DEV, dtype=torch.float16)
    x[1] *= 1e-4
    wt = torch.randn(128, 64, device=DEV, dtype=torch.float16)
    y = sparse_gemv(x, wt, torch.tensor([0.01], device=DEV), [64])
    assert torch.count_nonzero(y[1]) == 0
    assert rel_err(y[0:1], x[0:1].double() @ wt.double()) < TOL[torch.float16]


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("scaled", [False, True])
def test_pair(B, scaled):
    g = torch.Generator().manual_seed(B)
    K, N = 576, 1536
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(B, K, generator=g).to(dtype).to(DEV)
        wa = torch.randn(K, N, generator=g).to(dtype).to(DEV)
        wb = torch.randn(K, N, generator=g).to(dtype).to(DEV)
        scale = torch.rand(2, K, generator=g).to(DEV) + 0.5 if scaled else None
        thr = quantile_thresholds(x, [0.3, 0.6])
        y = sparse_gemv_pair(x, wa, wb, thr, scale)
        ref = sparse_gemv_pair_ref(x.double(), wa.double(), wb.double(), thr, scale)
        assert y.shape == (B, 2 * N)
        assert rel_err(y, ref) < TOL[dtype]


def masked_matmul(x, wt, thr, scale=None):
    """(x * 1[score > thr]) @ wt in fp64, written out (independent of sparse_ops.reference)."""
    score = x.abs().float() * (1 if scale is None else scale)
    return torch.where(score > thr, x.double(), 0) @ wt.double()


@pytest.mark.parametrize("B", [1, 3])
def test_pair_of_different_widths(B):
    # a pair's second weight has its own row length (N_b != N_a): windows (batch 1), a batch
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, 96, generator=g).to(DEV)
    wa, wb = torch.randn(96, 48, generator=g).to(DEV), torch.randn(96, 80, generator=g).to(DEV)
    thr = torch.tensor([0.5, 0.9], device=DEV)
    want = torch.cat([masked_matmul(x, wa, thr[0]), masked_matmul(x, wb, thr[1])], dim=-1)
    assert rel_err(sparse_gemv_pair(x, wa, wb, thr), want) < TOL[torch.float32]


def glu_oracle(x, wa, wb, thr, scale):
    """silu(gate) * up in fp64, written out from the masks (independent of the references' composition)."""
    xd = x.double()
    g = torch.where((x.abs().float() * (1 if scale is None else scale[0])) > thr[0], xd, 0) @ wa.double()
    u = torch.where((x.abs().float() * (1 if scale is None else scale[1])) > thr[1], xd, 0) @ wb.double()
    return g * torch.sigmoid(g) * u


def check_glu(B, K, N, dtype, levels, scaled=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g).to(dtype).to(DEV)
    wa, wb = ((torch.randn(K, N, generator=g) / K ** 0.5).to(dtype).to(DEV) for _ in range(2))
    scale = torch.rand(2, K, generator=g).to(DEV) + 0.5 if scaled else None
    thr = quantile_thresholds(x, levels)
    kept = kept_list(x, thr, scale) if B == 1 else None  # the fused kernel streams a list (batch 1)
    h = sparse_glu(x, wa, wb, thr, scale, kept)
    assert h.shape == (B, N) and h.dtype == dtype
    ref = glu_oracle(x, wa, wb, thr, scale)
    assert rel_err(h, ref) < TOL[dtype], (B, K, N, dtype, levels)
    return h, ref, (x, wa, wb, thr, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("K,N", [(576, 1536), (64, 200), (96, 16), (48, 72)])
@pytest.mark.parametrize("scaled", [False, True])
def test_glu_one_row(K, N, dtype, scaled):
    # silu(gate) * up in the GEMV's kernel (a list given): SmolLM2's MLP, widths that split a tile, tiny ones
    check_glu(1, K, N, dtype, [0.3, 0.55], scaled, seed=K + N)


@pytest.mark.parametrize("B", [1, 3])
def test_glu_without_list_and_batches(B):
    # no list, or several rows: the pair op then silu * up in torch; the same values as the fused kernel
    h, ref, (x, wa, wb, thr, scale) = check_glu(B, 576, 1536, torch.bfloat16, [0.4, 0.5], seed=B)
    assert rel_err(sparse_glu(x, wa, wb, thr, scale), ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("level", [0.0, 0.9])
def test_glu_threshold_extremes(level):
    check_glu(1, 256, 192, torch.bfloat16, [level, level])


def test_glu_nothing_kept():
    x = torch.randn(1, 256, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(256, 192, device=DEV, dtype=torch.bfloat16)
    big = torch.tensor([1e9, 1e9], device=DEV)
    assert torch.count_nonzero(sparse_glu(x, w, w, big, None, kept_list(x, big, None))) == 0  # an empty list


def test_glu_union_list_applies_each_threshold():
    # The list is the union over gate's and up's thresholds; a channel only up keeps must not reach gate.
    x = torch.randn(1, 128, device=DEV, dtype=torch.float32)
    wa, wb = torch.randn(128, 32, device=DEV), torch.randn(128, 32, device=DEV)
    thr = torch.tensor([1.5, 0.2], device=DEV)
    h = sparse_glu(x, wa, wb, thr, None, kept_list(x, thr, None))
    assert rel_err(h, glu_oracle(x, wa, wb, thr, None)) < TOL[torch.float32]
    same = torch.tensor([0.2, 0.2], device=DEV)
    assert rel_err(h, glu_oracle(x, wa, wb, same, None)) > 1e-2


@pytest.mark.parametrize("B", [1, 6])
def test_weighted_scores(B):
    check_single(B, 576, [576, 192, 192], torch.bfloat16, [0.4, 0.5, 0.5], scaled=True, seed=3)


def test_scale_changes_the_mask():
    # With a strongly non-uniform scale the weighted result must differ from the unweighted one.
    x = torch.randn(1, 256, device=DEV)
    wt = torch.randn(256, 64, device=DEV)
    scale = torch.linspace(0.01, 10, 256, device=DEV)[None]
    thr = torch.tensor([0.8], device=DEV)
    a = sparse_gemv(x, wt, thr, [64])
    b = sparse_gemv(x, wt, thr, [64], scale)
    assert (a - b).abs().max() > 1e-3


def test_opcheck():
    x = torch.randn(2, 96, device=DEV, dtype=torch.bfloat16)
    wt = torch.randn(96, 80, device=DEV, dtype=torch.bfloat16)
    thr = torch.tensor([0.2, 0.5], device=DEV)
    wb = torch.randn(96, 48, device=DEV, dtype=torch.bfloat16)
    # AOT tracing runs the op's body on fake tensors, which Triton's CPU interpreter cannot; GPU runs them all.
    utils = "ALL" if DEV == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.tealfast.sparse_gemv.default, (x, wt, thr, [64, 80], None), test_utils=utils)
    torch.library.opcheck(torch.ops.tealfast.sparse_gemv_pair.default, (x, wt, wb, thr, None), test_utils=utils)
    # one row with the kept-channel list from add_rmsnorm
    x1 = x[:1].contiguous()
    kept = kept_list(x1, thr, None)
    torch.library.opcheck(torch.ops.tealfast.sparse_glu.default, (x1, wb, wb, thr, None, kept), test_utils=utils)


def test_bad_input():
    x = torch.randn(1, 64, device=DEV, dtype=torch.bfloat16)
    wt = torch.randn(64, 32, device=DEV, dtype=torch.bfloat16)
    thr = torch.zeros(1, device=DEV)
    with pytest.raises(TypeError, match="dtype"):
        sparse_gemv(x, wt.half(), thr, [32])
    with pytest.raises(ValueError, match="contiguous"):
        sparse_gemv(x, torch.randn(32, 64, device=DEV, dtype=torch.bfloat16).t(), thr, [32])
    with pytest.raises(ValueError, match="transposed"):
        sparse_gemv(x, wt.t().contiguous(), thr, [64])
    with pytest.raises(ValueError, match="batch"):
        sparse_gemv(torch.randn(9, 64, device=DEV, dtype=torch.bfloat16), wt, thr, [32])
    with pytest.raises(ValueError, match="thresholds"):
        sparse_gemv(x, wt, torch.zeros(2, device=DEV), [32])
    with pytest.raises(ValueError, match="thresholds"):
        sparse_gemv(x, wt, torch.zeros(1, device=DEV, dtype=torch.float64), [32])
    with pytest.raises(ValueError, match="seg_ends"):
        sparse_gemv(x, wt, thr, [16])
    with pytest.raises(ValueError, match="seg_ends"):
        sparse_gemv(x, wt, torch.zeros(2, device=DEV), [-16, 32])  # the reference would slice from the end
    with pytest.raises(ValueError, match="seg_ends"):
        sparse_gemv(x, wt, torch.zeros(2, device=DEV), [16.0, 32])
    with pytest.raises(ValueError, match="seg_ends"):
        sparse_gemv(x, wt, torch.zeros(3, device=DEV), [32, 16, 32])  # segments out of order
    with pytest.raises(ValueError, match="scale"):
        sparse_gemv(x, wt, torch.zeros(2, device=DEV), [16, 32], torch.ones(1, 64, device=DEV))  # one per segment
    with pytest.raises(ValueError, match="multiples of 16"):
        sparse_gemv(x, wt, torch.zeros(2, device=DEV), [10, 32])
    with pytest.raises(TypeError, match="dtype"):
        sparse_gemv(x.to(torch.int32), wt, thr, [32])
    thr2 = torch.zeros(2, device=DEV)
    with pytest.raises(ValueError, match="differ in shape"):
        sparse_glu(x, wt, wt[:, :16].contiguous(), thr2)
    with pytest.raises(ValueError, match="thresholds"):
        sparse_glu(x, wt, wt, thr)  # one threshold for gate and one for up
    with pytest.raises(ValueError, match="kept"):
        sparse_glu(torch.cat([x, x]), wt, wt, thr2, None, kept_list(x, thr2, None))  # the list is for one row
    # strided views the kernel would read as packed arrays
    with pytest.raises(ValueError, match="thresholds must be contiguous"):
        sparse_gemv(x, wt, torch.zeros(2, 2, device=DEV)[:, 0], [16, 32])
    with pytest.raises(ValueError, match="scale must be contiguous"):
        sparse_gemv_pair(x, wt[:, :16].contiguous(), wt[:, 16:].contiguous(), thr2,
                         torch.ones(64, 2, device=DEV).t())


def past_the_end(t, fill):
    """t as the head of a longer buffer whose tail holds `fill`: a kernel that reads past t's end reads fill, not
    whatever memory follows (Triton's interpreter reads it, a GPU may too)."""
    buf = torch.full((t.numel() + 1024,), fill, dtype=t.dtype, device=t.device)
    buf[:t.numel()] = t.flatten()
    return buf[:t.numel()].view(t.shape)


def test_listing_in_one_chunk():
    # a share that fills 7/8 of a power of two past 1024 is scanned in one chunk of it (a CPU's listing at K 3600:
    # shares of 1808 and 1792 in one chunk of 2048, lanes past the share masked); one a bit shorter in chunks of
    # 1024. A GPU's shares follow its SM count: Llama-3's gate, whichever way it is scanned there.
    from sparse_ops.gemv import _plan
    for K, N in ((3600, 40), (3200, 40)) if DEV == "cpu" else ((4096, 14336),):
        cfg, share = _plan(torch.empty(1, K, device=DEV), N, N, N, N)[1:]
        p2 = 1 << (share - 1).bit_length()
        assert cfg["WINDOWS"] == 0 and share > 1024
        assert cfg["CHUNK"] == (p2 if p2 <= 4096 and share >= 7 / 8 * p2 else 1024)
        assert DEV != "cpu" or cfg["CHUNK"] == (2048 if K == 3600 else 1024)
        for level in (0.0, 0.5, 0.9):
            check_single(1, K, [N], torch.bfloat16, [level], seed=K)


def test_list_scratch_rows_hold_their_segments_lists(monkeypatch):
    # Groups of neighbouring programs share a scratch row for their kept-channel list, keyed by segment and K range:
    # after a launch every row that was written holds exactly its segment's kept channels of its K range. Here one
    # group spans q, k and v (different thresholds). Read back after the launch, as on Triton's interpreter programs
    # run one after another: a row shared across segments would hold the last one's list, not mix within a launch.
    from sparse_ops.gemv import LIST_SHARERS, _launch, _plan
    K, segs = (1200, [32, 16, 16]) if DEV == "cpu" else (4096, [3840, 384, 384])
    N, ends = sum(segs), torch.tensor(segs).cumsum(0).tolist()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, K, generator=g).to(torch.bfloat16).to(DEV)
    wt = torch.randn(K, N, generator=g).to(torch.bfloat16).to(DEV)
    thr = quantile_thresholds(x, [0.9, 0.1, 0.5])
    cfg = _plan(x, N, N, ends[0], ends[1])[1]
    assert cfg["WINDOWS"] == 0
    scratch, empty = [], torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: scratch.append(empty(*a, **k)) or scratch[-1])
    _launch(x, wt, wt, N, N, thr, ends[0], ends[1], None)
    monkeypatch.undo()
    rows = next(t for t in scratch if t.dtype == torch.int32).cpu()
    assert rows.shape[0] == 3
    blocks = range(0, N, cfg["BLOCK_N"])  # each program's first column, in program order
    segment = [sum(c >= e for e in ends[:-1]) for c in blocks]
    share, xs, written = rows.shape[3], x[0].float().abs().cpu(), 0
    for grp in range(rows.shape[2]):
        members = set(segment[grp * LIST_SHARERS:(grp + 1) * LIST_SHARERS])
        for seg in members:
            for k in range(rows.shape[1]):
                lo, hi = k * share, min((k + 1) * share, K)
                want = torch.nonzero(xs[lo:hi] > thr[seg].item()).flatten().to(torch.int32) + lo
                assert torch.equal(rows[seg, k, grp, :want.numel()], want), (grp, seg, k)
        written += len(members) > 1
    assert written  # some group spans two segments


# a GPU lists only weights past 4096 x 4096 and splits K by the outputs' programs: N 16896 gives two shares there
@pytest.mark.parametrize("B,K,N,path", [(1, 200, 48, "windows"), (1, 2088, 32 if DEV == "cpu" else 16896, "listed"),
                                        (3, 200, 48, "tiles")])
def test_nothing_read_past_k(B, K, N, path):
    # K not a multiple of the shares, so the last split's share runs past K: batch 1's windows (K=200), its lists
    # (shares of 1056 channels, scanned in chunks of 1024: a count carried across chunks), a batch's tiles. Past
    # x's end lie inputs every threshold keeps, past the weights' NaN: a channel >= K read, listed or streamed shows.
    from sparse_ops.gemv import _plan, pick_config
    cfg = pick_config(B, K, 2 * N, (N,), torch.device(DEV))
    assert (cfg["WINDOWS"] > 0) == (path == "windows") and (cfg["BLOCK_B"] > 1) == (path == "tiles")
    if path == "listed":  # the single GEMV's shares: longer than one chunk of the scan, the last one past K
        share = _plan(torch.empty(B, K, device=DEV), N, N, 0, 0)[2]
        assert share > 1024 and K % share
    g = torch.Generator().manual_seed(K + B)
    x = torch.randn(B, K, generator=g).to(torch.bfloat16).to(DEV)
    wa, wb = ((torch.randn(K, N, generator=g) / K ** 0.5).to(torch.bfloat16).to(DEV) for _ in range(2))
    xp, wap, wbp = past_the_end(x, 100.0), past_the_end(wa, float("nan")), past_the_end(wb, float("nan"))
    for levels in ([0.0, 0.0], [0.4, 0.6]):
        thr = quantile_thresholds(x, levels)
        y = sparse_gemv_pair(xp, wap, wbp, thr)
        assert rel_err(y, sparse_gemv_pair_ref(x.double(), wa.double(), wb.double(), thr)) < TOL[torch.bfloat16]
        y = sparse_gemv(xp, wap, thr[:1], [N])
        assert rel_err(y, sparse_gemv_ref(x.double(), wa.double(), thr[:1], [N])) < TOL[torch.bfloat16]


# ---- GPU only ------------------------------------------------------------------------------------------
LLAMA_SHAPES = [(4096, 4096), (4096, 6144), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]  # (K, N)


@pytest.mark.gpu
@pytest.mark.parametrize("K,N", LLAMA_SHAPES)
@pytest.mark.parametrize("B", [1, 2, 8])
def test_llama_shapes_gpu(K, N, B):
    for dtype in (torch.bfloat16, torch.float16):
        for level in (0.0, 0.5, 0.9):
            check_single(B, K, [N], dtype, [level], seed=K + N + B)
    check_single(B, 4096, [4096, 1024, 1024], torch.bfloat16, [0.4, 0.5, 0.6], scaled=True)


@pytest.mark.gpu
@pytest.mark.parametrize("K,N", [(4096, 14336), (4096, 11008), (5120, 13824)])
def test_glu_llama_shapes_gpu(K, N):
    for dtype in (torch.bfloat16, torch.float16):
        for level in (0.0, 0.5, 0.9):
            check_glu(1, K, N, dtype, [level, level + 0.02], seed=K + N)
    check_glu(1, K, N, torch.bfloat16, [0.4, 0.5], scaled=True)


@pytest.mark.gpu
def test_shared_lists_keep_segments_apart_gpu():
    # groups of LIST_SHARERS neighbouring programs share a kept-channel list; here a group holds q's last column
    # blocks and k's first (q ends at block 30), whose thresholds differ: one slot for both would mix their lists
    from sparse_ops.gemv import LIST_SHARERS, _plan
    K = 4096
    cfg = _plan(torch.empty(1, K, device=DEV), 4608, 4608, 3840, 4224)[1]
    assert cfg["WINDOWS"] == 0 and (3840 // cfg["BLOCK_N"]) % LIST_SHARERS
    for seed in range(5):
        check_single(1, K, [3840, 384, 384], torch.bfloat16, [0.9, 0.1, 0.5], seed=seed)


@pytest.mark.gpu
def test_cuda_graph_replay_follows_threshold_changes():
    torch.manual_seed(0)
    K, N = 4096, 6144
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    wt = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    wa = torch.randn(K, 2048, device="cuda", dtype=torch.bfloat16)
    thr = torch.zeros(3, device="cuda")
    ends = [4096, 5120, 6144]

    def f(x):
        return torch.cat([sparse_ops.sparse_gemv(x, wt, thr, ends), sparse_ops.sparse_gemv_pair(x, wa, wa, thr[:2])], 1)

    torch._dynamo.utils.counters.clear()  # count this test's graphs only
    compiled = torch.compile(f, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        compiled(x)
    outs = []
    for level in (0.25, 0.5, 0.9, 0.0):
        thr.copy_(quantile_thresholds(x, [level, level + 0.05, level]))
        outs.append(compiled(x).clone())
        eager = f(x)
        assert (outs[-1].float() - eager.float()).abs().max().item() < 1e-2 * eager.float().abs().max().item()
    assert (outs[0] - outs[2]).abs().max() > 0  # the replays really followed the new thresholds
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 1


@pytest.mark.gpu
def test_compiled_mlp_runs_only_its_kernels():
    # norm (lists gate|up's channels) -> sparse_glu -> down, compiled: inductor must see that the kernels write only
    # their outputs; an input it took for written (a weight) would be copied around every call. Kernels: the
    # norm, the two GEMVs and the sum of down's partials with the residual.
    from torch.profiler import ProfilerActivity, profile
    D, N = 4096, 14336
    x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    parts = torch.randn(4, 1, D, device="cuda") / 8  # the o GEMV's split-K partials
    w = torch.ones(D, device="cuda", dtype=torch.bfloat16)
    w1, w3 = (torch.randn(D, N, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(2))
    w2 = torch.randn(N, D, device="cuda", dtype=torch.bfloat16) / 128
    thr = torch.tensor([0.5, 0.5, 0.02], device="cuda")

    def f(x):
        h, y, kept = sparse_ops.add_rmsnorm(x, parts, w, 1e-5, thr[:2])
        return h + sparse_gemv(sparse_glu(y, w1, w3, thr[:2], None, kept), w2, thr[2:], [D])

    compiled = torch.compile(f, fullgraph=True)
    assert rel_err(compiled(x), f(x)) < 1e-2
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        compiled(x)
        torch.cuda.synchronize()
    kernels = {e.key: e.count for e in prof.key_averages() if e.device_time_total > 0}
    assert kernels.pop("_add_rmsnorm_kernel") == 1 and kernels.pop("_sparse_gemv_kernel") == 2, kernels
    assert len(kernels) == 1, kernels


@pytest.mark.gpu
def test_compiled_split_k_sum_fuses_into_the_next_norm():
    # 8 or more split-K partials: traced as adds, the sum joins the norm's kernel (inductor keeps a sum(0) over
    # >= 8 elements as a kernel of its own, one more launch per op in decode).
    from torch.profiler import ProfilerActivity, profile
    from sparse_ops import gemv
    K, N = 14336, 1024  # 8 column blocks: the split is >= 8 on any GPU with 32+ SMs
    assert gemv.pick_config(1, K, N, (), torch.device("cuda"))["SPLIT_K"] >= 8
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    wt = torch.randn(K, N, device="cuda", dtype=torch.bfloat16) / 100
    thr = torch.tensor([0.6], device="cuda")
    h = torch.randn(1, N, device="cuda", dtype=torch.bfloat16)

    def f(x, h):
        y = sparse_ops.sparse_gemv(x, wt, thr, [N]) + h
        return y * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(y.dtype)

    compiled = torch.compile(f, fullgraph=True)
    assert (compiled(x, h).float() - f(x, h).float()).abs().max() < 0.1
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        compiled(x, h)
        torch.cuda.synchronize()
    kernels = [e.key for e in prof.key_averages() if e.device_time_total > 0]
    assert len(kernels) == 2 and "_sparse_gemv_kernel" in kernels, kernels
