import sys, json, itertools
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch, triton
import torch.nn.functional as F
from sparse_ops.gemv import _launch
from scripts.bench_kernels import time_us, copies_for, make_x
dtype = torch.bfloat16
g = torch.Generator(device="cuda").manual_seed(0)
n_sm = 132
tiles = [(0, 128, 128, 4), (0, 1024, 16, 4)]
for v in (1, 2):
    for bn, nw in [(512, 2), (1024, 2), (1024, 4), (2048, 2), (2048, 4), (2048, 8)]:
        for bk in (8, 16, 32):
            tiles.append((v, bn, bk, nw))
res = []
for K, N in [(4096, 14336), (14336, 4096), (4096, 4096)]:
    wt0 = torch.randn(K, N, generator=g, device="cuda").to(dtype)
    c = copies_for(wt0)
    wts = [wt0] + [wt0.clone() for _ in range(c - 1)]
    for s in (0.0, 0.5, 0.9):
        x, thr = make_x(1, K, s, dtype, g)
        thr_t = torch.tensor([thr], device="cuda")
        need = (x.abs().float() > thr).float().mean().item() * K * N * 2
        rows = []
        for v, bn, bk, nw in tiles:
            for sk in (1, 2, 4, 8, 16, 32, 64, 128):
                P = triton.cdiv(N, bn) * sk
                if not n_sm <= P <= 8 * n_sm or K // sk < bk:
                    continue
                cfg = dict(BLOCK_B=1, BLOCK_K=bk, BLOCK_N=bn, SPLIT_K=sk, num_warps=nw, num_stages=1, VARIANT=v)
                try:
                    t = time_us(lambda i: _launch(x, wts[i], wts[i], N, N, thr_t, N, N, None, cfg), c)
                except Exception as e:
                    print("skip", cfg, type(e).__name__, flush=True); break
                rows.append((t, cfg))
        rows.sort(key=lambda r: r[0])
        print(f"K={K} N={N} s={s}", flush=True)
        for t, cfg in rows[:8]:
            print(f"   {t:7.2f}us {need/t/1e6:5.2f}TB/s {cfg}", flush=True)
        for v in (0, 1, 2):
            b = [r for r in rows if r[1]["VARIANT"] == v][:1]
            if b: print(f"   best V{v}: {b[0][0]:7.2f}us {b[0][1]}", flush=True)
        res.append(dict(K=K, N=N, s=s, top=[dict(us=t, **c_) for t, c_ in rows[:30]]))
json.dump(res, open(sys.argv[1], "w"), indent=1)
