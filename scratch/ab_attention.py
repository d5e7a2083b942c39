"""Throwaway A/B (session 32): the decode attention op before the sliding-window change (HEAD's attention.py,
renamed op) against the new one at window 0, same run, alternately; and the new one with a 4096 window."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparse_ops  # noqa: E402
import attention_old  # noqa: E402
from bench_kernels import copies_for, time_us  # noqa: E402

rows = []
S = 8192
for H, H_kv, B in [(32, 8, 1), (32, 32, 1), (32, 8, 4)]:
    cache = torch.randn(B, H_kv, S, 128, device="cuda", dtype=torch.bfloat16)
    n = copies_for(cache) // 2 + 1
    ks = [cache.clone() for _ in range(n)]
    vs = [cache.clone() for _ in range(n)]
    del cache
    qkv = torch.randn(5, B, (H + 2 * H_kv) * 128, device="cuda")
    freqs = torch.randn(S, 64, 2, device="cuda")
    for ctx in (232, 1024, 4096, 8192):
        pos = torch.tensor([ctx - 1], device="cuda")
        t = {"old": [], "new": []}
        for _ in range(3):
            t["old"].append(time_us(lambda i: attention_old._decode_attention_op(qkv, None, ks[i], vs[i], pos, freqs, H), n))
            t["new"].append(time_us(lambda i: sparse_ops.decode_attention(qkv, None, ks[i], vs[i], pos, freqs, H), n))
        w = time_us(lambda i: sparse_ops.decode_attention(qkv, None, ks[i], vs[i], pos, freqs, H, 4096), n)
        r = dict(heads=f"{H}/{H_kv}", batch=B, context=ctx, old_us=[round(x, 2) for x in t["old"]],
                 new_us=[round(x, 2) for x in t["new"]], new_window4096_us=round(w, 2))
        rows.append(r)
        print(r, flush=True)
    ks = vs = None
    torch.cuda.empty_cache()
out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
if out:
    out.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), indent=1))
