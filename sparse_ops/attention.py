"""Decode attention: one new query token per row against the KV cache, reading only the filled positions.

SDPA with gpt-fast's mask reads the whole cache (max_seq_length) every step and, with its mask and layout
kernels, costs about 10 us per layer at a 200-token context. Here a split-sequence kernel (flash-decoding) gives
each program one key/value head with its group of query heads and one chunk of the filled positions (chunks are
sized at run time from input_pos, so a CUDA graph serves every length); a second small kernel merges the chunks.
The query's RoPE is applied on the fly, which saves the separate rotation kernel.
"""
import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .gemv import num_sms
from .reference import rope

MAX_SPLIT = 64  # chunks per head: enough to fill an H100 at batch 1 with 8 key/value heads; the merge's tile


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, freqs_ptr, m_ptr, l_ptr, acc_ptr,
    H, HKV, S_MAX, N_SPLIT, STRIDE_QB, qk_scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch row * HKV + key/value head
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    length = tl.load(pos_ptr).to(tl.int32) + 1  # attend positions 0 .. input_pos
    rg = tl.arange(0, BLOCK_G)
    rd = tl.arange(0, BLOCK_D)
    gd_mask = (rg < G)[:, None] & (rd < D)[None, :]
    q_offs = b * STRIDE_QB + (hk * G + rg)[:, None] * D  # the query heads that share this key/value head (GQA)
    # RoPE on interleaved pairs, in fp32 then rounded to the input dtype, as reference.rope
    q = tl.load(q_ptr + q_offs + rd[None, :], mask=gd_mask, other=0.0)
    q_pair = tl.load(q_ptr + q_offs + (rd ^ 1)[None, :], mask=gd_mask, other=0.0).to(tl.float32)
    cos = tl.load(freqs_ptr + (rd // 2) * 2, mask=rd < D, other=0.0)
    sin = tl.load(freqs_ptr + (rd // 2) * 2 + 1, mask=rd < D, other=0.0)
    sin = tl.where(rd % 2 == 0, -sin, sin)
    q = (q.to(tl.float32) * cos[None, :] + q_pair * sin[None, :]).to(q.dtype)
    q = (q.to(tl.float32) * qk_scale).to(q.dtype)  # 1/sqrt(D) and log2(e), for exp2
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    base = pid_bh.to(tl.int64) * S_MAX * D
    chunk = tl.maximum(tl.cdiv(tl.cdiv(length, N_SPLIT), BLOCK_S), 1) * BLOCK_S
    s_lo = pid_s * chunk
    s_hi = tl.minimum(s_lo + chunk, length)
    for s0 in range(s_lo, s_hi, BLOCK_S):  # no iteration for a chunk past the current length
        rs = s0 + tl.arange(0, BLOCK_S)
        sd_mask = (rs < s_hi)[:, None] & (rd < D)[None, :]
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
    tl.store(acc_ptr + row[:, None] * D + rd[None, :], acc, mask=gd_mask)


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, N_SPLIT, D: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    # One program per (batch row, query head): rescale each chunk to the common max and normalise. Chunk 0
    # always holds position 0, so the max is finite; chunks past the current length have m = -inf, weight 0.
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
    The filled length is split evenly at run time, so short contexts use fewer, still full, chunks."""
    if device.type == "cuda":
        block_s = 64
        target = 2 * num_sms(device)
        n_split = target // (batch * n_kv_heads)
    else:  # Triton's interpreter: a few programs, so tests run quickly but still merge several chunks
        block_s, n_split = 16, 3
    return block_s, max(1, min(n_split, MAX_SPLIT, triton.cdiv(max_len, block_s)))


@triton_op("tealfast::decode_attention", mutates_args={})
def _decode_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, freqs: Tensor) -> Tensor:
    B, H, D = q.shape
    HKV, S = k_cache.shape[1], k_cache.shape[2]
    block_s, n_split = pick_split(B, HKV, S, q.device)
    m = torch.empty((B, H, n_split), device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty((B, H, n_split, D), device=q.device, dtype=torch.float32)
    G = H // HKV
    block_d = max(16, triton.next_power_of_2(D))
    wrap_triton(_decode_attention_kernel)[(B * HKV, n_split)](
        q, k_cache, v_cache, input_pos, freqs, m, l, acc,
        H, HKV, S, n_split, q.stride(0), math.log2(math.e) / math.sqrt(D),
        G=G, D=D, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_D=block_d, BLOCK_S=block_s,
        DOT_F32=q.dtype == torch.float32 or not q.is_cuda, num_warps=4, num_stages=2)
    out = torch.empty((B, H, D), device=q.device, dtype=q.dtype)
    wrap_triton(_merge_kernel)[(B * H,)](m, l, acc, out, n_split, D=D,
                                          BLOCK_SPLIT=triton.next_power_of_2(n_split), BLOCK_D=block_d)
    return out


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, input_pos, freqs):
    return q.new_empty(q.shape)


def check_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, freqs: Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be (B, H, D) and the caches equal (B, H_kv, S, D), got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, H, D = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or H % k_cache.shape[1] or D % 2:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}")
    if q.stride()[1:] != (D, 1) or not (k_cache.is_contiguous() and v_cache.is_contiguous() and freqs.is_contiguous()):
        raise ValueError("the caches, freqs and each row of q must be contiguous")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"cache dtype {k_cache.dtype} differs from q dtype {q.dtype}")
    if input_pos.numel() != 1 or input_pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_pos must hold one integer position, got {input_pos.dtype} {tuple(input_pos.shape)}")
    if freqs.numel() != D or freqs.dtype != torch.float32:
        raise ValueError(f"freqs must be the fp32 (D/2, 2) cos/sin of the position, got {freqs.dtype} "
                         f"{tuple(freqs.shape)}")
    if len({q.device, k_cache.device, v_cache.device, input_pos.device, freqs.device}) != 1:
        raise ValueError("q, the caches, input_pos and freqs must be on one device")


def decode_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, freqs: Tensor) -> Tensor:
    """Plain-torch reference: RoPE on q, then softmax(q k^T / sqrt(D)) v over positions 0 .. input_pos, in fp32."""
    B, H, D = q.shape
    rep = H // k_cache.shape[1]
    dtype = q.dtype
    q = rope(q, freqs.reshape(D // 2, 2)).float()
    keep = (torch.arange(k_cache.shape[2], device=q.device) <= input_pos.reshape(()))[:, None]
    k = k_cache.float().masked_fill(~keep, 0).repeat_interleave(rep, dim=1)  # (B, H, S, D); unfilled slots zeroed
    v = v_cache.float().masked_fill(~keep, 0).repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q, k) / math.sqrt(D)
    probs = torch.softmax(scores.masked_fill(~keep[:, 0], float("-inf")), dim=-1)
    return torch.einsum("bhs,bhsd->bhd", probs, v).to(dtype)
