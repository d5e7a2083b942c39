"""tealfast's decode ops. Each is a torch custom op (Triton kernel) with a plain-torch reference beside it.

    sparse_gemv(x, wt, thresholds, seg_ends, scale=None, reduce=True)
                                                                one weight, a threshold per output segment (q|k|v)
    sparse_gemv_pair(x, wt_a, wt_b, thresholds, scale=None)     two weights on one input (gate, up)
    sparse_glu(x, wt_gate, wt_up, thresholds, scale=None, kept=None)
                                                                silu(gate) * up, the MLP's hidden activation
    decode_attention(qkv, bias, k_cache, v_cache, input_pos, freqs, n_head, window=0)
                                                                one new token: qkv's partials summed, RoPE, cache
                                                                write and attention over the filled cache (or
                                                                its last `window` positions)
    add_rmsnorm(x, parts, weight, eps, thresholds, scale=None)
                                                                residual add of a GEMV's partials and RMSNorm,
                                                                listing the channels that gate or up keeps

x: (batch <= MAX_BATCH, K); wt: the weight transposed, (K, N) contiguous; thresholds: fp32 tensor, so changing
the sparsity never recompiles; scale: optional (segments, K) fp32 column norms for weight-informed scores;
kept: sparse_glu's list of the channels of a one-row x that gate or up keeps, made by add_rmsnorm with the same
thresholds and scale (the kernel then streams them without listing them itself).
On CPU without TRITON_INTERPRET=1 the references run.
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .attention import _decode_attention_op, check_decode_attention, decode_attention_ref
from .gemv import (MAX_BATCH, SEGMENT_MULTIPLE, _sparse_gemv_op, _sparse_gemv_pair_op, _sparse_glu_op, check_gemv,
                   pick_config, use_triton)
from .norm import LIST_GROUP, _add_rmsnorm_op, add_rmsnorm_ref, check_add_rmsnorm
from .reference import keep_mask, rope, sparse_gemv_pair_ref, sparse_gemv_ref, sparse_glu_ref, sum_partials

__all__ = ["MAX_BATCH", "SEGMENT_MULTIPLE", "LIST_GROUP", "sparse_gemv", "sparse_gemv_pair", "sparse_gemv_ref",
           "sparse_gemv_pair_ref", "sparse_glu", "sparse_glu_ref", "keep_mask", "pick_config", "decode_attention",
           "decode_attention_ref", "rope", "add_rmsnorm", "add_rmsnorm_ref"]


def sparse_gemv(x: Tensor, wt: Tensor, thresholds: Tensor, seg_ends: list, scale: Optional[Tensor] = None,
                reduce: bool = True) -> Tensor:
    """reduce=False returns the kernel's split-K partial sums, (split, batch, N), for a consumer that sums them
    itself (decode_attention, add_rmsnorm); fp32 when split > 1."""
    ends = list(seg_ends)
    if not 1 <= len(ends) <= 3 or not all(type(e) is int for e in ends) or ends[0] < 0 or ends != sorted(ends) \
            or ends[-1] != wt.shape[-1]:
        raise ValueError(f"seg_ends {ends} must be 1-3 non-decreasing int offsets from 0 ending at N={wt.shape[-1]}")
    check_gemv(x, [wt], thresholds, len(ends), scale)
    if use_triton(x):
        parts = _sparse_gemv_op(x, wt, thresholds, ends, scale)
        return sum_partials(parts, x.dtype) if reduce else parts
    y = sparse_gemv_ref(x, wt, thresholds, ends, scale)
    return y if reduce else y[None]


def sparse_gemv_pair(x: Tensor, wt_a: Tensor, wt_b: Tensor, thresholds: Tensor,
                     scale: Optional[Tensor] = None) -> Tensor:
    """Returns cat([y_a, y_b], dim=-1)."""
    check_gemv(x, [wt_a, wt_b], thresholds, 2, scale)
    if use_triton(x):
        return sum_partials(_sparse_gemv_pair_op(x, wt_a, wt_b, thresholds, scale), x.dtype)
    return sparse_gemv_pair_ref(x, wt_a, wt_b, thresholds, scale)


def sparse_glu(x: Tensor, wt_gate: Tensor, wt_up: Tensor, thresholds: Tensor, scale: Optional[Tensor] = None,
               kept: Optional[Tensor] = None) -> Tensor:
    """silu(gate) * up, gate and up each a sparse GEMV of x with its own threshold (and scale); (batch, N).

    With `kept` (one row) a single kernel computes it: each program holds the same columns of both weights, so it
    applies silu(gate) * up to whole sums and the elementwise kernel between the MLP's GEMVs goes away."""
    check_gemv(x, [wt_gate, wt_up], thresholds, 2, scale, kept)
    if wt_gate.shape != wt_up.shape:
        raise ValueError(f"gate and up weights differ in shape: {tuple(wt_gate.shape)}, {tuple(wt_up.shape)}")
    if not use_triton(x):
        return sparse_glu_ref(x, wt_gate, wt_up, thresholds, scale)
    if kept is not None:
        return _sparse_glu_op(x, wt_gate, wt_up, thresholds, scale, kept)
    g, u = sparse_gemv_pair(x, wt_gate, wt_up, thresholds, scale).chunk(2, dim=-1)  # a batch: the pair kernel
    return F.silu(g) * u


def decode_attention(qkv: Tensor, bias: Optional[Tensor], k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
                     freqs: Tensor, n_head: int, window: int = 0) -> Tensor:
    """One decode step of attention, from the qkv projection to the attention output.

    qkv: (parts, B, (n_head + 2 H_kv) D), the projection's split-K partial sums (parts=1: the projection itself),
    q|k|v before the bias and RoPE; caches: (B_max >= B, H_kv, S, D), filled before input_pos (one position);
    freqs: (>= S, D/2, 2) fp32 RoPE table (cos, sin per position; the kernel reads row input_pos, so a CUDA graph
    needs no index kernel per step); input_pos < S (past the cache the kernel writes nothing, the reference
    raises). Writes the new token's rotated k and its v at input_pos into the caches and returns (B, n_head, D):
    causal attention of rope(q) over positions 0 .. input_pos (GQA); with a sliding window (window > 0), over the
    last `window` of them, input_pos included, as transformers' sliding-window mask."""
    check_decode_attention(qkv, bias, k_cache, v_cache, input_pos, freqs, n_head, window)
    if use_triton(qkv):
        return _decode_attention_op(qkv, bias, k_cache, v_cache, input_pos, freqs, n_head, window)
    return decode_attention_ref(qkv, bias, k_cache, v_cache, input_pos, freqs, n_head, window)


def add_rmsnorm(x: Tensor, parts: Tensor, weight: Tensor, eps: float, thresholds: Tensor,
                scale: Optional[Tensor] = None) -> tuple:
    """Decode's residual add and RMSNorm before the MLP at batch 1: h = x + (sum of parts in x's dtype),
    y = RMSNorm(h) * weight, and the list of the channels of y that gate or up keeps (sparse_glu's `kept`).

    x: (1, D) the residual stream; parts: (parts, 1, D), the o GEMV's split-K partial sums; thresholds: (2,),
    gate's and up's (scale likewise, (2, D)). Returns (h, y, kept): kept is (1, D + 1) int32 (format in
    sparse_ops/norm.py)."""
    check_add_rmsnorm(x, parts, weight, thresholds, scale)
    if use_triton(x):
        return _add_rmsnorm_op(x, parts, weight, eps, thresholds, scale)
    return add_rmsnorm_ref(x, parts, weight, eps, thresholds, scale)
