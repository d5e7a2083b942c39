"""Session 15 throwaway: does the GEMVs' L2 prefetch land? Kernel times of qkv (which prefetches wo) and o, in a
CUDA graph over 6 layer copies, with a sleep kernel between standing in for attention."""
import json, os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparse_ops
from torch.profiler import profile, ProfilerActivity

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
L = 6
K = 4096
wq = [torch.randn(K, 6144, device=dev, dtype=dt) for _ in range(L)]
wo = [torch.randn(K, K, device=dev, dtype=dt) for _ in range(L)]
x = torch.randn(1, K, device=dev, dtype=dt)
x2 = torch.randn(1, K, device=dev, dtype=dt)
t = float(x.float().abs().quantile(0.5))
thr3 = torch.full((3,), t, device=dev)
thr1 = torch.tensor([float(x2.float().abs().quantile(0.5))], device=dev)
rows = torch.zeros(1, dtype=torch.int32, device=dev)
ends = [4096, 5120, 6144]
out = {}


def seq(sleep_cycles, o_twice=False, pf=True):
    for i in range(L):
        sparse_ops.sparse_gemv(x, wq[i], thr3, ends, reduce=False, prefetch=(wo[i],) if pf else (), prefetch_rows=rows if pf else None)
        if sleep_cycles:
            torch.cuda._sleep(sleep_cycles)
        sparse_ops.sparse_gemv(x2, wo[i], thr1, [K], reduce=False)
        if o_twice:
            sparse_ops.sparse_gemv(x2, wo[i], thr1, [K], reduce=False)


def measure(name, sleep_cycles, r, o_twice=False, pf=True):
    rows.fill_(r)
    for _ in range(2):
        seq(sleep_cycles, o_twice, pf)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(3):
            seq(sleep_cycles, o_twice, pf)
    g.replay(); torch.cuda.synchronize()
    st, en = torch.cuda.Event(True), torch.cuda.Event(True)
    ts = []
    for _ in range(10):
        st.record(); g.replay(); en.record(); torch.cuda.synchronize(); ts.append(st.elapsed_time(en) * 1000 / (3 * L))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay(); torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "sparse_gemv" in e.name]
    per = 3 if o_twice else 2
    durs = [e.device_time for e in ev]
    q = sorted(durs[0::per]); o = sorted(durs[1::per]); o2 = sorted(durs[2::per]) if o_twice else []
    med = lambda v: v[len(v) // 2] if v else None
    out[name] = dict(layer_us=sorted(ts)[5], qkv_us=med(q), o_us=med(o), o_second_us=med(o2), n=len(ev))
    print(f"{name:40s} per layer {out[name]['layer_us']:7.2f} us  qkv {med(q):6.2f}  o {med(o):6.2f}  o again {med(o2)}", flush=True)


# sleep cycles: ~1.7 GHz under load; 17000 cycles ~ 10 us
for sl in (0, 17000):
    measure(f"no prefetch compiled, sleep {sl}", sl, 0, pf=False)
    for r in (0, 128, 256, 512):
        measure(f"prefetch rows {r}, sleep {sl}", sl, r)
measure("o twice (second hot in L2), sleep 17000", 17000, 0, o_twice=True, pf=False)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "exp15_prefetch.json"), "w"), indent=1)
