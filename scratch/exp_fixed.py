"""Session-12 experiment: where the fixed cost of a batch-1 sparse GEMV call goes."""
import json, os, sys
from pathlib import Path
import torch, triton
import triton.language as tl
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "scripts")); sys.path.insert(0, str(ROOT / "scratch"))
from bench_kernels import copies_for, make_x, time_us  # noqa
from sparse_ops.gemv import num_sms  # noqa
from exp_kernels import gemv_b1  # noqa


@triton.jit
def empty_kernel(out_ptr, N, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + tl.program_id(1) * N + cols, tl.zeros((BLOCK_N,), tl.float32), mask=cols < N)



n_sm = num_sms(torch.device("cuda"))
g = torch.Generator(device="cuda").manual_seed(0)
res = []
for K, N in [(4096, 4096), (4096, 14336), (14336, 4096)]:
    wt0 = torch.randn(K, N, generator=g, device="cuda").to(torch.bfloat16)
    c = copies_for(wt0)
    wts = [wt0] + [wt0.clone() for _ in range(c - 1)]
    n_blocks = triton.cdiv(N, 128)
    split = max(1, min(2 * n_sm // n_blocks, triton.cdiv(K, 256)))
    kps = triton.cdiv(triton.cdiv(K, split), 16) * 16
    split = triton.cdiv(K, kps)
    out = torch.empty(split, N, device="cuda", dtype=torch.float32)
    idx = torch.empty(K, device="cuda", dtype=torch.int32)
    cnt = torch.zeros(split, device="cuda", dtype=torch.int32)
    for s in (0.0, 0.5, 0.9, 1.0):
        x, thr = make_x(1, K, min(s, 0.5), torch.bfloat16, g)
        thr_t = torch.tensor([float("inf") if s == 1.0 else thr], device="cuda")
        def run(i, lst):
            gemv_b1[(n_blocks, split)](x, wts[i], thr_t, idx, out, K, N, kps, cnt, MODE=0, LIST=lst, BLOCK_K=128,
                                       BLOCK_N=128, CHUNK=min(1024, triton.next_power_of_2(kps)), STAGES=1, M=16)
        run(0, 1)  # fills idx and cnt for the LIST=0 runs
        if s == 0.9:  # a real 90% list
            x, thr = make_x(1, K, 0.9, torch.bfloat16, g); thr_t.fill_(thr); run(0, 1)
        t_full = time_us(lambda i: run(i, 1), c)
        t_stream = time_us(lambda i: run(i, 0), c)
        need = cnt.sum().item() * N * 2
        row = dict(K=K, N=N, sparsity=s, split=split, full_us=round(t_full, 2), stream_only_us=round(t_stream, 2),
                   needed_mb=round(need / 1e6, 2))
        if s == 1.0:
            row["empty_kernel_us"] = round(time_us(lambda i: empty_kernel[(n_blocks, split)](out, N, BLOCK_N=128), c), 2)
        print(row, flush=True)
        res.append(row)
json.dump(dict(gpu=torch.cuda.get_device_name(), rows=res), open(os.environ.get("OUT", "/tmp") + "/exp_fixed.json", "w"), indent=1)
