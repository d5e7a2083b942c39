"""Session 16 experiment (throwaway): the listing GEMV with its first HEAD windows of 128 rows loaded (masked)
before the listing, in flight while the rest of the share is listed. HEAD 0 (kept kernel) / 1 / 2, same run,
each timed twice alternately, as bench_kernels.py times (CUDA graph of 20 calls over weight copies)."""
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_kernels import copies_for, make_x, time_us  # noqa: E402
from sparse_ops import sparse_gemv_ref  # noqa: E402
from sparse_ops.gemv import _launch, pick_config  # noqa: E402


def main():
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [("l3 wqkv", 4096, [4096, 1024, 1024]), ("l2 wqkv", 4096, [4096, 4096, 4096]),
              ("l3 down", 14336, [4096]), ("l2 down", 11008, [4096]), ("l3 gate", 4096, [14336])]
    rows = []
    for name, K, segs in shapes:
        N = sum(segs)
        ends = torch.tensor(segs).cumsum(0).tolist()
        seg1, seg2 = (ends[:-1] + [N, N])[:2]
        wt0 = torch.randn(K, N, generator=g, device="cuda").to(dtype)
        c = copies_for(wt0)
        wts = [wt0] + [wt0.clone() for _ in range(c - 1)]
        for s in (0.25, 0.4, 0.5, 0.65, 0.9):
            x, thr = make_x(1, K, s, dtype, g)
            thr_t = torch.full((len(segs),), thr, device="cuda")
            ref = sparse_gemv_ref(x.float(), wt0.float(), thr_t, ends, None)
            times = {}
            for rep in range(2):
                for head in ((0, 1, 2) if rep == 0 else (2, 1, 0)):
                    cfg = pick_config(1, K, N, tuple(ends[:-1]), x.device)
                    cfg["HEAD"] = head
                    if rep == 0:
                        y = _launch(x, wt0, wt0, N, N, thr_t, seg1, seg2, None, None, cfg).sum(0)
                        err = ((y - ref).norm() / ref.norm()).item()
                        assert err < 1e-4, (name, s, head, err)
                    t = time_us(lambda i: _launch(x, wts[i], wts[i], N, N, thr_t, seg1, seg2, None, None, cfg), c)
                    times.setdefault(head, []).append(round(t, 2))
            rows.append(dict(shape=name, K=K, N=N, sparsity=s, us=times))
            print(f"{name:8s} s={s:.2f} " + "  ".join(f"head {h}: {min(v):6.2f} ({v[0]:.2f}/{v[1]:.2f})"
                                                        for h, v in times.items()), flush=True)
    json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=rows),
              open(os.path.join(os.environ.get("OUT", "."), "exp16_head.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
