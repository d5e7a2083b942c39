"""Decode attention benchmark: sparse_ops.decode_attention against SDPA with gpt-fast's mask, same run.

    python scripts/bench_attention.py [--context 256,1024,4096,8192] [--batch 1,4] [--window W] [--json OUT]

One layer's attention for one new token per row against a KV cache of max_seq_length = 8192 positions filled up
to `context`. SDPA (gpt-fast's decode attention; model.py runs it for prefill) gets q (B, H, 128) and the boolean
mask row of the causal mask, so it reads the whole cache; decode_attention reads the filled positions only. Each
is captured in a CUDA graph, in whole rounds of at least 20 calls, over cache copies whose filled positions L2 cannot
hold; median replay per call. Both times are whole ops. decode_attention (its kernel and the chunk merge) does
more: it takes the qkv projection as 5 fp32 split-K partials (Llama-3-8B's qkv GEMV at batch 1), sums them, rotates
q and k and writes k and v into the cache, all of which the SDPA path leaves to separate kernels in the model.
`--window W` times decode_attention with a sliding window of W positions too (Mistral-7B v0.1: 4096), which reads
only those.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import sparse_ops  # noqa: E402
from bench_kernels import copies_for, time_us  # noqa: E402

# (name, query heads, key/value heads), head size 128
MODELS = [("llama-3-8b / mistral-7b", 32, 8), ("llama-2-7b", 32, 32)]
MAX_SEQ = 8192


def kv_bytes(B: int, H_kv: int, ctx: int) -> int:
    """The bytes of the filled k and v positions that one layer's decode attention reads (bf16, head size 128)."""
    return 2 * B * H_kv * ctx * 128 * 2


def cache_copies(cache: torch.Tensor, positions: int) -> int:
    """Copies of k (and of v) enough that L2 cannot hold what decode_attention reads of them, `positions` of each
    (the shortest context or the window): sized on the whole cache, 9 copies' first 256 positions fit in L2."""
    return copies_for(cache, positions / MAX_SEQ) // 2 + 1  # a copy is read twice over: k and v


def run(args) -> list:
    rows = []
    for name, H, H_kv in MODELS:
        for B in args.batch:
            cache = torch.randn(B, H_kv, MAX_SEQ, 128, device="cuda", dtype=torch.bfloat16)
            n = cache_copies(cache, min(args.context + [args.window or MAX_SEQ]))
            ks = [cache.clone() for _ in range(n)]
            vs = [cache.clone() for _ in range(n)]
            del cache
            q = torch.randn(B, H, 128, device="cuda", dtype=torch.bfloat16)
            qkv = torch.randn(5, B, (H + 2 * H_kv) * 128, device="cuda")
            freqs = torch.randn(MAX_SEQ, 64, 2, device="cuda")  # a RoPE table: values do not change the time
            causal = torch.tril(torch.ones(MAX_SEQ, MAX_SEQ, dtype=torch.bool, device="cuda"))
            for ctx in args.context:
                pos = torch.tensor([ctx - 1], device="cuda")
                mask = causal[None, None, pos]
                t_sdpa = time_us(lambda i: F.scaled_dot_product_attention(
                    q[:, :, None], ks[i], vs[i], attn_mask=mask, enable_gqa=H != H_kv), n)
                t_ours = time_us(lambda i: sparse_ops.decode_attention(qkv, None, ks[i], vs[i], pos, freqs, H), n)
                gb = kv_bytes(B, H_kv, ctx) / 1e9
                rows.append(dict(model=name, batch=B, context=ctx, sdpa_us=round(t_sdpa, 2),
                                 decode_attention_us=round(t_ours, 2), speedup=round(t_sdpa / t_ours, 2),
                                 tb_s_needed=round(gb / t_ours * 1e6 / 1e3, 2)))
                r = rows[-1]
                line = f"| {name} | {B} | {ctx} | {r['sdpa_us']} | {r['decode_attention_us']} | {r['speedup']}x " \
                       f"| {r['tb_s_needed']} |"
                if args.window:
                    r["window_us"] = round(time_us(lambda i: sparse_ops.decode_attention(
                        qkv, None, ks[i], vs[i], pos, freqs, H, args.window), n), 2)
                    line += f" {r['window_us']} |"
                print(line, flush=True)
            ks = vs = causal = None  # frees the copies before the next model
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=cli.positive_ints, default="256,1024,4096,8192",
                   help=f"comma-separated filled positions, 1-{MAX_SEQ}")
    p.add_argument("--batch", type=cli.positive_ints, default="1,4",
                   help=f"comma-separated batch sizes (decode rows), 1-{sparse_ops.MAX_BATCH}")
    p.add_argument("--window", type=cli.at_least(1), default=None,
                   help="also time decode_attention with a sliding window of this many positions (default: none)")
    p.add_argument("--json", type=cli.out_file, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if max(args.context) > MAX_SEQ or max(args.batch) > sparse_ops.MAX_BATCH:
        p.error(f"--context values must be at most {MAX_SEQ}, --batch values at most {sparse_ops.MAX_BATCH}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, cache of {MAX_SEQ} positions")
    window = f" window {args.window} (us) |" if args.window else ""
    print(f"| model | batch | context | SDPA + mask (us) | decode_attention (us) | speed-up | TB/s on filled k/v |"
          f"{window}")
    print("|---|---|---|---|---|---|---|" + ("---|" if args.window else ""))
    rows = run(args)
    if args.json:
        args.json.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                             max_seq=MAX_SEQ, window=args.window, rows=rows), indent=1))


if __name__ == "__main__":
    cli.run(main)
