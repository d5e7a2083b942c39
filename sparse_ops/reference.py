"""Plain-torch references for the GEMV ops and the pieces every op shares (the keep rule, the split-K sum, RoPE):
the CPU path, the prefill path and the tests' oracle. The attention and norm references sit beside their kernels."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def keep_mask(x: Tensor, threshold: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """TEAL's rule: keep input channel i when |x_i| (times ||W[:, i]|| for weighted scores) exceeds t."""
    score = x.abs().float()
    if scale is not None:
        score = score * scale
    return score > threshold


def sum_partials(parts: Tensor, dtype: torch.dtype) -> Tensor:
    """(split, rows, N) split-K partial sums -> (rows, N): summed in fp32, then rounded to dtype (the GEMV's output)."""
    if parts.shape[0] > 1 and torch.compiler.is_compiling():
        # Pointwise adds, which inductor fuses into the consumer (the next norm, say). It fuses a sum(0) only
        # below 8 partials (unroll_reductions_threshold) and would otherwise launch a kernel of its own.
        y = parts[0]  # several partials are fp32 (the ops' checks require it): no cast (docs/benchmarks.md,
        # session 28, timed a run with one)
        for i in range(1, parts.shape[0]):
            y = y + parts[i]
        return y.to(dtype)
    return (parts[0] if parts.shape[0] == 1 else parts.float().sum(0)).to(dtype)  # eager: one kernel


def sparse_gemv_ref(x: Tensor, wt: Tensor, thresholds: Tensor, seg_ends: list,
                    scale: Optional[Tensor] = None) -> Tensor:
    """y[:, seg s] = (x * keep_s(x)) @ wt[:, seg s]. x: (M, K); wt: (K, N), the weight transposed;
    thresholds: (S,) fp32, one per output segment ending at seg_ends[s]; scale: (S, K) or None."""
    outs, start = [], 0
    for s, end in enumerate(seg_ends):
        keep = keep_mask(x, thresholds[s], None if scale is None else scale[s])
        outs.append(torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)) @ wt[:, start:end])
        start = end
    return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]


def sparse_gemv_pair_ref(x: Tensor, wt_a: Tensor, wt_b: Tensor, thresholds: Tensor,
                         scale: Optional[Tensor] = None) -> Tensor:
    """Two weights on one input (gate and up), a threshold each: returns cat([y_a, y_b], -1)."""
    ya = sparse_gemv_ref(x, wt_a, thresholds[0:1], [wt_a.shape[1]], None if scale is None else scale[0:1])
    yb = sparse_gemv_ref(x, wt_b, thresholds[1:2], [wt_b.shape[1]], None if scale is None else scale[1:2])
    return torch.cat([ya, yb], dim=-1)


def sparse_glu_ref(x: Tensor, wt_gate: Tensor, wt_up: Tensor, thresholds: Tensor,
                   scale: Optional[Tensor] = None) -> Tensor:
    """silu(gate) * up from the pair above, rounded as eager torch does (each factor, silu, the product; the
    kernel rounds once, from fp32 sums)."""
    g, u = sparse_gemv_pair_ref(x, wt_gate, wt_up, thresholds, scale).chunk(2, dim=-1)
    return F.silu(g) * u


def rope(x: Tensor, freqs: Tensor) -> Tensor:
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ... of the last dim, in fp32, returned in x's dtype.
    freqs (..., D/2, 2): cos and sin, broadcast against x viewed as (..., D/2, 2). The converters permute
    HF's q/k weights to this pairing."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = freqs[..., 0], freqs[..., 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(-2).type_as(x)
