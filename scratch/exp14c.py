"""Session-14 experiment (throwaway): the attention norm listing qkv's channels (one union list, our norm kernel)
against inductor's norm + the qkv GEMV listing them itself. Llama-3-8B shapes, batch 1, graph-timed pairs."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_kernels import copies_for, time_us  # noqa: E402
import sparse_ops  # noqa: E402

dt = torch.bfloat16
D, NQKV = 4096, 6144
g = torch.Generator(device="cuda").manual_seed(0)
res = torch.randn(1, D, device="cuda", dtype=dt)
nw = torch.rand(D, device="cuda", dtype=dt) + 0.5
parts = torch.randn(8, 1, D, device="cuda") / 3


def ind_norm(x, p):
    y = p[0]
    for i in range(1, p.shape[0]):
        y = y + p[i]
    h = x + y.to(x.dtype)
    hf = h.float()
    return h, (nw.float() * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5))).to(x.dtype)


cn = torch.compile(ind_norm)
wt0 = torch.randn(D, NQKV, generator=g, device="cuda").to(dt)
c = copies_for(wt0)
wts = [wt0] + [wt0.clone() for _ in range(c - 1)]
ends = [4096, 5120, 6144]
rows = []
_, y0 = ind_norm(res, parts)
for s in (0.4, 0.5):
    t = torch.quantile(y0.abs().float().flatten(), s).item()
    thr = torch.tensor([t, t, t], device="cuda")

    def a(i):
        _, y = cn(res, parts)
        return sparse_ops.sparse_gemv(y, wts[i], thr, ends, reduce=False)

    def b(i):
        _, y, kept = sparse_ops.add_rmsnorm(res, parts, nw, 1e-5, thr, None)
        return sparse_ops.sparse_gemv(y, wts[i], thr, ends, reduce=False, kept=kept)

    def b1(i):  # the list once for all three (the thresholds are equal here)
        _, y, kept = sparse_ops.add_rmsnorm(res, parts, nw, 1e-5, thr[:1], None)
        return sparse_ops.sparse_gemv(y, wts[i], thr, ends, reduce=False, kept=kept)

    r = dict(sparsity=s, inductor_norm_then_self_listing=round(time_us(a, c), 2),
             our_norm_3_thresholds_listed=round(time_us(b, c), 2), our_norm_1_threshold_listed=round(time_us(b1, c), 2),
             inductor_norm_alone=round(time_us(lambda i: cn(res, parts), c), 2),
             our_norm_alone=round(time_us(lambda i: sparse_ops.add_rmsnorm(res, parts, nw, 1e-5, thr, None), c), 2))
    rows.append(r)
    print(r, flush=True)
Path(os.environ.get("OUT", "/tmp"), "exp14c.json").write_text(json.dumps(rows, indent=1))
