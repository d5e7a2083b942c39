"""Thresholded sparse GEMV: y = (x * 1[|x| > t]) @ Wt, reading only the rows of Wt (= columns of W) it needs.

The weight is passed transposed, Wt (K, N) contiguous, so one kept input channel k is one contiguous row
Wt[k, :]. Each program owns BLOCK_N outputs and a 1/SPLIT_K share of the inputs. With one decode row it first
lists its kept channels (the gate|up GLU takes them listed by the norm that made x, sparse_ops/norm.py), then
streams only their rows; or, where the weight is small and each program's share short (o), it loads its share's rows in
windows, masked by the keep mask, with no list. With a batch it streams tiles and loads a row where any batch row
keeps the channel. The GEMV ops return the split-K partial sums, (SPLIT_K, B, N), fp32 where there are several
(x's dtype for one); their sum and cast are plain torch ops that inductor fuses into the consumer (or a consumer
kernel sums them itself with `partials_sum`, as decode attention and the fused norm do), so no zero-fill or atomics
are needed. The GLU op has one K range and returns silu(gate) * up itself.
"""
import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

MAX_BATCH = 8  # decode rows a launch takes; more rows go to the dense-masked reference (prefill)
SEGMENT_MULTIPLE = 16  # the smallest output tile: where thresholds change (q|k|v, gate|up) a tile must end
# Batch-1 programs of one K range and segment list the same channels. Groups of this many neighbours share one
# list: with one list per K range, up to 112 programs stored to the same addresses (Llama-3's gate alone at 90%:
# 10.4-12.1 us against 9.2-9.4 with groups of 8 or a list per program; docs/benchmarks.md, session 40).
LIST_SHARERS = 8


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, wa_ptr, wb_ptr, scale_ptr, thr_ptr, idx_ptr, out_ptr,
    B, K, N, N_A, SEG1, SEG2, K_PER_SPLIT,
    HAS_SCALE: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, GLU: tl.constexpr,
    WINDOWS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    SHARERS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_lo = pid_k * K_PER_SPLIT
    rk = tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    if GLU:
        # silu(gate) * up (batch 1, listed, one K range): the left half of the tile is gate's columns
        # pid_n * H .. + H - 1 (from wa), the right half up's same columns (from wb), so the program holds both
        # factors of its H outputs
        H: tl.constexpr = BLOCK_N // 2
        cols = pid_n * H + rn % H
        col_ptrs = tl.where(rn < H, wa_ptr + cols, wb_ptr + cols)
        ld = N_A
        n_mask = cols < N_A
        seg = 0
        thr = tl.load(thr_ptr)
    else:
        n0 = pid_n * BLOCK_N
        # A block never straddles a segment (the wrapper picks BLOCK_N so), so threshold and weight are per block.
        seg = (n0 >= SEG1).to(tl.int32) + (n0 >= SEG2).to(tl.int32)
        thr = tl.load(thr_ptr + seg)
        if n0 < N_A:
            w_ptr = wa_ptr
            ld = N_A
            col0 = n0
        else:
            w_ptr = wb_ptr
            ld = N - N_A
            col0 = n0 - N_A
        cols = col0 + rn
        col_ptrs = w_ptr + cols
        n_mask = cols < ld
        out_cols = n0 + rn
    seg_scale = scale_ptr + seg * K  # this segment's column norms (weighted scores)
    if USE_DOT:
        # Batch > 1: the rows' masks have few zeros in common, so stream the K range tile by tile; a weight row
        # is loaded where any batch row keeps its channel, and each row applies its own mask through the dot.
        rb = tl.arange(0, BLOCK_B)
        b_mask = rb < B
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            ks = k_lo + k0 + rk
            k_mask = ks < K
            xv = tl.load(x_ptr + rb[:, None] * K + ks[None, :], mask=b_mask[:, None] & k_mask[None, :], other=0.0)
            score = tl.abs(xv.to(tl.float32))
            if HAS_SCALE:
                score = score * tl.load(seg_scale + ks, mask=k_mask, other=0.0)[None, :]
            keep = score > thr
            any_keep = tl.max(keep.to(tl.int32), axis=0) > 0
            w = tl.load(col_ptrs[None, :] + ks[:, None] * ld, mask=any_keep[:, None] & n_mask[None, :], other=0.0)
            xm = tl.where(keep, xv, 0.0).to(w.dtype)
            if DOT_F32:  # Triton's CPU interpreter gets bf16 dots wrong; fp32 there, tensor cores on GPU
                acc = tl.dot(xm.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xm, w, acc, input_precision="ieee")
        tl.store(out_ptr + pid_k * B * N + rb[:, None] * N + out_cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=b_mask[:, None] & (out_cols < N)[None, :])
    elif WINDOWS > 0:
        acc = _stream_windows(x_ptr, col_ptrs, ld, n_mask, k_lo, K, thr, seg_scale, HAS_SCALE, WINDOWS, BLOCK_K,
                              BLOCK_N)
        tl.store(out_ptr + pid_k * N + out_cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=out_cols < N)
    else:
        if GLU:
            # The channels listed by the norm that made x (sparse_ops.norm's format; one K range, the whole list):
            # those that gate or up keeps, so each half of the tile still applies its own threshold
            idx_base = idx_ptr
            count = tl.load(idx_ptr + K)
        else:
            # Batch 1, phase 1: list the kept channels of this K range, in order, in the scratch slot
            # [seg, pid_k, pid_n // SHARERS] of a (segments, SPLIT_K, groups, K_PER_SPLIT) array. Every program of
            # the same (segment, K range) computes the same list from the same x, so a group may share a slot.
            n_groups = tl.cdiv(tl.num_programs(0), SHARERS)
            idx_base = idx_ptr + ((seg * tl.num_programs(1) + pid_k) * n_groups + pid_n // SHARERS) * K_PER_SPLIT
            rc = tl.arange(0, CHUNK)
            count = pid_k * 0
            for c0 in range(0, K_PER_SPLIT, CHUNK):
                ks = k_lo + c0 + rc
                valid = ((c0 + rc) < K_PER_SPLIT) & (ks < K)
                score = tl.abs(tl.load(x_ptr + ks, mask=valid, other=0.0).to(tl.float32))
                if HAS_SCALE:
                    score = score * tl.load(seg_scale + ks, mask=valid, other=0.0)
                keep = (score > thr) & valid
                kept = keep.to(tl.int32)
                tl.store(idx_base + count + tl.cumsum(kept, 0) - 1, ks, mask=keep)
                count += tl.sum(kept, 0)
            tl.debug_barrier()  # the list is read back by other threads of this program
        # A stream of more than four steps loads its weights with an evict-first hint for L2, which keeps x, the
        # lists and the partials there: 1-3% faster on long streams (25-65%); on short ones (90%) it costs up to
        # 42% (docs/benchmarks.md, session 15)
        if count > 4 * BLOCK_K:
            acc = _stream_listed(x_ptr, col_ptrs, ld, n_mask, idx_base, count, BLOCK_K, BLOCK_N, thr, seg_scale,
                                 HAS_SCALE, GLU, thr_ptr, scale_ptr + K, "evict_first")
        else:
            acc = _stream_listed(x_ptr, col_ptrs, ld, n_mask, idx_base, count, BLOCK_K, BLOCK_N, thr, seg_scale,
                                 HAS_SCALE, GLU, thr_ptr, scale_ptr + K, "")
        y = tl.sum(acc, axis=0)
        if GLU:
            # silu(gate) * up from the fp32 sums, rounded once
            g, u = tl.split(tl.permute(tl.reshape(y, (2, H)), (1, 0)))
            hc = pid_n * H + tl.arange(0, H)
            tl.store(out_ptr + hc, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=hc < N_A)
        else:
            tl.store(out_ptr + pid_k * N + out_cols, y.to(out_ptr.dtype.element_ty), mask=out_cols < N)


@triton.jit
def _masked_x(xv, rows, jm, thr, scale_ptr, HAS_SCALE: tl.constexpr):
    """xv where its (weighted) score passes thr, else 0."""
    score = tl.abs(xv)
    if HAS_SCALE:
        score = score * tl.load(scale_ptr + rows, mask=jm, other=0.0)
    return tl.where(score > thr, xv, 0.0)


@triton.jit
def _stream_windows(x_ptr, col_ptrs, ld, n_mask, k_lo, K, thr, scale_ptr, HAS_SCALE: tl.constexpr,
                    WINDOWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Batch 1 without a list: the program's WINDOWS * BLOCK_K channels from k_lo, each window's weight rows
    loaded where x is kept (masked rows move no bytes). Every load's address depends on x alone, so the compiler
    can issue several windows' loads at once, and the call's chain is x, weights, one reduction; listing adds a
    store, a barrier and a read-back before the first weight load (o at 50%: 9.1 us against 10.9, but on
    longer shares, qkv's and the MLP's, the windows' masked rows cost more than the list: docs/benchmarks.md)."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for i in tl.static_range(WINDOWS):
        rows = k_lo + i * BLOCK_K + rk
        jm = rows < K
        xv = _masked_x(tl.load(x_ptr + rows, mask=jm, other=0.0).to(tl.float32), rows, jm, thr, scale_ptr, HAS_SCALE)
        w = tl.load(col_ptrs[None, :] + rows[:, None] * ld, mask=(xv != 0.0)[:, None] & n_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * xv[:, None]
    return acc


@triton.jit
def _stream_listed(x_ptr, col_ptrs, ld, n_mask, idx_base, count, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   thr, scale_ptr, HAS_SCALE: tl.constexpr, GLU: tl.constexpr,
                   thr_ptr, scale_b_ptr, EVICTION: tl.constexpr):
    """Batch 1, phase 2: stream only the listed rows of Wt, BLOCK_K at a time. Every load moves needed bytes and
    the loop is count / BLOCK_K steps long, not K_PER_SPLIT / BLOCK_K: what makes high sparsity pay.
    GLU: the list is a union over gate and up, the tile's right half up's (threshold thr_ptr[1], scores
    scale_b_ptr): each half zeroes the inputs its own threshold drops. Otherwise the list is the segment's own.
    EVICTION: the weight loads' eviction policy ("evict_first", or "" for the default)."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # reduced once at the end, not every step
    if GLU:
        thr_b = tl.load(thr_ptr + 1)
        left = (tl.arange(0, BLOCK_N) < BLOCK_N // 2)[None, :]
    # The next step's list entries are loaded a step ahead, so a step's weight loads wait for no list read
    # (long loops gain most: the listed gate|up GEMV at 40-50% 4-5% faster, docs/benchmarks.md)
    next_rows = tl.load(idx_base + rk, mask=rk < count, other=0, cache_modifier=".cg")
    for j0 in range(0, count, BLOCK_K):
        jm = (j0 + rk) < count
        rows = next_rows
        w = tl.load(col_ptrs[None, :] + rows[:, None] * ld, mask=jm[:, None] & n_mask[None, :], other=0.0,
                    eviction_policy=EVICTION)
        xv = tl.load(x_ptr + rows, mask=jm, other=0.0).to(tl.float32)
        nj = j0 + BLOCK_K + rk
        next_rows = tl.load(idx_base + nj, mask=nj < count, other=0, cache_modifier=".cg")
        if GLU:
            xa = _masked_x(xv, rows, jm, thr, scale_ptr, HAS_SCALE)
            xb = _masked_x(xv, rows, jm, thr_b, scale_b_ptr, HAS_SCALE)
            acc += w.to(tl.float32) * tl.where(left, xa[:, None], xb[:, None])
        else:
            acc += w.to(tl.float32) * xv[:, None]
    return acc


@triton.jit
def partials_sum(row_ptr, bias_ptr, cols, mask, STRIDE_P, N_PARTS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 OUT_TY: tl.constexpr):
    """For consumer kernels: a GEMV output at `cols` of one row from its split-K partials (row_ptr: partial 0 of
    the row, STRIDE_P between partials), summed in fp32, rounded to OUT_TY, plus the bias (in that order, as the
    model's linear layer gives it). Unrolled, so that all the loads are in flight at once."""
    y = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    for i in tl.static_range(1, N_PARTS):
        y += tl.load(row_ptr + i * STRIDE_P + cols, mask=mask, other=0.0).to(tl.float32)
    y = y.to(OUT_TY)
    if HAS_BIAS:
        y = (y.to(tl.float32) + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)).to(OUT_TY)
    return y


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the current one when it has no index)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2_divisor(n: int) -> int:
    return n & -n


def pick_config(batch: int, K: int, N: int, boundaries: tuple, device: torch.device, listed: bool = False) -> dict:
    """Tile sizes for one launch. boundaries: inner column offsets where threshold or weight changes; listed: the
    kept channels come listed (batch 1).

    From sweeps on an H100 (scripts/bench_kernels.py --sweep, docs/benchmarks.md): batch 1 wants 128x128
    tiles of listed rows, batches 256-wide tiles 32 rows deep; both about 2 programs per SM. A small weight (K * N
    up to 4096 x 4096, o's) at batch 1 without a list runs windows of 128 rows on 64-wide tiles instead, WINDOWS
    per program: listing would split K into shares of 512 or fewer channels, too short to repay the list. The
    windows per program are a power of two up to 8: in the sweeps the time jumped 1.2-10x at some other counts and
    tile settings (register spills, presumably), never with 8 windows of 64 columns and 8 warps.
    """
    g = 0
    for b in boundaries:
        g = math.gcd(g, b)
    use_dot = batch > 1
    block_n = 256 if use_dot else 128
    if g:
        block_n = min(block_n, _pow2_divisor(g))
    if block_n < SEGMENT_MULTIPLE:
        raise ValueError(f"segment boundaries {list(boundaries)} must be multiples of {SEGMENT_MULTIPLE}")
    block_k = 32 if use_dot else 128
    cuda = device.type == "cuda"
    small = not use_dot and not listed and K * N <= (2 ** 24 if cuda else 2 ** 16)  # takes the windows
    if small:
        block_n = min(block_n, 64)
    if cuda:
        # About two programs per SM at every batch size (any split count, not only powers of two)
        target = 2 * num_sms(device)
        split_k = max(1, min(target // triton.cdiv(N, block_n), triton.cdiv(K, (1 if small else 2) * block_k)))
        num_warps, num_stages = 8 if small else 4, 3
    else:  # Triton's interpreter, the same paths at a small scale: small tiles and few programs keep it quick
        block_k = min(block_k, 64)
        split_k, num_warps, num_stages = (2 if K > block_k else 1), 4, 1
    windows = 0
    if small:
        windows = min(8, triton.next_power_of_2(triton.cdiv(triton.cdiv(K, split_k), block_k)))
        split_k = triton.cdiv(K, windows * block_k)
    return dict(BLOCK_B=16 if use_dot else 1, BLOCK_K=block_k, BLOCK_N=block_n, SPLIT_K=split_k, WINDOWS=windows,
                num_warps=num_warps, num_stages=num_stages)


def check_gemv(x: Tensor, weights: list, thresholds: Tensor, n_seg: int, scale: Optional[Tensor],
               kept: Optional[Tensor] = None) -> None:
    """The GEMV ops' inputs, n_seg thresholds; kept: sparse_glu's list of the channels gate or up keeps
    (sparse_ops.add_rmsnorm's)."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_BATCH:
        raise ValueError(f"x must be (batch<= {MAX_BATCH}, K), got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x dtype {x.dtype} not supported (bf16, fp16, fp32)")
    for w in weights:
        if w.dim() != 2 or w.shape[0] != x.shape[1]:
            raise ValueError(f"weight must be transposed, (K={x.shape[1]}, N), got {tuple(w.shape)}")
        if w.dtype != x.dtype:
            raise TypeError(f"weight dtype {w.dtype} differs from x dtype {x.dtype}")
        if not w.is_contiguous():
            raise ValueError("weight.t() must be contiguous: store the weight column-major (model.to_column_major)")
        if w.device != x.device:
            raise ValueError(f"weight on {w.device}, x on {x.device}")
    # the kernel indexes thresholds and scale as packed arrays: a strided view would be read wrongly
    if thresholds.dim() != 1 or thresholds.shape[0] != n_seg or thresholds.dtype != torch.float32 \
            or not thresholds.is_contiguous() or thresholds.device != x.device:
        raise ValueError(f"thresholds must be contiguous fp32 ({n_seg},) on {x.device}, got {thresholds.dtype} "
                         f"{tuple(thresholds.shape)} on {thresholds.device}")
    if scale is not None and (tuple(scale.shape) != (n_seg, x.shape[1]) or scale.dtype != torch.float32
                              or not scale.is_contiguous() or scale.device != x.device):
        raise ValueError(f"scale must be contiguous fp32 ({n_seg}, {x.shape[1]}) on {x.device}, got {scale.dtype} "
                         f"{tuple(scale.shape)} on {scale.device}")
    K = x.shape[1]
    if kept is not None and (tuple(kept.shape) != (1, K + 1) or kept.dtype != torch.int32
                             or not kept.is_contiguous() or kept.device != x.device or x.shape[0] != 1):
        raise ValueError(f"kept must be a contiguous int32 (1, {K + 1}) list on {x.device} for one row "
                         f"(sparse_ops.add_rmsnorm's), got {kept.dtype} {tuple(kept.shape)} "
                         f"for x {tuple(x.shape)}")


def _plan(x: Tensor, n: int, n_a: int, seg1: int, seg2: int, config: Optional[dict] = None,
          glu: bool = False) -> tuple:
    """The launch plan of an op and its output buffer, which the fake ops share: (out, kernel settings, inputs per
    split); out holds the (split, batch, n) split-K partial sums, fp32 when there are several, else x's dtype.
    Inner boundaries: where the threshold (seg1, seg2) or the weight (n_a) changes. glu: the kept channels come
    listed, one K range (the epilogue needs whole sums) and out = silu(gate) * up, (1, n_a) in x's dtype."""
    batch, K = x.shape
    inner = () if glu else tuple(int(b) for b in (n_a, seg1, seg2) if 0 < b < n)  # a GLU tile holds both weights
    cfg = dict(config or pick_config(batch, K, n, inner, x.device, listed=glu))
    split = 1 if glu else cfg["SPLIT_K"]
    del cfg["SPLIT_K"]
    if cfg["WINDOWS"]:
        k_per_split = cfg["WINDOWS"] * cfg["BLOCK_K"]  # the windows make the share
    else:
        # Equal K shares: multiples of BLOCK_K for the tile loop of batches, of 16 for the listing path of batch 1
        step = cfg["BLOCK_K"] if cfg["BLOCK_B"] > 1 else 16
        k_per_split = triton.cdiv(triton.cdiv(K, split), step) * step
    split = triton.cdiv(K, k_per_split)  # rounding up can leave a trailing share empty: drop it
    # The batch-1 listing scans its share in one chunk of the next power of two where that is at most 1,024 or the
    # share fills at least 7/8 of it (up to 4,096: Llama-3's gate and down, the pair ops, 0.1-1.1 us faster), else
    # in chunks of 1,024 (a share of 1,376 in one chunk of 2,048 was 3-5% slower at 50%: docs/benchmarks.md,
    # sessions 39-40)
    p2 = triton.next_power_of_2(k_per_split)
    cfg["CHUNK"] = p2 if p2 <= 4096 and 8 * k_per_split >= 7 * p2 else min(1024, p2)
    if glu:
        return x.new_empty((1, n_a)), cfg, k_per_split
    out = x.new_empty((split, batch, n), dtype=torch.float32 if split > 1 else x.dtype)
    return out, cfg, k_per_split


def _launch(x: Tensor, wa: Tensor, wb: Tensor, n_a: int, n: int, thresholds: Tensor, seg1: int, seg2: int,
            scale: Optional[Tensor], kept: Optional[Tensor] = None, config: Optional[dict] = None) -> Tensor:
    """kept: the GLU's list (sparse_glu); without it the GEMV lists its own channels."""
    batch, K = x.shape
    glu = kept is not None
    out, cfg, k_per_split = _plan(x, n, n_a, seg1, seg2, config, glu)
    # a GLU program holds BLOCK_N // 2 columns of each weight
    grid = (triton.cdiv(n_a, cfg["BLOCK_N"] // 2), 1) if glu else (triton.cdiv(n, cfg["BLOCK_N"]), out.shape[0])
    # kept-channel lists: given (sparse_ops.norm's), or the scratch of a kernel that lists its own, every read
    # slot written first (the windows and the batch tiles list nothing: out stands in)
    lists = cfg["WINDOWS"] == 0 and cfg["BLOCK_B"] == 1
    if glu:
        idx = kept
    elif lists:
        n_seg = 1 + (seg1 < n) + (seg2 < n)
        idx = torch.empty((n_seg, grid[1], triton.cdiv(grid[0], LIST_SHARERS), k_per_split), device=x.device,
                          dtype=torch.int32)
    else:
        idx = out
    wrap_triton(_sparse_gemv_kernel)[grid](
        x, wa, wb, scale if scale is not None else thresholds, thresholds, idx, out,
        batch, K, n, n_a, seg1, seg2, k_per_split,
        HAS_SCALE=scale is not None, USE_DOT=cfg["BLOCK_B"] > 1, DOT_F32=x.dtype == torch.float32 or not x.is_cuda,
        GLU=glu, SHARERS=LIST_SHARERS, **cfg)
    return out


def _segments(seg_ends: list, n: int) -> tuple:
    return (seg_ends[0] if len(seg_ends) > 1 else n), (seg_ends[1] if len(seg_ends) > 2 else n)


@triton_op("tealfast::sparse_gemv", mutates_args={})
def _sparse_gemv_op(x: Tensor, wt: Tensor, thresholds: Tensor, seg_ends: list[int],
                    scale: Optional[Tensor]) -> Tensor:
    n = wt.shape[1]
    return _launch(x.contiguous(), wt, wt, n, n, thresholds, *_segments(seg_ends, n), scale)


@triton_op("tealfast::sparse_gemv_pair", mutates_args={})
def _sparse_gemv_pair_op(x: Tensor, wt_a: Tensor, wt_b: Tensor, thresholds: Tensor,
                         scale: Optional[Tensor]) -> Tensor:
    n_a = wt_a.shape[1]
    n = n_a + wt_b.shape[1]
    return _launch(x.contiguous(), wt_a, wt_b, n_a, n, thresholds, n_a, n, scale)


@triton_op("tealfast::sparse_glu", mutates_args={})
def _sparse_glu_op(x: Tensor, wt_gate: Tensor, wt_up: Tensor, thresholds: Tensor, scale: Optional[Tensor],
                   kept: Tensor) -> Tensor:
    n_a = wt_gate.shape[1]
    return _launch(x.contiguous(), wt_gate, wt_up, n_a, 2 * n_a, thresholds, n_a, 2 * n_a, scale, kept)


# Explicit shape functions: the body cannot run on fake tensors under Triton's CPU interpreter.
@_sparse_gemv_op.register_fake
def _(x, wt, thresholds, seg_ends, scale):
    n = wt.shape[1]
    return _plan(x, n, n, *_segments(seg_ends, n))[0]


@_sparse_gemv_pair_op.register_fake
def _(x, wt_a, wt_b, thresholds, scale):
    n_a = wt_a.shape[1]
    n = n_a + wt_b.shape[1]
    return _plan(x, n, n_a, n_a, n)[0]


@_sparse_glu_op.register_fake
def _(x, wt_gate, wt_up, thresholds, scale, kept):
    n_a = wt_gate.shape[1]
    return _plan(x, 2 * n_a, n_a, n_a, 2 * n_a, glu=True)[0]


def use_triton(x: Tensor) -> bool:
    """Triton on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests the kernels)."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
