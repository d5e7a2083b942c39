"""Session-12 experiment: software-pipelined batch-1 listed-row GEMV variants against the kept kernel and cuBLAS."""
import json, os, sys, time
from pathlib import Path
import torch, torch.nn.functional as F, triton
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts")); sys.path.insert(0, str(ROOT / "scratch"))
from bench_kernels import copies_for, make_x, time_us  # noqa
from sparse_ops.gemv import _launch, num_sms  # noqa
from exp_kernels import gemv_b1  # noqa

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 6144), (4096, 28672)]  # (K, N)
VARIANTS = [  # (mode, BLOCK_K, BLOCK_N, STAGES, num_warps, programs per SM)
    (0, 128, 128, 1, 4, 2), (0, 128, 128, 3, 4, 2), (0, 128, 128, 4, 4, 2), (0, 64, 128, 4, 4, 2), (0, 64, 128, 4, 4, 3),
    (0, 64, 128, 5, 4, 3), (1, 128, 128, 5, 4, 2), (1, 128, 128, 5, 4, 3), (1, 64, 128, 5, 4, 2), (1, 64, 128, 5, 4, 4),
    (1, 64, 128, 6, 4, 4), (1, 128, 64, 5, 4, 4),
]
levels = [float(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0,0.5,0.9").split(",")]
n_sm = num_sms(torch.device("cuda"))
g = torch.Generator(device="cuda").manual_seed(0)
rows = []
for K, N in SHAPES:
    w0 = torch.randn(N, K, generator=g, device="cuda").to(torch.bfloat16)
    c = copies_for(w0)
    ws = [w0] + [w0.clone() for _ in range(c - 1)]
    wts = [w.t().contiguous() for w in ws]
    xd = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    t_cublas = time_us(lambda i: F.linear(xd, ws[i]), c)
    for s in levels:
        x, thr = make_x(1, K, s, torch.bfloat16, g)
        thr_t = torch.tensor([thr], device="cuda")
        ref = (torch.where(x.abs().float() > thr, x, 0).float() @ wts[0].float())[0]
        need = (x.abs().float() > thr).float().mean().item() * K * N * 2
        t_cur = time_us(lambda i: _launch(x, wts[i], wts[i], N, N, thr_t, N, N, None), c)
        line = dict(K=K, N=N, sparsity=s, cublas_us=round(t_cublas, 2), current_us=round(t_cur, 2), variants=[])
        print(f"K={K} N={N} s={s} cuBLAS {t_cublas:6.2f}  current {t_cur:6.2f} ({need / t_cur / 1e6:.2f} TB/s)", flush=True)
        for mode, bk, bn, st, nw, pps in VARIANTS:
            n_blocks = triton.cdiv(N, bn)
            split = max(1, min(pps * n_sm // n_blocks, triton.cdiv(K, 2 * bk)))
            kps = triton.cdiv(triton.cdiv(K, split), 16) * 16
            split = triton.cdiv(K, kps)
            out = torch.empty(split, N, device="cuda", dtype=torch.float32)
            idx = torch.empty(K, device="cuda", dtype=torch.int32); cnt = torch.zeros(split, device="cuda", dtype=torch.int32)
            def fn(i):
                gemv_b1[(n_blocks, split)](x, wts[i], thr_t, idx, out, K, N, kps, cnt, MODE=mode, LIST=1, BLOCK_K=bk, BLOCK_N=bn,
                                           CHUNK=min(1024, triton.next_power_of_2(kps)), STAGES=st, M=16, num_warps=nw)
            try:
                fn(0); torch.cuda.synchronize()
                err = ((out.sum(0) - ref).abs().max() / ref.abs().max()).item()
                t = time_us(fn, c)
            except Exception as e:
                print(f"   {(mode, bk, bn, st, nw, pps)} failed: {type(e).__name__} {str(e)[:100]}", flush=True)
                continue
            line["variants"].append(dict(mode=mode, BLOCK_K=bk, BLOCK_N=bn, stages=st, warps=nw, per_sm=pps, split=split,
                                         us=round(t, 2), tb_s=round(need / t / 1e6, 3), rel_err=err))
            print(f"   {(mode, bk, bn, st, nw, pps)} split {split:2d}: {t:6.2f} us {need / t / 1e6:5.2f} TB/s "
                  f"x{t_cur / t:.3f} vs current  err {err:.1e}", flush=True)
        rows.append(line)
out = os.environ.get("OUT", "/tmp")
json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=rows),
          open(f"{out}/exp_b1.json", "w"), indent=1)
