"""Session 18 micro-benchmark: what a kernel boundary costs in a CUDA graph, against a grid barrier inside one
persistent kernel. Each phase: every program reads a 16-value slice of the previous phase's vector at an address
that depends on that vector (a dependent load, like a GEMV reading x then its weights), and writes its slice of
the next vector. A chain of PHASES kernels, or one kernel with PHASES grid barriers."""
import json, os, sys
import torch, triton, triton.language as tl

@triton.jit
def _phase(src, dst, table, P: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, 16)
    v = tl.load(src + pid * 16 + r)
    w = tl.load(table + (v.to(tl.int32) & 4095) * 16 + r)  # dependent load
    tl.store(dst + ((pid + 1) % P) * 16 + r, v + w * 0)

@triton.jit
def _phase_noload(src, dst, table, P: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, 16)
    tl.store(dst + ((pid + 1) % P) * 16 + r, r.to(tl.float32))

@triton.jit
def _persistent(buf, table, counter, PHASES: tl.constexpr, P: tl.constexpr, N: tl.constexpr, LOADS: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, 16)
    for i in range(PHASES):
        src = buf + (i % 2) * N
        dst = buf + ((i + 1) % 2) * N
        if LOADS:
            v = tl.load(src + pid * 16 + r, cache_modifier=".cg")
            w = tl.load(table + (v.to(tl.int32) & 4095) * 16 + r)
            tl.store(dst + ((pid + 1) % P) * 16 + r, v + w * 0)
        else:
            tl.store(dst + ((pid + 1) % P) * 16 + r, r.to(tl.float32))
        tl.debug_barrier()
        tl.atomic_add(counter, 1, sem="release", scope="gpu")
        target = (i + 1) * P
        c = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        while c < target:
            c = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

def timed_graph(fn, reps=15):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1000)
    ts.sort()
    return ts[len(ts) // 2]

def main():
    dev = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    PH = 128
    res = []
    table = torch.zeros(4096 * 16, device=dev)
    for rep, P, loads in [(rep, P, loads) for rep in (0, 1) for loads in (True, False) for P in (sms, 2 * sms, 4 * sms)]:
        N = P * 16
        buf = torch.zeros(2 * N, device=dev)
        counter = torch.zeros(1, device=dev, dtype=torch.int32)
        def chain():
            for i in range(PH):
                (_phase if loads else _phase_noload)[(P,)](buf[(i % 2) * N:], buf[((i + 1) % 2) * N:], table, P=P,
                                                           num_warps=4)
        def pers():
            counter.zero_()
            _persistent[(P,)](buf, table, counter, PHASES=PH, P=P, N=N, LOADS=loads, num_warps=4)
        def empty():
            counter.zero_()
        t_chain = timed_graph(chain)
        t_pers = timed_graph(pers)
        t_empty = timed_graph(empty)
        row = dict(repeat=rep, dependent_loads=loads, programs=P, phases=PH, chain_us_per_phase=(t_chain - t_empty) / PH,
                   persistent_us_per_phase=(t_pers - t_empty) / PH, graph_with_one_fill_us=t_empty)
        print(row, flush=True)
        res.append(row)
    out = os.environ.get("OUT", ".")
    json.dump(res, open(os.path.join(out, "session18_barrier.json"), "w"), indent=1)

if __name__ == "__main__":
    main()
