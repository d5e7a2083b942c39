"""Session-14 experiment (throwaway): fewer split-K partials for the 4096-wide GEMVs (o, down) against the cost of
the norm that reads them (ours with the list after o; inductor's after down)."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_kernels import copies_for, time_us  # noqa: E402
import sparse_ops  # noqa: E402
from sparse_ops.gemv import _launch, pick_config  # noqa: E402

dev = torch.device("cuda")
g = torch.Generator(device="cuda").manual_seed(0)
dt = torch.bfloat16
D = 4096
res = torch.randn(1, D, device="cuda", dtype=dt)
nw = torch.rand(D, device="cuda", dtype=dt) + 0.5
thr2 = torch.tensor([0.6, 0.6], device="cuda")


def ind_norm(x, parts):
    y = parts[0]
    for i in range(1, parts.shape[0]):
        y = y + parts[i]
    h = x + y.to(x.dtype)
    hf = h.float()
    return h, (nw.float() * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5))).to(x.dtype)


rows = []
for name, K in (("o 4096->4096 + our norm (list)", 4096), ("down 14336->4096 + inductor norm", 14336)):
    wt0 = torch.randn(K, D, generator=g, device="cuda").to(dt)
    c = copies_for(wt0)
    wts = [wt0] + [wt0.clone() for _ in range(c - 1)]
    for s in (0.4, 0.5):
        x = torch.randn(1, K, generator=g, device="cuda").to(dt)
        thr = torch.tensor([torch.quantile(x.abs().float().flatten(), s).item()], device="cuda")
        for bn, split in ((128, 8), (64, 4), (64, 8), (128, 4), (64, 6), (128, 6)):
            cfg = pick_config(1, K, D, (), dev)
            cfg.update(BLOCK_N=bn, SPLIT_K=split)
            gemv = lambda i: _launch(x, wts[i], wts[i], D, D, thr, D, D, None, None, cfg)  # noqa: E731
            parts = gemv(0)
            if K == 4096:
                norm = lambda p: sparse_ops.add_rmsnorm(res, p, nw, 1e-5, thr2, None)  # noqa: E731
            else:
                cn = torch.compile(ind_norm)
                norm = lambda p: cn(res, p)  # noqa: E731
            t_g = time_us(gemv, c)
            t_n = time_us(lambda i: norm(parts), c)
            t_both = time_us(lambda i: norm(gemv(i)), c)
            r = dict(shape=name, sparsity=s, block_n=bn, split=parts.shape[0], gemv_us=round(t_g, 2),
                     norm_us=round(t_n, 2), both_us=round(t_both, 2))
            rows.append(r)
            print(r, flush=True)
    del wts, wt0
    torch.cuda.empty_cache()
Path(os.environ.get("OUT", "/tmp"), "exp14b.json").write_text(json.dumps(rows, indent=1))
