"""Session-12 experiment: a separate listing kernel (one program per K range) + the streaming-only GEMV."""
import json, os, sys
from pathlib import Path
import torch, triton
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts")); sys.path.insert(0, str(ROOT / "scratch"))
from bench_kernels import copies_for, make_x, time_us  # noqa
from sparse_ops.gemv import _launch, num_sms  # noqa
from exp_kernels import gemv_b1, list_kernel  # noqa
n_sm = num_sms(torch.device("cuda"))
g = torch.Generator(device="cuda").manual_seed(0)
res = []
for K, N in [(4096, 4096), (4096, 6144), (14336, 4096), (4096, 28672)]:
    wt0 = torch.randn(K, N, generator=g, device="cuda").to(torch.bfloat16)
    c = copies_for(wt0)
    wts = [wt0] + [wt0.clone() for _ in range(c - 1)]
    n_blocks = triton.cdiv(N, 128)
    for split_mult in (1, 2):
        split = max(1, min(2 * n_sm // n_blocks, triton.cdiv(K, 256))) * split_mult
        kps = triton.cdiv(triton.cdiv(K, split), 16) * 16
        split = triton.cdiv(K, kps)
        out = torch.empty(split, N, device="cuda", dtype=torch.float32)
        idx = torch.empty(K, device="cuda", dtype=torch.int32)
        cnt = torch.zeros(split, device="cuda", dtype=torch.int32)
        for s in (0.0, 0.4, 0.5, 0.9):
            x, thr = make_x(1, K, s, torch.bfloat16, g)
            thr_t = torch.tensor([thr], device="cuda")
            ref = (torch.where(x.abs().float() > thr, x, 0).float() @ wt0.float())[0]
            chunk = min(1024, triton.next_power_of_2(kps))
            def two(i):
                list_kernel[(split,)](x, thr_t, idx, cnt, K, kps, CHUNK=chunk)
                gemv_b1[(n_blocks, split)](x, wts[i], thr_t, idx, out, K, N, kps, cnt, MODE=0, LIST=0, BLOCK_K=128,
                                           BLOCK_N=128, CHUNK=chunk, STAGES=1, M=16)
            idx.fill_(0); cnt.fill_(0)
            two(0); torch.cuda.synchronize()
            err = ((out.sum(0) - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-3, err
            row = dict(K=K, N=N, sparsity=s, split=split,
                       current_us=round(time_us(lambda i: _launch(x, wts[i], wts[i], N, N, thr_t, N, N, None), c), 2),
                       list_then_stream_us=round(time_us(two, c), 2),
                       list_kernel_us=round(time_us(lambda i: list_kernel[(split,)](x, thr_t, idx, cnt, K, kps, CHUNK=chunk), c), 2))
            print(row, flush=True)
            res.append(row)
json.dump(dict(gpu=torch.cuda.get_device_name(), rows=res), open(os.environ.get("OUT", "/tmp") + "/exp_listkernel.json", "w"), indent=1)
