import sys, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from sparse_ops.gemv import _launch, pick_config
K, N = int(sys.argv[2]), int(sys.argv[3])
s = float(sys.argv[1])
cfg = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
g = torch.Generator(device="cuda").manual_seed(0)
wt = torch.randn(K, N, generator=g, device="cuda").to(torch.bfloat16)
x = torch.randn(1, K, generator=g, device="cuda").to(torch.bfloat16)
thr = torch.tensor([torch.quantile(x.abs().float().flatten(), s).item() if s > 0 else 0.0], device="cuda")
cfg = cfg or pick_config(1, K, (N,), x.device)
for _ in range(5):
    _launch(x, wt, wt, N, N, thr, N, N, None, cfg)
torch.cuda.synchronize()
