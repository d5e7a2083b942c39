"""Session-14 experiment (throwaway): batch-1 GEMV loop variants and a two-stage greedy argmax, on the GPU."""
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_kernels import copies_for, time_us  # noqa: E402
from sparse_ops.norm import kept_list  # noqa: E402
from sparse_ops.gemv import pick_config  # noqa: E402
import gemv_var_a as gv  # noqa: E402

out = {}
dev = torch.device("cuda")
g = torch.Generator(device="cuda").manual_seed(0)
dt = torch.bfloat16
SHAPES = [("qkv 4096->6144", 4096, [4096, 5120, 6144], "gemv"), ("o 4096->4096", 4096, [4096], "gemv"),
          ("down 14336->4096", 14336, [4096], "gemv"), ("gate 4096->14336", 4096, [14336], "gemv"),
          ("glu listed 4096->2x14336", 4096, [14336, 28672], "glu")]
VARIANTS = [(0, 4), (1, 4), (2, 4), (0, 8), (1, 8)]
rows = []
for name, K, ends, kind in SHAPES:
    N = ends[-1]
    wt0 = torch.randn(K, N, generator=g, device="cuda").to(dt)
    c = copies_for(wt0)
    wts = [wt0] + [wt0.clone() for _ in range(c - 1)]
    if kind == "glu":
        halves = [(w[:, :N // 2].contiguous(), w[:, N // 2:].contiguous()) for w in wts]
        del wts
    ws = [w.t().contiguous() for w in (wts if kind == "gemv" else [torch.cat(h, 1) for h in halves[:1]])]
    xd = torch.randn(1, K, device="cuda", dtype=dt)
    w_rm = [w.t().contiguous() for w in (wts if kind == "gemv" else [torch.cat(h, 1) for h in halves])]
    t_cublas = time_us(lambda i: F.linear(xd, w_rm[i]), c)
    del w_rm
    for s in (0.0, 0.4, 0.5, 0.65):
        x = torch.randn(1, K, generator=g, device="cuda").to(dt)
        thr = torch.quantile(x.abs().float().flatten(), s).item() if s > 0 else 0.0
        need = (x.abs().float() > thr).float().mean().item() * K * N * 2
        res = {}
        for pf, nw in VARIANTS:
            if kind == "glu":
                thr_t = torch.tensor([thr, thr], device="cuda")
                kept = kept_list(x, thr_t, None)
                cfg = pick_config(1, K, N, (), dev)
                cfg["num_warps"] = nw
                fn = lambda i: gv._launch(x, *halves[i], N // 2, N, thr_t, N // 2, N, None, kept, cfg, glu=True, pf=pf)
            else:
                thr_t = torch.full((len(ends),), thr, device="cuda")
                seg1, seg2 = (ends[:-1] + [N, N])[:2]
                cfg = pick_config(1, K, N, tuple(ends[:-1]), dev)
                cfg["num_warps"] = nw
                fn = lambda i: gv._launch(x, wts[i], wts[i], N, N, thr_t, seg1, seg2, None, None, cfg, pf=pf)
            res[f"pf{pf}_w{nw}"] = round(time_us(fn, c), 2)
        # correctness of each variant against the current kernel's output (same inputs)
        line = " ".join(f"{k}={v:6.2f}" for k, v in res.items())
        print(f"{name:26s} s={s:.2f} cuBLAS={t_cublas:6.2f} {line}  TB/s(best)={need / min(res.values()) / 1e6:.2f}",
              flush=True)
        rows.append(dict(shape=name, sparsity=s, cublas_us=round(t_cublas, 2), need_bytes=need, **res))
    del wt0
    torch.cuda.empty_cache()
out["gemv"] = rows

# greedy argmax over Llama-3's vocabulary, as decode_one_token runs it (with the finite check)
def one_stage(l):
    lf = l.float()
    return torch.argmax(lf, dim=-1, keepdim=True), torch.isfinite(lf).all()

def two_stage(l, C=1024):
    lf = l.float()
    B, V = lf.shape
    G = -(-V // C)
    v, i = F.pad(lf, (0, G * C - V), value=float("-inf")).view(B, G, C).max(dim=-1)
    gi = v.argmax(dim=-1, keepdim=True)
    return gi * C + i.gather(-1, gi), torch.isfinite(lf).all()

logits = [torch.randn(1, 128256, device="cuda", dtype=dt) for _ in range(4)]
am = {}
for nm, f in (("one_stage", one_stage), ("two_stage_1024", two_stage),
              ("two_stage_512", lambda l: two_stage(l, 512)), ("two_stage_2048", lambda l: two_stage(l, 2048))):
    cf = torch.compile(f)
    for l in logits:
        assert torch.equal(cf(l)[0], one_stage(l)[0]), nm
    am[nm] = round(time_us(lambda i: cf(logits[i]), 4), 2)
print("argmax:", am, flush=True)
out["argmax"] = am
Path(os.environ.get("OUT", "/tmp"), "exp14.json").write_text(json.dumps(out, indent=1))
