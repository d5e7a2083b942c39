import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from sparse_ops.gemv import _launch, pick_config
from scripts.bench_kernels import time_us, copies_for, make_x, kernel_us
dtype = torch.bfloat16
g = torch.Generator(device="cuda").manual_seed(0)
for K, N in [(4096, 14336), (14336, 4096), (4096, 4096)]:
    wt0 = torch.randn(K, N, generator=g, device="cuda").to(dtype)
    c = copies_for(wt0)
    wts = [wt0] + [wt0.clone() for _ in range(c - 1)]
    for s in (0.0, 0.5, 0.9):
        x, thr = make_x(1, K, s, dtype, g)
        thr_t = torch.tensor([thr], device="cuda")
        cfgs = [pick_config(1, K, (N,), x.device)]
        for bn in (32, 64):
            for bk in (64, 128, 256):
                for nw in (2, 4):
                    cfgs.append(dict(BLOCK_B=1, BLOCK_K=bk, BLOCK_N=bn, SPLIT_K=1, num_warps=nw, num_stages=3))
        out = []
        for cfg in cfgs:
            fn = lambda i: _launch(x, wts[i], wts[i], N, N, thr_t, N, N, None, cfg)
            try:
                out.append((time_us(fn, c), kernel_us(fn, c, "_sparse_gemv"), cfg))
            except Exception as e:
                print("skip", cfg, type(e).__name__)
        d = out[0]
        best = min(out[1:], key=lambda r: r[0])
        print(f"K={K} N={N} s={s}: default op {d[0]:.2f} kernel {d[1]:.2f} | best split1 op {best[0]:.2f} kernel {best[1]:.2f} {best[2]}", flush=True)
