"""Decode attention: one new query token per row against the KV cache, reading only the filled positions.

SDPA with gpt-fast's mask reads the whole cache (max_seq_length) every step and, with its mask and layout
kernels, costs about 10 us per layer at a 200-token context. Here a split-sequence kernel (flash-decoding) gives
each program one key/value head with its group of query heads and one chunk of the filled positions (chunks are
sized at run time from input_pos, so a CUDA graph serves every length); a second small kernel merges the chunks.
A sliding window (Mistral's, Qwen2's) only moves the first position attended: the chunks cover the window.
The kernel also takes the qkv projection as it comes out of the sparse GEMV, split-K partial sums: it sums
them, adds the bias, applies RoPE to q and k and writes the new k and v into the cache, work that otherwise runs
as four small kernels per layer.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .gemv import num_sms, partials_sum
from .reference import rope, sum_partials

MAX_SPLIT = 64  # chunks per head: enough to fill an H100 at batch 1 with 8 key/value heads; the merge's tile


@triton.jit
def _rotated(x, cos, sin, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """RoPE on the interleaved pairs of x (ROWS, BLOCK_D) in fp32, rounded back to x's dtype, as reference.rope;
    cos, sin: (BLOCK_D // 2,)."""
    even, odd = tl.split(tl.reshape(x.to(tl.float32), (ROWS, BLOCK_D // 2, 2)))
    out = tl.join(even * cos[None, :] - odd * sin[None, :], odd * cos[None, :] + even * sin[None, :])
    return tl.reshape(out, (ROWS, BLOCK_D)).to(x.dtype)


@triton.jit
def _decode_attention_kernel(
    qkv_ptr, bias_ptr, k_ptr, v_ptr, pos_ptr, freqs_ptr, m_ptr, l_ptr, acc_ptr,
    STRIDE_P, STRIDE_B, H, HKV, S_MAX, N_SPLIT, WINDOW, qk_scale,
    N_PARTS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch row * HKV + key/value head
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    dt = k_ptr.dtype.element_ty
    pos = tl.load(pos_ptr).to(tl.int32)
    # attend positions start .. input_pos (start: 0, or the window's first); a position past the cache (a caller's
    # bug, which a host check would find only with a sync per step) reads and writes nothing outside it
    length = tl.minimum(pos + 1, S_MAX)
    start = tl.maximum(length - WINDOW, 0) if HAS_WINDOW else 0  # a constexpr: full attention's code as before
    base = pid_bh.to(tl.int64) * S_MAX * D
    chunk = tl.maximum(tl.cdiv(tl.cdiv(length - start, N_SPLIT), BLOCK_S), 1) * BLOCK_S
    s_lo = start + pid_s * chunk
    s_hi = tl.minimum(s_lo + chunk, length)
    rg = tl.arange(0, BLOCK_G)
    rd = tl.arange(0, BLOCK_D)
    rh = tl.arange(0, BLOCK_D // 2)
    d_mask = rd < D
    f_mask = (rh < D // 2) & (pos >= 0) & (pos < S_MAX)
    cos = tl.load(freqs_ptr + pos * D + 2 * rh, mask=f_mask, other=0.0)  # the RoPE table's row pos
    sin = tl.load(freqs_ptr + pos * D + 2 * rh + 1, mask=f_mask, other=0.0)
    row_ptr = qkv_ptr + b * STRIDE_B
    # q for the query heads that share this key/value head (GQA); a chunk past the current length attends to
    # nothing and loads no q (masked loads move no bytes)
    q_mask = (rg < G)[:, None] & d_mask[None, :] & (s_lo < s_hi)
    q = partials_sum(row_ptr, bias_ptr, (hk * G + rg)[:, None] * D + rd[None, :], q_mask, STRIDE_P, N_PARTS,
                     HAS_BIAS, dt)
    # The chunk that holds the new token also sums its k and v (loads issued with q's), writes them to the cache
    holds_new = (pos >= s_lo) & (pos < s_hi)  # false past the cache: s_hi <= S_MAX
    k_cols = H * D + hk * D + rd
    k = partials_sum(row_ptr, bias_ptr, k_cols[None, :], (d_mask & holds_new)[None, :], STRIDE_P, N_PARTS, HAS_BIAS,
                     dt)
    v = partials_sum(row_ptr, bias_ptr, k_cols + HKV * D, d_mask & holds_new, STRIDE_P, N_PARTS, HAS_BIAS, dt)
    q = _rotated(q, cos, sin, BLOCK_G, BLOCK_D)
    q = (q.to(tl.float32) * qk_scale).to(dt)  # 1/sqrt(D) and log2(e), for exp2
    if holds_new:
        tl.store(k_ptr + base + pos * D + rd[None, :], _rotated(k, cos, sin, 1, BLOCK_D), mask=d_mask[None, :])
        tl.store(v_ptr + base + pos * D + rd, v, mask=d_mask)
        tl.debug_barrier()  # the loop below reads them back through other threads of this program
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):  # no iteration for a chunk past the current length
        rs = s0 + tl.arange(0, BLOCK_S)
        sd_mask = (rs < s_hi)[:, None] & d_mask[None, :]
        offs = base + rs[:, None] * D + rd[None, :]
        kt = tl.load(k_ptr + offs, mask=sd_mask, other=0.0)
        vt = tl.load(v_ptr + offs, mask=sd_mask, other=0.0)
        if DOT_F32:  # Triton's CPU interpreter gets low-precision dots wrong
            s = tl.dot(q.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        s = tl.where((rs < s_hi)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every step has at least one valid position
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    row = (b * H + hk * G + rg) * N_SPLIT + pid_s  # (B, H, N_SPLIT) statistics, (B, H, N_SPLIT, D) partials
    tl.store(m_ptr + row, m_i, mask=rg < G)
    tl.store(l_ptr + row, l_i, mask=rg < G)
    tl.store(acc_ptr + row[:, None] * D + rd[None, :], acc, mask=(rg < G)[:, None] & d_mask[None, :])


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, N_SPLIT, D: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    # One program per (batch row, query head): rescale each chunk to the common max and normalise. Chunk 0
    # always holds the first attended position, so the max is finite; chunks past the current length have
    # m = -inf, weight 0.
    row = tl.program_id(0)
    rs = tl.arange(0, BLOCK_SPLIT)
    rd = tl.arange(0, BLOCK_D)
    m = tl.load(m_ptr + row * N_SPLIT + rs, mask=rs < N_SPLIT, other=float("-inf"))
    w = tl.exp2(m - tl.max(m, axis=0))
    l = tl.load(l_ptr + row * N_SPLIT + rs, mask=rs < N_SPLIT, other=0.0)
    acc = tl.load(acc_ptr + (row * N_SPLIT + rs)[:, None] * D + rd[None, :],
                  mask=(rs < N_SPLIT)[:, None] & (rd < D)[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + row * D + rd, out.to(out_ptr.dtype.element_ty), mask=rd < D)


def pick_split(batch: int, n_kv_heads: int, max_len: int, device: torch.device) -> tuple:
    """(BLOCK_S, N_SPLIT): positions per loop step, and chunks per head, about two programs per SM on a GPU.
    The attended length (up to max_len) is split evenly at run time, so short contexts use fewer, still full,
    chunks."""
    if device.type == "cuda":
        block_s = 64
        target = 2 * num_sms(device)
        n_split = target // (batch * n_kv_heads)
    else:  # Triton's interpreter: a few programs, so tests run quickly but still merge several chunks
        block_s, n_split = 16, 3
    return block_s, max(1, min(n_split, MAX_SPLIT, triton.cdiv(max_len, block_s)))


@triton_op("tealfast::decode_attention", mutates_args={"k_cache", "v_cache"})
def _decode_attention_op(qkv: Tensor, bias: Optional[Tensor], k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
                         freqs: Tensor, n_head: int, window: int) -> Tensor:
    n_parts, B, _ = qkv.shape
    HKV, S, D = k_cache.shape[1:]
    H = n_head
    block_s, n_split = pick_split(B, HKV, min(S, window or S), qkv.device)
    m = torch.empty((B, H, n_split), device=qkv.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty((B, H, n_split, D), device=qkv.device, dtype=torch.float32)
    G = H // HKV
    block_d = max(16, triton.next_power_of_2(D))
    wrap_triton(_decode_attention_kernel)[(B * HKV, n_split)](
        qkv, bias if bias is not None else freqs, k_cache, v_cache, input_pos, freqs, m, l, acc,
        qkv.stride(0), qkv.stride(1), H, HKV, S, n_split, window, math.log2(math.e) / math.sqrt(D),
        N_PARTS=n_parts, HAS_BIAS=bias is not None, HAS_WINDOW=window > 0, G=G, D=D,
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_D=block_d, BLOCK_S=block_s,
        DOT_F32=k_cache.dtype == torch.float32 or not qkv.is_cuda, num_warps=4, num_stages=2)
    out = torch.empty((B, H, D), device=qkv.device, dtype=k_cache.dtype)
    wrap_triton(_merge_kernel)[(B * H,)](m, l, acc, out, n_split, D=D,
                                          BLOCK_SPLIT=triton.next_power_of_2(n_split), BLOCK_D=block_d)
    return out


@_decode_attention_op.register_fake
def _(qkv, bias, k_cache, v_cache, input_pos, freqs, n_head, window):
    return k_cache.new_empty((qkv.shape[1], n_head, k_cache.shape[3]))


def check_decode_attention(qkv: Tensor, bias: Optional[Tensor], k_cache: Tensor, v_cache: Tensor,
                           input_pos: Tensor, freqs: Tensor, n_head: int, window: int) -> None:
    if type(window) is not int or window < 0:
        raise ValueError(f"window must be an int >= 0 (0: no window), got {window!r}")
    if qkv.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"qkv must be (parts, B, N) and the caches equal (B_max, H_kv, S, D), got "
                         f"{tuple(qkv.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    _, B, N = qkv.shape
    B_max, HKV, _, D = k_cache.shape
    if B > B_max or n_head % HKV or D % 2 or N != (n_head + 2 * HKV) * D:
        raise ValueError(f"qkv {tuple(qkv.shape)} with {n_head} query heads does not fit the cache "
                         f"{tuple(k_cache.shape)}")
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != k_cache.dtype or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous ({N},) {k_cache.dtype} tensor, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    if qkv.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous() and freqs.is_contiguous()):
        raise ValueError("the caches, freqs and each row of qkv must be contiguous")
    if qkv.dtype not in (k_cache.dtype, torch.float32) or v_cache.dtype != k_cache.dtype \
            or (qkv.shape[0] > 1 and qkv.dtype != torch.float32):
        raise TypeError(f"qkv dtype {qkv.dtype} ({qkv.shape[0]} parts) and cache dtypes {k_cache.dtype}, "
                        f"{v_cache.dtype}: the caches must agree, and qkv be fp32 partial sums or one output in "
                        "their dtype")
    if input_pos.numel() != 1 or input_pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_pos must hold one integer position, got {input_pos.dtype} {tuple(input_pos.shape)}")
    if freqs.dim() != 3 or tuple(freqs.shape[1:]) != (D // 2, 2) or freqs.shape[0] < k_cache.shape[2] \
            or freqs.dtype != torch.float32:
        raise ValueError(f"freqs must be the fp32 RoPE table (positions >= {k_cache.shape[2]}, {D // 2}, 2), got "
                         f"{freqs.dtype} {tuple(freqs.shape)}")
    devices = {qkv.device, k_cache.device, v_cache.device, input_pos.device, freqs.device}
    if len(devices | ({bias.device} if bias is not None else set())) != 1:
        raise ValueError("qkv, the bias, the caches, input_pos and freqs must be on one device")


def decode_attention_ref(qkv: Tensor, bias: Optional[Tensor], k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
                         freqs: Tensor, n_head: int, window: int = 0) -> Tensor:
    """Plain-torch reference, the same contract as the op: sum the partials, add the bias, rotate k and write k, v
    at input_pos into the caches (in place); return softmax(rope(q) k^T / sqrt(D)) v over 0 .. input_pos, or
    over its last `window` positions."""
    _, B, _ = qkv.shape
    HKV, S, D = k_cache.shape[1:]
    dtype = k_cache.dtype
    y = sum_partials(qkv, dtype)
    if bias is not None:
        y = y + bias
    q, k, v = y.split([n_head * D, HKV * D, HKV * D], dim=-1)
    pos = input_pos.reshape(())
    f = freqs[pos]
    k_cache[:B, :, pos] = rope(k.reshape(B, HKV, D), f)
    v_cache[:B, :, pos] = v.reshape(B, HKV, D)
    q = rope(q.reshape(B, n_head, D), f).float()
    rep = n_head // HKV
    s = torch.arange(S, device=q.device)
    keep = ((s <= pos) & ((s > pos - window) if window else True))[:, None]
    k = k_cache[:B].float().masked_fill(~keep, 0).repeat_interleave(rep, dim=1)  # (B, H, S, D); unfilled slots zeroed
    v = v_cache[:B].float().masked_fill(~keep, 0).repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q, k) / math.sqrt(D)
    probs = torch.softmax(scores.masked_fill(~keep[:, 0], float("-inf")), dim=-1)
    return torch.einsum("bhs,bhsd->bhd", probs, v).to(dtype)
