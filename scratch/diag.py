"""Where does the time go? Kernel durations via torch.profiler; phase-2-only and plain streaming kernels."""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch, triton, triton.language as tl
import torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
from sparse_ops.gemv import _launch, pick_config, _sparse_gemv_kernel
from scripts.bench_kernels import time_us, copies_for, make_x

@triton.jit
def _gather_only(x_ptr, w_ptr, idx_ptr, cnt_ptr, out_ptr, K, N, K_PER_SPLIT, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # phase 2 only: the kept list of each K range precomputed (idx sorted, cnt per split)
    pid_n = tl.program_id(0); pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < N
    count = tl.load(cnt_ptr + pid_k)
    base = idx_ptr + pid_k * K_PER_SPLIT
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, count, BLOCK_K):
        jm = (j0 + rk) < count
        rows = tl.load(base + j0 + rk, mask=jm, other=0)
        w = tl.load(w_ptr + rows[:, None] * N + cols[None, :], mask=jm[:, None] & n_mask[None, :], other=0.0)
        xv = tl.load(x_ptr + rows, mask=jm, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * xv[:, None]
    tl.store(out_ptr + pid_k * N + cols, tl.sum(acc, axis=0), mask=n_mask)

@triton.jit
def _stream(w_ptr, out_ptr, K, N, K_PER_SPLIT, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0); pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * K_PER_SPLIT, (pid_k + 1) * K_PER_SPLIT, BLOCK_K):
        acc += tl.load(w_ptr + (k0 + rk)[:, None] * N + cols[None, :]).to(tl.float32)
    tl.store(out_ptr + pid_k * N + cols, tl.sum(acc, axis=0))

def kernel_times(fn, n):
    for i in range(3): fn(i % n)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(30): fn(i % n)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        tot = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        if tot > 0 and e.count:
            out[e.key[:40]] = round(tot / e.count, 2)
    return out

dtype = torch.bfloat16
g = torch.Generator(device="cuda").manual_seed(0)
for K, N in [(4096, 14336), (14336, 4096), (4096, 4096)]:
    wt0 = torch.randn(K, N, generator=g, device="cuda").to(dtype)
    c = copies_for(wt0)
    wts = [wt0] + [wt0.clone() for _ in range(c - 1)]
    print(f"=== K={K} N={N} copies={c}", flush=True)
    # plain streaming read of the whole weight with the same tiling (BN=128, BK=128)
    for bn, bk, sk, nw in [(128, 128, 2 if N > 8000 else 8, 4), (1024, 16, 16 if N > 8000 else 64, 4), (512, 32, 8 if N > 8000 else 32, 8)]:
        kps = K // sk
        o = torch.empty(sk, N, device="cuda")
        grid = (triton.cdiv(N, bn), sk)
        t = time_us(lambda i: _stream[grid](wts[i], o, K, N, kps, BLOCK_K=bk, BLOCK_N=bn, num_warps=nw, num_stages=3), c)
        print(f"stream bn={bn} bk={bk} split={sk} nw={nw}: {t:.2f}us {K*N*2/t/1e6:.2f}TB/s", flush=True)
    for s in (0.0, 0.5, 0.9, 0.999):
        x, thr = make_x(1, K, s, dtype, g)
        thr_t = torch.tensor([thr], device="cuda")
        cfg = pick_config(1, K, (N,), x.device)
        t_op = time_us(lambda i: _launch(x, wts[i], wts[i], N, N, thr_t, N, N, None, cfg), c)
        kt = kernel_times(lambda i: _launch(x, wts[i], wts[i], N, N, thr_t, N, N, None, cfg), c)
        keep = (x.abs().float() > thr)[0]
        need = keep.float().mean().item() * K * N * 2
        # phase 2 only
        sk = cfg["SPLIT_K"]; kps = K // sk
        kidx = keep.view(sk, kps)
        cnt = kidx.sum(1).int()
        idx = torch.zeros(sk, kps, dtype=torch.int32, device="cuda")
        for j in range(sk):
            ids = torch.nonzero(kidx[j]).flatten().int() + j * kps
            idx[j, :len(ids)] = ids
        o = torch.empty(sk, N, device="cuda")
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), sk)
        t_g = time_us(lambda i: _gather_only[grid](x, wts[i], idx, cnt, o, K, N, kps, BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], num_warps=4, num_stages=3), c)
        print(f"s={s}: op(graph)={t_op:.2f}us ({need/t_op/1e6:.2f}TB/s) phase2-only(graph)={t_g:.2f}us ({need/t_g/1e6:.2f}TB/s) kernels={kt}", flush=True)
