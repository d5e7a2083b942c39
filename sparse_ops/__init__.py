"""tealfast's decode ops. Each is a torch custom op (Triton kernel) with a plain-torch reference beside it.

    sparse_gemv(x, wt, thresholds, seg_ends, scale=None)        one weight, a threshold per output segment (q|k|v)
    sparse_gemv_pair(x, wt_a, wt_b, thresholds, scale=None)     two weights on one input (gate, up)
    decode_attention(q, k_cache, v_cache, input_pos, freqs)     one new token's queries (RoPE applied inside)
                                                                against the KV cache

x: (batch <= MAX_BATCH, K); wt: the weight transposed, (K, N) contiguous; thresholds: fp32 tensor, so changing
the sparsity never recompiles; scale: optional (segments, K) fp32 column norms for weight-informed scores.
On CPU without TRITON_INTERPRET=1 the references run.
"""
from typing import Optional

from torch import Tensor

from .attention import _decode_attention_op, check_decode_attention, decode_attention_ref
from .gemv import MAX_BATCH, _check, _sparse_gemv_op, _sparse_gemv_pair_op, pick_config, use_triton
from .reference import keep_mask, rope, sparse_gemv_pair_ref, sparse_gemv_ref

__all__ = ["MAX_BATCH", "sparse_gemv", "sparse_gemv_pair", "sparse_gemv_ref", "sparse_gemv_pair_ref",
           "keep_mask", "pick_config", "decode_attention", "decode_attention_ref", "rope"]


def sparse_gemv(x: Tensor, wt: Tensor, thresholds: Tensor, seg_ends: list, scale: Optional[Tensor] = None) -> Tensor:
    if not 1 <= len(seg_ends) <= 3 or seg_ends[-1] != wt.shape[-1] or list(seg_ends) != sorted(seg_ends):
        raise ValueError(f"seg_ends {list(seg_ends)} must be 1-3 increasing offsets ending at N={wt.shape[-1]}")
    _check(x, [wt], thresholds, len(seg_ends), scale)
    if use_triton(x):
        return _sparse_gemv_op(x, wt, thresholds, list(seg_ends), scale)
    return sparse_gemv_ref(x, wt, thresholds, seg_ends, scale)


def sparse_gemv_pair(x: Tensor, wt_a: Tensor, wt_b: Tensor, thresholds: Tensor,
                     scale: Optional[Tensor] = None) -> Tensor:
    """Returns cat([y_a, y_b], dim=-1)."""
    _check(x, [wt_a, wt_b], thresholds, 2, scale)
    if use_triton(x):
        return _sparse_gemv_pair_op(x, wt_a, wt_b, thresholds, scale)
    return sparse_gemv_pair_ref(x, wt_a, wt_b, thresholds, scale)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, freqs: Tensor) -> Tensor:
    """q: (B, H, D), the new token's queries before RoPE; caches: (B, H_kv, S, D), filled up to input_pos (one
    position); freqs: (D/2, 2) fp32 cos/sin of that position. Returns (B, H, D): causal attention of rope(q) over
    positions 0 .. input_pos, heads grouped as in GQA."""
    check_decode_attention(q, k_cache, v_cache, input_pos, freqs)
    if use_triton(q):
        return _decode_attention_op(q, k_cache, v_cache, input_pos, freqs)
    return decode_attention_ref(q, k_cache, v_cache, input_pos, freqs)
