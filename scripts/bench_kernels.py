"""Sparse GEMV kernel benchmark at Llama-2-7B / Llama-3-8B shapes, against cuBLAS in the same run.

    python scripts/bench_kernels.py [--batch 1,2,4,8] [--sparsity 0,0.25,0.4,0.5,0.65,0.9] [--json OUT]
    python scripts/bench_kernels.py --batch 1 --compiled_baseline   # + inductor's own dense GEMV (torch.compile)
    python scripts/bench_kernels.py --sweep     # try tile configs, print the best per shape (for pick_config)

Each op is captured in a CUDA graph (as decode runs it) cycling, in whole rounds of at least REPS calls, over enough
weight copies that L2 (50 MB) cannot hold the rows an op reads of them; the time is the median graph replay per call.
cuBLAS is timed the same way.
Bandwidth counts the bytes actually needed: kept weight rows (union over the batch) plus x and y. The op time
includes the split-K partial sum (separate small kernels here, fused into the next op in the compiled model);
the kernel column is the sparse kernel's own device time from torch.profiler.
"""
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import sparse_ops  # noqa: E402
from sparse_ops.gemv import _launch, num_sms, pick_config  # noqa: E402
from sparse_ops.norm import kept_list  # noqa: E402
from model import DTYPES  # noqa: E402

# (name, K = input features, N = output features); "fused" is gate and up (two N/2-wide weights) on one input, as
# the pair op (listing in the kernel) and, at batch 1, as decode runs it: the GLU op streaming the list that the
# MLP norm made (sparse_ops.add_rmsnorm; the list's cost, about 1 us, is in the norm) and applying silu(gate) * up.
SHAPES = [
    ("attn.o (7B/8B)", 4096, 4096),
    ("llama-3 wqkv", 4096, 6144),
    ("llama-2 gate|up", 4096, 11008),
    ("llama-2 down", 11008, 4096),
    ("llama-3 gate|up", 4096, 14336),
    ("llama-3 down", 14336, 4096),
    ("llama-2 gate+up fused", 4096, 2 * 11008),
    ("llama-3 gate+up fused", 4096, 2 * 14336),
    ("llama-2 gate+up GLU, listed", 4096, 2 * 11008),
    ("llama-3 gate+up GLU, listed", 4096, 2 * 14336),
]


def make_x(batch, K, sparsity, dtype, g):
    """Rows whose |x| falls below the returned threshold for `sparsity` of entries (per row, independently)."""
    x = torch.randn(batch, K, generator=g, device="cuda").to(dtype)
    thr = torch.quantile(x.abs().float().flatten(), sparsity).item() if sparsity > 0 else 0.0
    return x, thr


def bytes_needed(x: torch.Tensor, thr: float, N: int, glu: bool = False) -> tuple:
    """(the union density: the fraction of the K inputs that some row of x keeps, |x| > thr; the bytes a sparse op
    on a (K, N) weight needs: the weight rows of those inputs, plus x and y, which is N / 2 wide for the GLU's
    silu(gate) * up), in x's dtype."""
    union = (x.abs().float() > thr).any(0).float().mean().item()
    (batch, K), size = x.shape, x.element_size()
    return union, union * K * N * size + batch * (K + (N // 2 if glu else N)) * size


REPS = 20
MIN_DENSITY = 1 / 16  # copies sized for at most 93.75% sparsity: 90% takes 10x the copies of 0%, 99% would take 100x


def copies_for(t: torch.Tensor, density: float = 1.0) -> int:
    """Enough copies of a weight that cycling through them never hits in L2: 256 MB of what an op reads of them, the
    `density` share of each copy's rows (sized on the whole weight, a sparse op at 90% read 26-47 MB of all copies)."""
    read = t.numel() * t.element_size() * max(density, MIN_DENSITY)
    return max(2, math.ceil(256 * 2**20 / read))


def call_order(n_copies: int) -> list:
    """The copies that one timed graph (and the profiled run) calls, in order: whole rounds of at least REPS calls,
    so that back to back replays also read every other copy before one again (20 calls over 3 copies would
    re-read copy 0 after one other call)."""
    return [i % n_copies for i in range(n_copies * -(-REPS // n_copies))]


def time_us(fn, n_copies: int) -> float:
    """fn(i) runs the op on weight copy i. Median over 15 replays of a graph of call_order's calls, per call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i % n_copies)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    order = call_order(n_copies)
    with torch.cuda.graph(g):
        for i in order:
            fn(i)
    g.replay()
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(order))
    return sorted(times)[len(times) // 2]


def kernel_us(fn, n_copies: int, name: str) -> float:
    """Mean device time of the kernels whose name contains `name` (torch.profiler), per call: the op's own
    kernel without the split-K sum that the compiled model fuses into the next op."""
    from torch.profiler import ProfilerActivity, profile
    for i in range(-3, 0):  # the round's last copies: copy 0, profiled first, was read before all the others
        fn(i % n_copies)
    torch.cuda.synchronize()
    order = call_order(n_copies)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in order:
            fn(i)
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.key_averages() if name in e.key)
    return total / len(order)


def dense_linear(x, w):
    """--compiled_baseline's op: compiled with coordinate-descent tuning, as generate.py compiles decode, a one-row
    F.linear becomes inductor's own GEMV (a reduction kernel), not a cuBLAS call."""
    return F.linear(x, w)


def run(args):
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, K, N in SHAPES:
        glu = "GLU" in name
        fused = "fused" in name or glu
        w0 = torch.randn(N, K, generator=g, device="cuda").to(dtype)
        c = copies_for(w0, 1 - max(args.sparsity))  # a batch's union keeps more of the rows than one row's
        ws = [w0] + [w0.clone() for _ in range(c - 1)]   # row-major (N, K), what cuBLAS likes
        wts = [w.t().contiguous() for w in ws]            # (K, N): our layout
        pairs = [(wt[:, :N // 2].contiguous(), wt[:, N // 2:].contiguous()) for wt in wts] if fused else None
        for batch in args.batch:
            if glu and batch > 1:  # the list is one row's
                continue
            xd = torch.randn(batch, K, device="cuda", dtype=dtype)
            t_cublas = time_us(lambda i: F.linear(xd, ws[i]), c)
            t_compiled = None
            if args.compiled_baseline and batch == 1:
                torch._dynamo.reset()  # else past 8 shapes dynamo's recompile limit would fall back to eager
                lin = torch.compile(dense_linear, dynamic=False, options={"coordinate_descent_tuning": True})
                t_compiled = time_us(lambda i: lin(xd, ws[i]), c)
            for s in args.sparsity:
                x, thr = make_x(batch, K, s, dtype, g)
                thr_t = torch.tensor([thr, thr], device="cuda")
                if glu:
                    kept = kept_list(x, thr_t, None)
                    fn = lambda i: sparse_ops.sparse_glu(x, *pairs[i], thr_t, None, kept)  # noqa: E731
                elif fused:
                    fn = lambda i: sparse_ops.sparse_gemv_pair(x, *pairs[i], thr_t)  # noqa: E731
                else:
                    fn = lambda i: sparse_ops.sparse_gemv(x, wts[i], thr_t[:1], [N])  # noqa: E731
                t = time_us(fn, c)
                t_kernel = kernel_us(fn, c, "_sparse_gemv_kernel")
                union, need = bytes_needed(x, thr, N, glu)
                rows.append(dict(shape=name, K=K, N=N, batch=batch, sparsity=s, union_density=round(union, 4),
                                 sparse_us=round(t, 2), kernel_us=round(t_kernel, 2), cublas_us=round(t_cublas, 2),
                                 compiled_us=None if t_compiled is None else round(t_compiled, 2),
                                 tb_s_needed=round(need / t / 1e6, 3), kernel_tb_s=round(need / t_kernel / 1e6, 3),
                                 speedup=round(t_cublas / t, 3), ideal_speedup=round(1 / max(union, 1e-3), 2)))
                r = rows[-1]
                print(f"{name:24s} B={batch} s={s:.2f} union_keep={union:.3f} sparse={t:7.2f}us kernel={t_kernel:7.2f}us "
                      f"cuBLAS={t_cublas:7.2f}us{'' if t_compiled is None else f' compiled={t_compiled:7.2f}us'} "
                      f"x{r['speedup']:.2f} {r['tb_s_needed']:.2f}TB/s", flush=True)
    return rows


def sweep(args):
    """Time many tile configs per shape/batch/sparsity; print the best and how the default compares."""
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    n_sm = num_sms(torch.device("cuda"))
    out = []
    cases = [(4096, (14336,)), (14336, (4096,)), (4096, (4096,)), (4096, (4096, 1024, 1024)), (4096, (11008,)),
             (4096, (14336, 14336))]  # (K, segment sizes)
    for K, segs in cases:
        N = sum(segs)
        ends = torch.tensor(segs).cumsum(0).tolist()
        seg1, seg2 = (ends + [N, N])[:2]
        wt0 = torch.randn(K, N, generator=g, device="cuda").to(dtype)
        c = copies_for(wt0, 1 - max(args.sparsity))
        wts = [wt0] + [wt0.clone() for _ in range(c - 1)]
        ws = [w.t().contiguous() for w in wts]
        for batch in args.batch:
            xd = torch.randn(batch, K, device="cuda", dtype=dtype)
            t_cublas = time_us(lambda i: F.linear(xd, ws[i]), c)
            # Tiles near the defaults (wider searches: docs/benchmarks.md "Tile sweep"), with every split count
            # that gives 0.5-4 programs per SM: the program count against the SM count is what moves the time.
            # (BLOCK_B, BLOCK_N, BLOCK_K, warps, stages, windows instead of a list)
            tiles = [(1, 128, 128, 4, 3, False), (1, 128, 64, 4, 3, False), (1, 256, 64, 4, 3, False),
                     (1, 64, 128, 8, 3, True), (1, 64, 128, 4, 3, True)] if batch == 1 else \
                [(16, 256, 32, 4, 3, False), (16, 128, 32, 4, 3, False)]
            for s in args.sparsity:
                x, thr = make_x(batch, K, s, dtype, g)
                thr_t = torch.full((len(segs),), thr, device="cuda")
                default = pick_config(batch, K, N, tuple(ends[:-1]), x.device)
                t_def = time_us(lambda i: _launch(x, wts[i], wts[i], N, N, thr_t, seg1, seg2, None, None, default), c)
                results, seen = [], set()
                for bb, bn, bk, nw, ns, win in tiles:
                    if any(e % bn for e in ends[:-1]):  # a column block must stay inside one segment
                        continue
                    n_blocks = triton.cdiv(N, bn)
                    for sk in range(1, 129):
                        if not n_sm // 2 <= n_blocks * sk <= 4 * n_sm or K // sk < bk:
                            continue
                        # windows: a power of two, which sets the split (as sparse_ops.pick_config; up to 16
                        # here, beyond its cap of 8)
                        w = min(16, triton.next_power_of_2(triton.cdiv(triton.cdiv(K, sk), bk))) if win else 0
                        cfg = dict(BLOCK_B=bb, BLOCK_K=bk, BLOCK_N=bn, SPLIT_K=triton.cdiv(K, w * bk) if w else sk,
                                   num_warps=nw, num_stages=ns, WINDOWS=w)
                        if tuple(cfg.values()) in seen:
                            continue
                        seen.add(tuple(cfg.values()))
                        try:
                            t = time_us(lambda i: _launch(x, wts[i], wts[i], N, N, thr_t, seg1, seg2, None, None,
                                                          cfg), c)
                        except Exception as e:  # e.g. out of shared memory or registers for big tiles
                            print(f"  skip {cfg}: {type(e).__name__}", flush=True)
                            break
                        results.append((t, cfg))
                results.sort(key=lambda r: r[0])
                union = (x.abs().float() > thr).any(0).float().mean().item()
                need = union * K * N * wt0.element_size()
                print(f"K={K} segs={segs} B={batch} s={s:.2f} cuBLAS={t_cublas:7.2f}us default={t_def:7.2f}us "
                      f"{default}", flush=True)
                for t, cfg in results[:6]:
                    print(f"    {t:7.2f}us {need / t / 1e6:5.2f}TB/s {cfg}", flush=True)
                out.append(dict(K=K, segs=list(segs), batch=batch, sparsity=s, cublas_us=t_cublas, default_us=t_def,
                                top=[dict(us=t, **cfg) for t, cfg in results[:12]]))
    return out


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=cli.positive_ints, default="1,2,4,8",
                   help="comma-separated batch sizes (decode rows), each 1-8")
    p.add_argument("--sparsity", type=cli.sparsities, default="0,0.25,0.4,0.5,0.65,0.9",
                   help="comma-separated input sparsities in [0, 1)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="weight and activation dtype")
    p.add_argument("--compiled_baseline", action="store_true",
                   help="also time the dense GEMV that torch.compile makes at batch 1 (inductor's own, with the "
                        "coordinate-descent tuning of generate.py's compiled decode; a compile per shape)")
    p.add_argument("--sweep", action="store_true", help="search tile configs instead of the standard table")
    p.add_argument("--json", type=cli.out_file, help="write all rows as JSON here")
    args = p.parse_args(argv)
    if max(args.batch) > sparse_ops.MAX_BATCH:
        p.error(f"--batch values must be in 1..{sparse_ops.MAX_BATCH}")
    if args.sweep and args.compiled_baseline:
        p.error("--compiled_baseline is a column of the standard table, not of --sweep")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    rows = sweep(args) if args.sweep else run(args)
    if args.json:
        args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    cli.run(main)
