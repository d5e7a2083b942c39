"""Throwaway: why the real-SmolLM2 GPU test fails. Errors of the sparse decode against the masked reference, split
into kernels vs reference ops on the same decode path, threshold 0, and per step."""
import sys
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]
import torch
import checkpoint, textdata, sparse_ops, model
import sparse_ops.gemv as gemv
import test_generate as tg
from tokenizer import get_tokenizer

d = Path(sys.argv[1])
dev = sys.argv[2] if len(sys.argv) > 2 else "cuda"
m = checkpoint.load_model(d / "model.pth", device=dev, dtype=getattr(torch, sys.argv[3] if len(sys.argv) > 3 else "float32"))
ids = textdata.encode_head(get_tokenizer(d), textdata.heldout_text(), 2000)


def per_step(a, b):
    return [round(((a[:, i] - b[:, i]).abs().max() / b.abs().max()).item(), 7) for i in range(a.shape[1])]


for batch in (1, 2):
    idx = torch.tensor([ids[100 + 500 * b:100 + 500 * b + tg.TOTAL] for b in range(batch)], device=dev)
    thr = tg.random_thresholds(m, idx, weighted=False, seed=batch)
    want, counts = tg.reference_logits(m, idx, thr, False, tg.PROMPT)
    want = want[:, tg.PROMPT - 1:tg.TOTAL - 1]
    dense, _ = tg.reference_logits(m, idx, torch.zeros_like(thr), False, tg.TOTAL)
    dense = dense[:, tg.PROMPT - 1:tg.TOTAL - 1]
    got = tg.sparse_decode_logits(m, idx, thr, False)
    got0 = tg.sparse_decode_logits(m, idx, torch.zeros_like(thr), False)
    orig = sparse_ops.use_triton
    for mod in (sparse_ops, gemv):
        mod.use_triton = lambda x: False
    try:
        gotref = tg.sparse_decode_logits(m, idx, thr, False)
    finally:
        for mod in (sparse_ops, gemv):
            mod.use_triton = orig
    print(f"batch {batch}: kernels vs masked ref {tg.max_rel_err(got, want):.3g} per step {per_step(got, want)}")
    print(f"  reference ops (same decode path) vs masked ref {tg.max_rel_err(gotref, want):.3g} per step {per_step(gotref, want)}")
    print(f"  kernels vs reference ops {tg.max_rel_err(got, gotref):.3g} per step {per_step(got, gotref)}")
    print(f"  threshold 0: kernels vs dense {tg.max_rel_err(got0, dense):.3g}; dense vs masked {tg.max_rel_err(dense, want):.3g}")
    print(f"  argmax agree kernels/ref {(got.argmax(-1) == want.argmax(-1)).float().mean().item():.3f}")
    print(f"  dropped {(counts[:, 0] / counts[:, 1]).tolist()}")
