"""Session-12 experiment: weight layout (K, N) row-major-transposed against column-block slabs (N/128, K, 128)."""
import json, os, sys
from pathlib import Path
import torch, torch.nn.functional as F, triton
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts")); sys.path.insert(0, str(ROOT / "scratch"))
from bench_kernels import copies_for, make_x, time_us  # noqa
from sparse_ops.gemv import num_sms  # noqa
from exp_kernels import gemv_b1  # noqa
n_sm = num_sms(torch.device("cuda"))
g = torch.Generator(device="cuda").manual_seed(0)
res = []
for K, N in [(4096, 4096), (4096, 6144), (4096, 14336), (14336, 4096), (4096, 28672)]:
    w0 = torch.randn(N, K, generator=g, device="cuda").to(torch.bfloat16)
    c = copies_for(w0)
    ws = [w0] + [w0.clone() for _ in range(c - 1)]
    xd = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    t_cublas = time_us(lambda i: F.linear(xd, ws[i]), c)
    wts = [w.t().contiguous() for w in ws]
    for bn in (128, 256):
        blocked = [w.t().reshape(K, N // bn, bn).permute(1, 0, 2).contiguous() for w in ws] if N % bn == 0 else None
        for bk, nw in ((128, 4), (64, 4)) if bn == 128 else ((64, 8), (128, 8)):
            n_blocks = triton.cdiv(N, bn)
            split = max(1, min(2 * n_sm // n_blocks, triton.cdiv(K, 2 * bk)))
            kps = triton.cdiv(triton.cdiv(K, split), 16) * 16
            split = triton.cdiv(K, kps)
            out = torch.empty(split, N, device="cuda", dtype=torch.float32)
            idx = torch.empty(K, device="cuda", dtype=torch.int32)
            cnt = torch.zeros(split, device="cuda", dtype=torch.int32)
            for s in (0.0, 0.25, 0.5, 0.65, 0.9):
                x, thr = make_x(1, K, s, torch.bfloat16, g)
                thr_t = torch.tensor([thr], device="cuda")
                ref = (torch.where(x.abs().float() > thr, x, 0).float() @ wts[0].float())[0]
                need = (x.abs().float() > thr).float().mean().item() * K * N * 2
                row = dict(K=K, N=N, BLOCK_N=bn, BLOCK_K=bk, warps=nw, split=split, sparsity=s, cublas_us=round(t_cublas, 2))
                for name, wl, blk in (("row", wts, False), ("blocked", blocked, True)):
                    if wl is None:
                        continue
                    for lst in (1, 0):
                        def run(i):
                            gemv_b1[(n_blocks, split)](x, wl[i], thr_t, idx, out, K, N, kps, cnt, MODE=0, LIST=lst,
                                                       BLOCK_K=bk, BLOCK_N=bn, CHUNK=min(1024, triton.next_power_of_2(kps)),
                                                       STAGES=1, M=16, CACHE=".cg", BLOCKED=blk, num_warps=nw)
                        if lst:
                            run(0); torch.cuda.synchronize()
                            err = ((out.sum(0) - ref).abs().max() / ref.abs().max()).item()
                            assert err < 1e-3, (name, err)
                        t = time_us(run, c)
                        row[f"{name}{'' if lst else '_stream'}_us"] = round(t, 2)
                        row[f"{name}{'' if lst else '_stream'}_tbs"] = round(need / t / 1e6, 3)
                print(row, flush=True)
                res.append(row)
json.dump(dict(gpu=torch.cuda.get_device_name(), rows=res), open(os.environ.get("OUT", "/tmp") + "/exp_layout.json", "w"), indent=1)
