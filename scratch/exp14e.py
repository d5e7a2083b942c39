"""Session-14 experiment (throwaway): the batch-1 loop with weights one step ahead (PF=4) against the kept loop
(PF=0 here), 128- and 64-row steps."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_kernels import copies_for, time_us  # noqa: E402
from sparse_ops.norm import kept_list  # noqa: E402
from sparse_ops.gemv import pick_config  # noqa: E402
import gemv_var as gv  # noqa: E402

dev = torch.device("cuda")
g = torch.Generator(device="cuda").manual_seed(0)
dt = torch.bfloat16
SHAPES = [("glu listed 4096->2x14336", 4096, [14336, 28672], "glu"), ("glu listed 4096->2x11008", 4096, [11008, 22016], "glu"),
          ("down 14336->4096", 14336, [4096], "gemv"), ("qkv 4096->6144", 4096, [4096, 5120, 6144], "gemv")]
VARIANTS = [(0, 128), (0, 64), (4, 64), (4, 128)]
rows = []
for name, K, ends, kind in SHAPES:
    N = ends[-1]
    wt0 = torch.randn(K, N, generator=g, device="cuda").to(dt)
    c = copies_for(wt0)
    wts = [wt0] + [wt0.clone() for _ in range(c - 1)]
    if kind == "glu":
        halves = [(w[:, :N // 2].contiguous(), w[:, N // 2:].contiguous()) for w in wts]
        del wts
    for s in (0.0, 0.4, 0.5, 0.65):
        x = torch.randn(1, K, generator=g, device="cuda").to(dt)
        thr = torch.quantile(x.abs().float().flatten(), s).item() if s > 0 else 0.0
        need = (x.abs().float() > thr).float().mean().item() * K * N * 2
        res = {}
        for pf, bk in VARIANTS:
            if kind == "glu":
                thr_t = torch.tensor([thr, thr], device="cuda")
                kept = kept_list(x, thr_t, None)
                cfg = pick_config(1, K, N, (), dev)
                cfg["BLOCK_K"] = bk
                fn = lambda i: gv._launch(x, *halves[i], N // 2, N, thr_t, N // 2, N, None, kept, cfg, glu=True, pf=pf)
            else:
                thr_t = torch.full((len(ends),), thr, device="cuda")
                seg1, seg2 = (ends[:-1] + [N, N])[:2]
                cfg = pick_config(1, K, N, tuple(ends[:-1]), dev)
                cfg["BLOCK_K"] = bk
                fn = lambda i: gv._launch(x, wts[i], wts[i], N, N, thr_t, seg1, seg2, None, None, cfg, pf=pf)
            try:
                res[f"pf{pf}_bk{bk}"] = round(time_us(fn, c), 2)
            except Exception as e:
                res[f"pf{pf}_bk{bk}"] = None
                print("fail", pf, bk, type(e).__name__, str(e)[:200], flush=True)
        line = " ".join(f"{k}={v}" for k, v in res.items())
        print(f"{name:26s} s={s:.2f} {line}  TB/s(best)={need / min(v for v in res.values() if v) / 1e6:.2f}", flush=True)
        rows.append(dict(shape=name, sparsity=s, need_bytes=need, **res))
    torch.cuda.empty_cache()
Path(os.environ.get("OUT", "/tmp"), "exp14e.json").write_text(json.dumps(rows, indent=1))
