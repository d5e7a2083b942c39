"""Session 40 throwaway: with groups of 8 sharing a list, do other batch-1 tiles now beat the kept 128 x 128?
(The sweeps of sessions 5, 9 and 32 ran with one list row per K range, which taxed grids with more column blocks.)"""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import bench_kernels as bk  # noqa: E402
from sparse_ops.gemv import _launch, pick_config  # noqa: E402

CASES = [("llama-3 gate", 4096, 14336, [(64, 128, 2), (64, 128, 3), (128, 128, 3), (128, 128, 4), (64, 128, 4),
                                         (128, 64, 2)]),
         ("llama-3 down", 14336, 4096, [(64, 128, 8), (64, 128, 5), (128, 128, 12), (64, 128, 12), (128, 64, 8)]),
         ("llama-3 wqkv", 4096, 6144, [(64, 128, 5), (64, 128, 3), (128, 128, 3), (128, 128, 8)])]
LEVELS = [0.0, 0.5, 0.9]


def main(out):
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, K, N, tiles in CASES:
        w0 = torch.randn(K, N, generator=g, device="cuda").to(torch.bfloat16)
        c = bk.copies_for(w0, 0.1)
        wts = [w0] + [w0.clone() for _ in range(c - 1)]
        d = pick_config(1, K, N, (), torch.device("cuda"))
        configs = [("default", d)] + [(f"{bn}x{bkk} K/{sk}", dict(d, BLOCK_N=bn, BLOCK_K=bkk, SPLIT_K=sk))
                                      for bn, bkk, sk in tiles]
        for s in LEVELS:
            x, thr = bk.make_x(1, K, s, torch.bfloat16, g)
            thr_t = torch.tensor([thr], device="cuda")
            ref = torch.where(x.abs().float() > thr, x, 0).float() @ w0.float()
            for r in range(2):
                for label, cfg in (configs if r == 0 else configs[::-1]):
                    fn = lambda i: _launch(x, wts[i], wts[i], N, N, thr_t, N, N, None, None, cfg)  # noqa: E731
                    y = fn(0).float().sum(0)
                    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-2, (name, label)
                    t = bk.kernel_us(fn, c, "_sparse_gemv_kernel")
                    rows.append(dict(shape=name, sparsity=s, config=label, round=r, kernel_us=round(t, 2)))
        del wts, w0
        torch.cuda.empty_cache()
        for s in LEVELS:
            line = []
            for label, _ in configs:
                ts = sorted(r["kernel_us"] for r in rows if r["shape"] == name and r["sparsity"] == s
                            and r["config"] == label)
                line.append(f"{label} {ts[0]:.2f}/{ts[-1]:.2f}")
            print(f"{name:13s} {s:.1f}: " + " | ".join(line), flush=True)
        print("default:", d, flush=True)
    Path(out).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), rows=rows), indent=1))


main(sys.argv[1])
