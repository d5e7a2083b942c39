"""Decode speed at real model shapes with random weights (speed depends on shapes and sparsity, not values).

    python scripts/bench_decode.py --preset llama-3-8b --sparsity 0,0.25,0.4,0.5
    python scripts/bench_decode.py --preset llama-3-8b --sparsity 0.5 --variants uniform,per_projection,weighted

Two dense baselines, measured in the same run: the same model with row-major weights and plain F.linear for every
linear, and the same decode attention kernel (sparse_ops.decode_attention), compiled first as cuBLAS runs it
(mode="reduce-overhead"), then as generate.py compiles decode (generate.compile_decode: gpt-fast's coordinate-descent
tuning, with which inductor makes its own GEMVs at batch 1, fused with the norms before them). Speed-ups are given
against the cuBLAS one (the issues' baseline) and against the faster of the two. Sparse rows use column-major weights
and the sparse GEMV ops, with thresholds calibrated on the fly on the model's own activations (calibrate.record),
compiled as generate.py compiles them; one compile serves every sparsity level (thresholds are tensors). Timed:
--tokens decode steps after a warm-up, no prefill.
"""
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import calibrate  # noqa: E402
import cli  # noqa: E402
import sparse_ops  # noqa: E402
import thresholds as thr_file  # noqa: E402
from generate import achieved_sparsity, compile_decode, decode_one_token, prefill  # noqa: E402
from model import DTYPES, PROJECTIONS, ModelArgs, Transformer, model_bytes, to_column_major  # noqa: E402

PRESETS = {
    "llama-3-8b": dict(vocab_size=128256, dim=4096, n_layer=32, n_head=32, n_local_heads=8, head_dim=128,
                       intermediate_size=14336, rope_base=500000.0, block_size=8192),
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layer=32, n_head=32, n_local_heads=32, head_dim=128,
                       intermediate_size=11008, block_size=4096),
    "mistral-7b": dict(vocab_size=32000, dim=4096, n_layer=32, n_head=32, n_local_heads=8, head_dim=128,
                       intermediate_size=14336, rope_base=1000000.0, block_size=32768),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layer=30, n_head=9, n_local_heads=3, head_dim=64,
                         intermediate_size=1536, rope_base=100000.0, tie_embeddings=True, block_size=8192),
}
VARIANTS = ("uniform", "per_projection", "weighted")


def build(config: ModelArgs, dtype, device) -> Transformer:
    """A model with small random weights (seeded) drawn directly on `device`."""
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(config)
            for m in model.modules():  # small random weights keep activations finite through 32 layers
                if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                    torch.nn.init.normal_(m.weight, std=0.02)
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def time_decode(model, decode_fn, batch: int, prompt_len: int, n_tokens: int, warmup: int = 5, prof=None):
    """tokens/s of n_tokens compiled decode steps (after warm-up steps that compile and capture), and the
    sequence generated, prompt and every decode step, as achieved_sparsity replays it. prof: a torch.profiler run
    around the timed steps."""
    dev = model.output.weight.device
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=dev)
    tok, _ = prefill(model, prompt, torch.arange(prompt_len, device=dev), 0.0, None)  # eager
    toks = [prompt, tok]
    pos = torch.tensor([prompt_len], device=dev)  # advanced on the device: no host-to-device copy per step
    for _ in range(warmup):
        tok, _ = decode_fn(model, tok.clone(), pos, 0.0, None)
        toks.append(tok.clone())
        pos += 1
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    with prof or contextlib.nullcontext():
        t = time.perf_counter()
        for _ in range(n_tokens):
            tok, _ = decode_fn(model, tok.clone(), pos, 0.0, None)
            toks.append(tok.clone())
            pos += 1
        sync()
        dt = time.perf_counter() - t
    return n_tokens / dt, torch.cat(toks, dim=1)


PROFILE_STEPS = 20  # decode steps that --profile times
MAX_CALIB_TOKENS = 1 << 20  # random tokens: more would only take longer
WARMUP_ROOM = 16  # cache positions past the timed steps, for the warm-up steps


def cache_length(args) -> int:
    """The KV cache's length: the prompt, then the longer of the timed and the profiled runs, and the warm-up."""
    return args.prompt_len + max(args.tokens, PROFILE_STEPS if args.profile else 0) + WARMUP_ROOM


def kernel_breakdown(model, decode_fn, args, steps: int = PROFILE_STEPS) -> dict:
    """Device time per decode step by kernel kind (torch.profiler sees the kernels inside CUDA graph replays),
    and the step's wall time: what the sparse ops cost against everything else."""
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CUDA])
    tok_s, _ = time_decode(model, decode_fn, args.batch_size, args.prompt_len, steps, prof=prof)
    us, n, kernels = defaultdict(float), defaultdict(int), {}
    for e in prof.key_averages():
        if e.device_time_total <= 0:
            continue
        k = e.key.lower()
        kind = ("sparse_gemv" if "sparse_gemv" in k else
                "dense_matmul" if any(w in k for w in ("gemv", "gemm", "nvjet", "cutlass", "xmma", "splitk")) or
                ("triton" in k and "mm" in k.split("_")) else  # inductor's kernels named for a matrix product
                # fused in: its own GEMVs, also a few microseconds of small kernels fused with one (argmax's)
                "attention" if any(w in k for w in ("flash", "attention", "fmha", "sdpa")) else "other")
        us[kind] += e.device_time_total / steps
        n[kind] += e.count / steps
        kernels[e.key] = (round(e.device_time_total / steps, 1), round(e.count / steps, 1))
    out = {kind: dict(us_per_step=round(us[kind], 1), kernels_per_step=round(n[kind], 1)) for kind in sorted(us)}
    wall = 1e6 / tok_s
    print("    per step: " + ", ".join(f"{kind} {v['us_per_step']:.0f} us in {v['kernels_per_step']:.0f} kernels"
                                       for kind, v in out.items())
          + f"; wall {wall:.0f} us, of which no kernel running {wall - sum(us.values()):.0f} us", flush=True)
    for name, (t, c) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:10]:
        print(f"      {t:7.1f} us {c:5.1f}x  {name[:110]}", flush=True)
    out["wall_us_per_step"] = round(wall, 1)
    out["kernels"] = {name: dict(us_per_step=t, per_step=c) for name, (t, c) in kernels.items()}
    return out


def per_projection_sparsities(model: Transformer, s: float, linear_bytes: torch.Tensor) -> torch.Tensor:
    """A non-uniform allocation with the same parameter-weighted sparsity: attention +0.1, MLP lowered to match."""
    attn = linear_bytes[:4].sum()
    mlp = linear_bytes[4:].sum()
    d_attn = min(0.1, 0.95 - s, s * mlp / attn)  # the MLP's level stays >= 0: at s = 0 both are 0
    d_mlp = d_attn * attn / mlp
    per = torch.tensor([s + d_attn] * 4 + [s - d_mlp] * 3, dtype=torch.float64).clamp(0, 0.99)
    return per.expand(model.config.n_layer, len(PROJECTIONS))


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--preset", choices=list(PRESETS), default="llama-3-8b", help="model shapes")
    p.add_argument("--sparsity", type=cli.sparsities, default="0,0.25,0.4,0.5", help="comma-separated levels in [0, 1)")
    p.add_argument("--variants", default="uniform",
                   help=f"comma-separated from {', '.join(VARIANTS)}: per_projection = unequal levels per "
                        f"projection with the same parameter-weighted sparsity; weighted = |x|*||W col|| scores")
    p.add_argument("--batch_size", type=cli.at_least(1), default=1,
                   help=f"rows decoded together (1-{sparse_ops.MAX_BATCH}); tokens/s counts decode steps, i.e. per row")
    p.add_argument("--tokens", type=cli.at_least(1), default=200, help="timed decode steps")
    p.add_argument("--prompt_len", type=cli.at_least(1), default=16, help="random prompt tokens before decoding")
    p.add_argument("--calib_tokens", type=cli.at_least(2), default=2048,
                   help=f"random tokens for the on-the-fly calibration (at most {MAX_CALIB_TOKENS})")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="weight and activation dtype")
    p.add_argument("--profile", action="store_true",
                   help="after each row, profile 20 decode steps and print device time by kernel kind (GPU only)")
    p.add_argument("--json", type=cli.out_file, help="write results here")
    p.add_argument("--device", type=cli.device, default=None,
                   help="cuda[:N] (default: cuda); cpu only as a smoke test of the script, with --preset smollm2-135m "
                        "(eager, no compile: its timings are no speed figures), e.g. --tokens 4")
    args = p.parse_args(argv)
    if args.device is None:
        if not torch.cuda.is_available():
            p.error("no CUDA GPU here, and bench_decode times on one (--device cpu --preset smollm2-135m runs the "
                    "script as a smoke test)")
        args.device = "cuda"
    levels = args.sparsity
    variants = args.variants.split(",")
    if any(v not in VARIANTS for v in variants):
        p.error(f"--variants must be from {', '.join(VARIANTS)}")
    if args.batch_size > sparse_ops.MAX_BATCH:
        p.error(f"--batch_size must be at most {sparse_ops.MAX_BATCH}")
    if args.calib_tokens > MAX_CALIB_TOKENS:
        p.error(f"--calib_tokens must be at most {MAX_CALIB_TOKENS}")
    context = PRESETS[args.preset]["block_size"]
    if cache_length(args) > context:  # known before minutes of building and timing
        p.error(f"--prompt_len {args.prompt_len} and --tokens {args.tokens} need a {cache_length(args)}-token cache "
                f"(with the warm-up's), more than {args.preset}'s context of {context} tokens")
    dev = cli.use_device(args.device)
    if dev.type == "cpu" and args.preset != "smollm2-135m":
        p.error(f"--device cpu is a smoke test of the script: use --preset smollm2-135m ({args.preset} would take "
                f"many minutes and most of the memory)")
    if dev.type == "cpu" and args.profile:
        p.error("--profile times the kernels of a GPU's decode step; the CPU smoke test has none")
    dtype = DTYPES[args.dtype]
    if dev.type == "cpu":
        print("CPU smoke test: eager reference ops; the timings below are no speed figures", flush=True)

    def compiled(cublas=False):  # on a CPU a smoke test: compiling would take minutes and time nothing of interest
        if dev.type != "cuda":
            return decode_one_token
        return (torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True) if cublas
                else compile_decode(dev))
    t0 = time.perf_counter()
    model = build(ModelArgs(**PRESETS[args.preset]), dtype, dev)
    model.setup_caches(args.batch_size, cache_length(args))
    total_bytes, linear_bytes = model_bytes(model)
    rows = []

    def report(name, s, tok_s, seq, sparse, decode_fn):
        # inputs dropped, and weight rows skipped (kept by no batch row: what a batched step does not read)
        ach, skipped = (achieved_sparsity(model, args.prompt_len, seq) if sparse
                        else torch.zeros(2, len(PROJECTIONS))).double()
        w = float((linear_bytes * ach).sum() / linear_bytes.sum())
        skipped_bytes = float((linear_bytes * skipped).sum())
        read = total_bytes - skipped_bytes  # per step, for all its rows
        rows.append(dict(variant=name, sparsity=s, achieved=round(w, 4),
                         rows_skipped=round(skipped_bytes / float(linear_bytes.sum()), 4),
                         tokens_per_s=round(tok_s, 2),
                         speedup=round(tok_s / (rows[0]["tokens_per_s"] if rows else tok_s), 3),
                         gb_s_read=round(read * tok_s / 1e9, 1),
                         achieved_per_projection=dict(zip(PROJECTIONS, [round(v, 4) for v in ach.tolist()]))))
        r = rows[-1]
        r["graphs_compiled_so_far"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        against_best = f" (x{tok_s / best_dense:.3f} against the faster dense)" if sparse else ""
        print(f"[{time.perf_counter() - t0:4.0f}s] {name:20s} s={s:.2f} achieved={w:.3f} {tok_s:8.2f} tok/s "
              f"x{r['speedup']:.3f}{against_best} {r['gb_s_read']:7.1f} GB/s read  "
              f"(graphs compiled so far: {r['graphs_compiled_so_far']})", flush=True)
        if args.profile:
            r["kernel_breakdown"] = kernel_breakdown(model, decode_fn, args)

    # Dense baselines: row-major weights, F.linear; cuBLAS, then at batch 1 inductor's GEMVs, as generate.py compiles
    # decode (with more rows inductor calls cuBLAS too)
    baselines = [("dense (F.linear)", True)] if dev.type != "cuda" else [("dense (cuBLAS)", True)] + (
        [("dense (inductor GEMV)", False)] if args.batch_size == 1 else [])
    for name, cublas in baselines:
        dense_fn = compiled(cublas)
        tok_s, seq = time_decode(model, dense_fn, args.batch_size, args.prompt_len, args.tokens)
        report(name, 0.0, tok_s, seq, False, dense_fn)
    best_dense = max(r["tokens_per_s"] for r in rows)

    ids = torch.randint(0, model.config.vocab_size, (args.calib_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    cal_seq = min(512, args.calib_tokens)
    table, _, _ = calibrate.record(model, ids, cal_seq, "magnitude", 200_000, dev, progress=False)
    cal = {"levels": torch.tensor(calibrate.LEVELS, dtype=torch.float64), "table": table, "greedy": None}
    cal_w = None
    if "weighted" in variants:
        table_w, _, _ = calibrate.record(model, ids, cal_seq, "weighted", 200_000, dev, progress=False)
        cal_w = {"levels": cal["levels"], "table": table_w, "greedy": None}
    print(f"[{time.perf_counter() - t0:4.0f}s] calibrated on {args.calib_tokens} random tokens", flush=True)
    to_column_major(model)
    torch._dynamo.reset()
    for variant in variants:
        model.set_scores(variant == "weighted")
        model.set_sparse(decode=True, prefill=False)
        sparse_fn = compiled()
        for s in levels:
            c = cal_w if variant == "weighted" else cal
            if variant == "per_projection":
                t = thr_file.interp(c["levels"], c["table"], per_projection_sparsities(model, s, linear_bytes)).float()
            else:
                t = thr_file.thresholds_for(c, s)
            model.set_thresholds(t.to(dev))  # in place: no recompile, no re-capture
            tok_s, seq = time_decode(model, sparse_fn, args.batch_size, args.prompt_len, args.tokens)
            report(variant, s, tok_s, seq, True, sparse_fn)
    for r in rows:
        r["speedup_vs_best_dense"] = round(r["tokens_per_s"] / best_dense, 3)
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                                         "torch": torch.__version__, "batch_size": args.batch_size,
                                         "tokens": args.tokens, "dtype": args.dtype, "rows": rows}, indent=1))


if __name__ == "__main__":
    cli.run(main)
