"""Session-12 experiment: fused add+RMSNorm (+ kept lists) against inductor's norm, alone and with the next GEMV."""
import json, os, sys
from pathlib import Path
import torch, triton
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts"))
from bench_kernels import copies_for, time_us  # noqa
import sparse_ops  # noqa

torch.manual_seed(0)
D, eps, dt = 4096, 1e-5, torch.bfloat16
x = torch.randn(1, D, device="cuda", dtype=dt)
w = torch.rand(D, device="cuda", dtype=dt) + 0.5
res = {}


def inductor_norm(parts, x, w):
    y = parts[0]
    for i in range(1, parts.shape[0]):
        y = y + parts[i]
    h = x + y.to(dt)
    hf = h.float()
    return h, (w.float() * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps))).to(dt)


comp = torch.compile(inductor_norm, fullgraph=True)
for n_parts in (1, 8):
    parts = torch.randn(n_parts, 1, D, device="cuda", dtype=torch.float32 if n_parts > 1 else dt)
    comp(parts, x, w)
    r = {"inductor": time_us(lambda i: comp(parts, x, w), 1),
         "ours_no_lists": time_us(lambda i: sparse_ops.add_rmsnorm(x, parts, w, eps), 1)}
    for n_seg in (1, 2, 3):
        thr = torch.full((n_seg,), 0.7, device="cuda")
        r[f"ours_{n_seg}_lists"] = time_us(lambda i: sparse_ops.add_rmsnorm(x, parts, w, eps, thr), 1)
    res[f"parts{n_parts}"] = {k: round(v, 2) for k, v in r.items()}
    print(n_parts, res[f"parts{n_parts}"], flush=True)

# norm + the GEMV that consumes it, as in a decode layer: 8 partials in, 50% kept
parts = torch.randn(8, 1, D, device="cuda", dtype=torch.float32)
y0 = sparse_ops.add_rmsnorm(x, parts, w, eps)[1]
t50 = torch.quantile(y0.abs().float().flatten(), 0.5).item()
for name, n_seg, shapes in (("qkv", 3, [(D, 6144)]), ("gate_up", 2, [(D, 14336), (D, 14336)])):
    wts = [torch.randn(K, N, device="cuda", dtype=dt) / 64 for K, N in shapes]
    c = copies_for(torch.cat([t.flatten() for t in wts]))
    copies = [wts] + [[t.clone() for t in wts] for _ in range(c - 1)]
    thr = torch.full((n_seg,), t50, device="cuda")
    ends = [4096, 5120, 6144]

    def gemv(i, y, kept):
        if name == "qkv":
            return sparse_ops.sparse_gemv(y, copies[i][0], thr, ends, reduce=False, kept=kept)
        return sparse_ops.sparse_gemv_pair(y, copies[i][0], copies[i][1], thr, kept=kept)

    def before(i):  # session 11: inductor's norm, the GEMV lists its channels
        _, y = comp(parts, x, w)
        return gemv(i, y, None)

    def after(i):  # the norm lists them
        _, y, kept = sparse_ops.add_rmsnorm(x, parts, w, eps, thr)
        return gemv(i, y, kept)

    def norm_only_ours(i):  # our norm without lists, the GEMV lists
        _, y, _ = sparse_ops.add_rmsnorm(x, parts, w, eps)
        return gemv(i, y, None)

    r = {"inductor_norm+gemv_listing": time_us(before, c), "norm_lists+gemv_listed": time_us(after, c),
         "ours_norm+gemv_listing": time_us(norm_only_ours, c)}
    res[name] = {k: round(v, 2) for k, v in r.items()}
    print(name, res[name], flush=True)
json.dump(dict(gpu=torch.cuda.get_device_name(), rows=res), open(os.environ.get("OUT", "/tmp") + "/exp_norm.json", "w"), indent=1)
