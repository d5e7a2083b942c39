"""Throwaway (session 32): batch-1 listing GEMV kernel time against the program count (grid balance over 132 SMs)."""
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "scripts")]
import sparse_ops  # noqa: E402
from sparse_ops.gemv import _launch  # noqa: E402
from sparse_ops.norm import kept_list  # noqa: E402
from bench_kernels import copies_for, kernel_us, make_x  # noqa: E402

g = torch.Generator(device="cuda").manual_seed(0)
rows = []


def cfg(bn, bk, sk, nw):
    return dict(BLOCK_B=1, BLOCK_K=bk, BLOCK_N=bn, SPLIT_K=sk, WINDOWS=0, num_warps=nw, num_stages=3)


cases = [
    ("gate 14336x4096", 4096, 14336, False, [(128, 128, 2, 4), (64, 128, 2, 4), (64, 128, 2, 2), (64, 64, 2, 4),
                                             (128, 128, 3, 4), (64, 128, 3, 4), (64, 128, 1, 4), (128, 64, 2, 4)]),
    ("down 4096x14336", 14336, 4096, False, [(128, 128, 8, 4), (64, 128, 4, 4), (64, 128, 8, 4), (128, 128, 9, 4),
                                             (64, 128, 5, 4)]),
    ("GLU 2x14336", 4096, 28672, True, [(128, 128, 1, 4), (64, 128, 1, 4), (64, 128, 1, 2), (256, 128, 1, 8)]),
]
for name, K, N, glu, configs in cases:
    w0 = torch.randn(K, N, generator=g, device="cuda").to(torch.bfloat16)
    c = copies_for(w0)
    wts = [w0] + [w0.clone() for _ in range(c - 1)]
    if glu:
        pairs = [(w[:, :N // 2].contiguous(), w[:, N // 2:].contiguous()) for w in wts]
    for s in (0.0, 0.5):
        x, thr = make_x(1, K, s, torch.bfloat16, g)
        thr_t = torch.tensor([thr, thr], device="cuda")
        for rep in range(2):
            for bn, bk, sk, nw in configs:
                cf = cfg(bn, bk, sk, nw)
                if glu:
                    kept = kept_list(x, thr_t, None)
                    fn = lambda i: _launch(x, pairs[i][0], pairs[i][1], N // 2, N, thr_t, N // 2, N, None, kept, cf)  # noqa
                else:
                    fn = lambda i: _launch(x, wts[i], wts[i], N, N, thr_t[:1], N, N, None, None, cf)  # noqa
                try:
                    t = kernel_us(fn, c, "_sparse_gemv_kernel")
                except Exception as e:
                    print(name, cf, type(e).__name__, e)
                    continue
                progs = (N // (bn // 2 if glu else bn)) * (1 if glu else sk)
                r = dict(shape=name, sparsity=s, rep=rep, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, warps=nw,
                         programs=progs, kernel_us=round(t, 2))
                rows.append(r)
                print(r, flush=True)
        # the reference check once per case: the fastest configs compute the same
        if glu:
            want = sparse_ops.sparse_glu_ref(x, *pairs[0], thr_t, None)
            for bn, bk, sk, nw in configs:
                got = _launch(x, pairs[0][0], pairs[0][1], N // 2, N, thr_t, N // 2, N, None, kept_list(x, thr_t, None),
                              cfg(bn, bk, sk, nw))
                print("check", bn, (got.float() - want.float()).abs().max().item())
if len(sys.argv) > 1:
    Path(sys.argv[1]).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), rows=rows), indent=1))
