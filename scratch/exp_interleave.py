"""Session-12 experiment: listing interleaved with streaming (list a chunk of the K range, stream its rows, repeat)."""
import json, os, sys
from pathlib import Path
import torch, torch.nn.functional as F, triton
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts")); sys.path.insert(0, str(ROOT / "scratch"))
from bench_kernels import copies_for, make_x, time_us  # noqa
from sparse_ops.gemv import _launch, num_sms  # noqa
from exp_kernels import gemv_b1  # noqa
n_sm = num_sms(torch.device("cuda"))
g = torch.Generator(device="cuda").manual_seed(0)
res = []
for K, N in [(4096, 4096), (4096, 6144), (4096, 14336), (14336, 4096), (4096, 28672)]:
    wt0 = torch.randn(K, N, generator=g, device="cuda").to(torch.bfloat16)
    c = copies_for(wt0)
    wts = [wt0] + [wt0.clone() for _ in range(c - 1)]
    ws = [w.t().contiguous() for w in wts]
    xd = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    t_cublas = time_us(lambda i: F.linear(xd, ws[i]), c)
    del ws
    n_blocks = triton.cdiv(N, 128)
    split = max(1, min(2 * n_sm // n_blocks, triton.cdiv(K, 256)))
    kps = triton.cdiv(triton.cdiv(K, split), 16) * 16
    split = triton.cdiv(K, kps)
    out = torch.empty(split, N, device="cuda", dtype=torch.float32)
    idx = torch.empty(K, device="cuda", dtype=torch.int32)
    cnt = torch.zeros(split, device="cuda", dtype=torch.int32)
    for s in (0.0, 0.25, 0.4, 0.5, 0.65, 0.9):
        x, thr = make_x(1, K, s, torch.bfloat16, g)
        thr_t = torch.tensor([thr], device="cuda")
        ref = (torch.where(x.abs().float() > thr, x, 0).float() @ wt0.float())[0]
        need = (x.abs().float() > thr).float().mean().item() * K * N * 2
        row = dict(K=K, N=N, sparsity=s, split=split, kps=kps, cublas_us=round(t_cublas, 2),
                   current_us=round(time_us(lambda i: _launch(x, wts[i], wts[i], N, N, thr_t, N, N, None), c), 2))
        for lst, name in ((1, "scan1d"), (5, "scan2d")):
            for chunk in (256, 512, 1024):
                if chunk > triton.next_power_of_2(kps):
                    continue
                def run(i):
                    gemv_b1[(n_blocks, split)](x, wts[i], thr_t, idx, out, K, N, kps, cnt, MODE=2, LIST=lst, BLOCK_K=128,
                                               BLOCK_N=128, CHUNK=chunk, STAGES=1, M=16)
                run(0); torch.cuda.synchronize()
                err = ((out.sum(0) - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-3, (name, chunk, err)
                row[f"interleaved_{name}_chunk{chunk}_us"] = round(time_us(run, c), 2)
        best = min((v, k) for k, v in row.items() if k.startswith("interleaved"))
        print(f"K={K} N={N} s={s}: cuBLAS {t_cublas:.2f} current {row['current_us']:.2f} ({need / row['current_us'] / 1e6:.2f} TB/s) "
              f"best {best[1]} {best[0]:.2f} ({need / best[0] / 1e6:.2f} TB/s) | " +
              " ".join(f"{k[12:-3]}={v}" for k, v in row.items() if k.startswith("interleaved")), flush=True)
        res.append(row)
json.dump(dict(gpu=torch.cuda.get_device_name(), rows=res), open(os.environ.get("OUT", "/tmp") + "/exp_interleave.json", "w"), indent=1)
