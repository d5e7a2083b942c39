"""Session 40 throwaway: batch-1 listing variants of the sparse GEMV, kernel time A/B in one process.
base: as committed; chunk: the listing scans a share of 1,793-4,096 channels in one chunk (next power of two) where
the share fills at least 7/8 of it; perprog: each program lists into its own scratch (no 112-way shared writes);
both."""
import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import bench_kernels as bk  # noqa: E402

SRC = (ROOT / "sparse_ops" / "gemv.py").read_text()
CHUNK_OLD = 'cfg["CHUNK"] = min(1024, triton.next_power_of_2(k_per_split))'
CHUNK_NEW = ('p2 = triton.next_power_of_2(k_per_split)\n'
             '    cfg["CHUNK"] = p2 if p2 <= 4096 and 8 * k_per_split >= 7 * p2 else min(1024, p2)')
IDX_OLD = "idx_base = idx_ptr + seg * K + k_lo"
IDX_NEW = "idx_base = idx_ptr + (pid_k * tl.num_programs(0) + pid_n) * K_PER_SPLIT"
ALLOC_OLD = "torch.empty((3, K), device=x.device, dtype=torch.int32)"
ALLOC_NEW = "torch.empty((grid[0] * grid[1] * k_per_split,), device=x.device, dtype=torch.int32)"


IDX_G = ("idx_base = idx_ptr + ((seg * tl.num_programs(1) + pid_k) * tl.cdiv(tl.num_programs(0), 8) + pid_n // 8)"
         " * K_PER_SPLIT")
ALLOC_G = "torch.empty((3 * grid[1] * triton.cdiv(grid[0], 8) * k_per_split,), device=x.device, dtype=torch.int32)"


def variant(name):
    src = SRC.replace('"tealfast::', f'"tealexp{name}::')
    if name in ("g8", "both8"):
        src = src.replace(IDX_OLD, IDX_G).replace(ALLOC_OLD, ALLOC_G)
    if name in ("chunk", "both", "both8"):
        assert CHUNK_OLD in src
        src = src.replace(CHUNK_OLD, CHUNK_NEW)
    if name in ("perprog", "both"):
        assert IDX_OLD in src and ALLOC_OLD in src
        src = src.replace(IDX_OLD, IDX_NEW).replace(ALLOC_OLD, ALLOC_NEW)
    path = ROOT / "scratch" / f"gemv_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"gemv_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


VARIANT_NAMES = (sys.argv[4] if len(sys.argv) > 4 else "base,chunk,perprog,both").split(",")
VARIANTS = {n: variant(n) for n in VARIANT_NAMES}
SHAPES = [("llama-3 gate", 4096, 14336, False), ("llama-3 down", 14336, 4096, False),
          ("llama-2 gate", 4096, 11008, False), ("llama-2 down", 11008, 4096, False),
          ("llama-3 wqkv", 4096, 6144, False), ("llama-2 wqkv", 4096, 12288, False),
          ("llama-3 gate+up pair", 4096, 28672, True), ("llama-2 gate+up pair", 4096, 22016, True)]
LEVELS = [float(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0,0.5,0.9").split(",")]
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
out = Path(sys.argv[3]) if len(sys.argv) > 3 else None


def main():
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    res = []
    for name, K, N, pair in SHAPES:
        w0 = torch.randn(N, K, generator=g, device="cuda").to(dtype)
        c = bk.copies_for(w0, 1 - max(LEVELS))
        wts = [w0.t().contiguous()] + [None] * (c - 1)
        for i in range(1, c):
            wts[i] = wts[0].clone()
        del w0
        ab = [(wt[:, :N // 2].contiguous(), wt[:, N // 2:].contiguous()) if pair else (wt, wt) for wt in wts]
        if pair:
            del wts
        for s in LEVELS:
            x, thr = bk.make_x(1, K, s, dtype, g)
            thr_t = torch.tensor([thr, thr], device="cuda")
            ref = (torch.where(x.abs().float() > thr, x, 0).float() @ (torch.cat(ab[0], 1) if pair else ab[0][0]).float())
            for r in range(ROUNDS):
                names = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
                for v in names:
                    m = VARIANTS[v]
                    if pair:
                        fn = lambda i: m._launch(x, ab[i][0], ab[i][1], N // 2, N, thr_t, N // 2, N, None)  # noqa
                    else:
                        fn = lambda i: m._launch(x, ab[i][0], ab[i][0], N, N, thr_t[:1], N, N, None)  # noqa
                    y = fn(0).float().sum(0)
                    err = ((y - ref).abs().max() / ref.abs().max()).item()
                    assert err < 1e-2, (name, s, v, err)
                    t = bk.kernel_us(fn, c, "_sparse_gemv_kernel")
                    res.append(dict(shape=name, K=K, N=N, sparsity=s, variant=v, round=r, kernel_us=round(t, 2)))
                    print(f"{name:22s} s={s:.2f} r={r} {v:8s} {t:7.2f} us", flush=True)
        del ab
        torch.cuda.empty_cache()
    if out:
        out.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=res), indent=1))
    print("\nmedian of rounds, kernel us")
    for name, K, N, pair in SHAPES:
        for s in LEVELS:
            cells = []
            for v in VARIANTS:
                ts = sorted(r["kernel_us"] for r in res if r["shape"] == name and r["sparsity"] == s and r["variant"] == v)
                cells.append(f"{v} {'/'.join(f'{t:.2f}' for t in ts)}")
            print(f"{name:22s} {s:.2f}  " + "  |  ".join(cells))


main()
