"""Session-14 experiment (throwaway): launch settings of the listing add+RMSNorm kernel (8 fp32 partials of 4096,
one or two thresholds), graph-timed, against inductor's norm without a list."""
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_kernels import time_us  # noqa: E402
from sparse_ops.norm import GROUP, _add_rmsnorm_kernel, add_rmsnorm_ref  # noqa: E402

dt = torch.bfloat16
D = 4096
res = torch.randn(1, D, device="cuda", dtype=dt)
nw = torch.rand(D, device="cuda", dtype=dt) + 0.5
parts = torch.randn(8, 1, D, device="cuda") / 3
h = torch.empty_like(res)
y = torch.empty_like(res)
kept = torch.empty((1, D + D // GROUP + 1), device="cuda", dtype=torch.int32)
rows = []
for s in (0.4, 0.5):
    _, y0, _ = add_rmsnorm_ref(res, parts, nw, 1e-5)
    t = torch.quantile(y0.abs().float().flatten(), s).item()
    thr = torch.tensor([t, t * 1.1], device="cuda")
    want = add_rmsnorm_ref(res, parts, nw, 1e-5, thr, None)
    for slice_d in (256, 512, 1024, 4096):
        for nw_ in (4, 8, 16, 32):
            def f(i, slice_d=slice_d, nw_=nw_):
                _add_rmsnorm_kernel[(1, triton.cdiv(D, slice_d))](
                    parts, res, nw, h, y, thr, nw, kept, parts.stride(0), D, 1e-5, slice_d,
                    N_PARTS=8, N_SEG=2, HAS_SCALE=False, BLOCK_D=4096, GROUP=GROUP, num_warps=nw_)
            f(0)
            torch.cuda.synchronize()
            ok = torch.equal(kept, want[2]) and torch.equal(y, want[1])
            r = dict(sparsity=s, slice=slice_d, num_warps=nw_, us=round(time_us(f, 1), 2), matches_reference=ok)
            rows.append(r)
            print(r, flush=True)
Path(os.environ.get("OUT", "/tmp"), "exp14d.json").write_text(json.dumps(rows, indent=1))
