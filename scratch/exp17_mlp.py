"""Session 17 experiment: the MLP's down GEMV fused into the gate|up GLU kernel (atomic adds) against the two
separate kernels. Batch 1, bf16, CUDA graphs over rotating weight copies (bench_kernels' method)."""
import json, sys, os
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import sparse_ops
from sparse_ops import gemv
from sparse_ops.norm import kept_list
from bench_kernels import time_us, kernel_us

out_rows = []
g = torch.Generator(device="cuda").manual_seed(0)
dt = torch.bfloat16
for name, K, N in (("llama-3", 4096, 14336),):
    sets = []
    for i in range(3):
        sets.append(((torch.randn(K, N, device="cuda", generator=g) / 64).to(dt), (torch.randn(K, N, device="cuda", generator=g) / 64).to(dt),
                     (torch.randn(N, K, device="cuda", generator=g) / 120).to(dt)))
    x = torch.randn(1, K, device="cuda", generator=g).to(dt)
    for s in (0.4, 0.5, 0.9):
        tx = torch.quantile(x.abs().float(), s).item() if s else 0.0
        h = sparse_ops.sparse_glu_ref(x, sets[0][0], sets[0][1], torch.tensor([tx, tx], device="cuda"))
        th = torch.quantile(h.abs().float(), s).item() if s else 0.0
        thr = torch.tensor([tx, tx, th], device="cuda")
        kept = kept_list(x, thr[:2], None)
        acc = torch.zeros(N // 64 + 1, K, device="cuda")
        ref = sparse_ops.sparse_mlp_ref(x, *sets[0], thr)
        acc.zero_(); gemv._sparse_mlp_op(x, *sets[0], thr, None, None, kept, acc); acc1 = acc.sum(0, keepdim=True)
        err = ((acc1 - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        def sep(i):
            hh = sparse_ops.sparse_glu(x, sets[i][0], sets[i][1], thr[:2], None, kept)
            return sparse_ops.sparse_gemv(hh, sets[i][2], thr[2:], [K], reduce=False)
        def fused(i):
            gemv._sparse_mlp_op(x, *sets[i], thr, None, None, kept, acc)
        def fused_zero(i):
            acc.zero_()
            gemv._sparse_mlp_op(x, *sets[i], thr, None, None, kept, acc)
        row = dict(shape=name, K=K, N=N, sparsity=s, err=err, sep_us=time_us(sep, 3), sep_kernels_us=kernel_us(sep, 3, "_sparse_gemv_kernel"))
        row["glu_us"] = time_us(lambda i: sparse_ops.sparse_glu(x, sets[i][0], sets[i][1], thr[:2], None, kept), 3)
        for mode in (0, 1, 2):
            for bd in (256, 512, 1024):
                gemv.BLOCK_D, gemv.DMODE = bd, mode
                try:
                    row[f"m{mode}_{bd}_us"] = time_us(fused, 3)
                except Exception as e:
                    print(bd, mode, type(e).__name__, str(e)[:200])
        out_rows.append(row)
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
Path(os.environ.get("OUT", "/tmp"), "exp17_mlp.json").write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), rows=out_rows), indent=1))
