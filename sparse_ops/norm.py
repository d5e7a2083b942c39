"""Decode's residual add and RMSNorm before the MLP in one kernel, which also lists the channels gate or up keeps.

Between two block linears a decode step adds the last GEMV's output (split-K partial sums) to the residual
stream and normalises it. Inductor fuses that into one kernel of its own, and this one is no faster (H100, 8 fp32
partials of 4096: 3.5 us against 2.9): what it adds is the list. Given the next GEMV's thresholds, it lists the
channels that gate or up keeps, and the GEMV streams their rows at once instead of listing them
itself. Decode uses it at batch 1 before the gate|up GEMV (sparse_glu). That pays because the GEMV's own listing
is slow there: each of its programs would scan all its K channels (4096: about 5 us), the list here costs about
1 us (docs/benchmarks.md). The list's scattered 4-byte stores are slow from one SM (session 12 measured about
7 us for three lists of 4096 channels), so several programs each compute the whole row (its sum of squares and
every position in the list) and store one slice.

The list (`kept`, one row of D + 1 int32): kept[0, :n] the n channels that gate or up keeps, in increasing
order, then -1 up to D; kept[0, D] = n. The GEMV still applies gate's and up's own thresholds to the listed rows.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .gemv import partials_sum
from .reference import keep_mask, sum_partials

LIST_GROUP = 16  # channels per group of the list's two-level scan (D must be a multiple)


@triton.jit
def _add_rmsnorm_kernel(parts_ptr, res_ptr, w_ptr, h_ptr, y_ptr, thr_ptr, scale_ptr, kept_ptr, STRIDE_P, D, eps,
                        SLICE, N_PARTS: tl.constexpr, HAS_SCALE: tl.constexpr,
                        BLOCK_D: tl.constexpr, GROUP: tl.constexpr):
    lo = tl.program_id(0) * SLICE  # this program stores channels lo .. lo + SLICE - 1 (a multiple of GROUP)
    rd = tl.arange(0, BLOCK_D)
    m = rd < D
    mine = m & (rd >= lo) & (rd < lo + SLICE)
    dt = h_ptr.dtype.element_ty
    # The linear's output (partials summed, rounded to the model dtype), then the add, rounded too: what the
    # unfused model computes
    y = partials_sum(parts_ptr, parts_ptr, rd, m, STRIDE_P, N_PARTS, False, dt)
    h = (tl.load(res_ptr + rd, mask=m, other=0.0).to(tl.float32) + y.to(tl.float32)).to(dt)
    tl.store(h_ptr + rd, h, mask=mine)
    hf = h.to(tl.float32)
    normed = hf * tl.rsqrt(tl.sum(hf * hf, axis=0) / D + eps)
    out = (tl.load(w_ptr + rd, mask=m, other=0.0).to(tl.float32) * normed).to(dt)
    tl.store(y_ptr + rd, out, mask=mine)
    # The channels gate or up keeps: per group of 16 channels a count, their prefix sums, and each kept
    # channel's place inside its group; short scans instead of one over all D channels.
    absy = tl.abs(out.to(tl.float32))
    score_g, score_u = absy, absy
    if HAS_SCALE:
        score_g = absy * tl.load(scale_ptr + rd, mask=m, other=0.0)
        score_u = absy * tl.load(scale_ptr + D + rd, mask=m, other=0.0)
    keep = (score_g > tl.load(thr_ptr)) | (score_u > tl.load(thr_ptr + 1))
    keep = tl.reshape((keep & m).to(tl.int32), (BLOCK_D // GROUP, GROUP))
    ch = tl.reshape(rd, (BLOCK_D // GROUP, GROUP))
    rg = tl.arange(0, BLOCK_D // GROUP)
    mine_g = (rg < D // GROUP) & (rg * GROUP >= lo) & (rg * GROUP < lo + SLICE)
    per_group = tl.sum(keep, axis=1)
    before = tl.cumsum(per_group, axis=0) - per_group
    n = tl.sum(per_group, axis=0)
    tl.store(kept_ptr + before[:, None] + tl.cumsum(keep, axis=1) - 1, ch, mask=(keep > 0) & mine_g[:, None])
    tl.store(kept_ptr + rd, tl.full((BLOCK_D,), -1, tl.int32), mask=mine & (rd >= n))  # slots past the list
    if lo + SLICE >= D:
        tl.store(kept_ptr + D, n)


@triton_op("tealfast::add_rmsnorm", mutates_args={})
def _add_rmsnorm_op(x: Tensor, parts: Tensor, weight: Tensor, eps: float, thresholds: Tensor,
                    scale: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    D = x.shape[1]
    h, y, kept = _empty_outputs(x)
    block_d = triton.next_power_of_2(max(D, LIST_GROUP))
    # At least 256 channels per program and at most 16 programs; a multiple of the group, so that each group's list
    # entries have one writer
    slice_d = max(256, triton.cdiv(triton.cdiv(D, 16), LIST_GROUP) * LIST_GROUP)
    wrap_triton(_add_rmsnorm_kernel)[(triton.cdiv(D, slice_d),)](
        parts, x, weight, h, y, thresholds, scale if scale is not None else weight, kept, parts.stride(0), D, eps,
        slice_d, N_PARTS=parts.shape[0], HAS_SCALE=scale is not None,
        BLOCK_D=block_d, GROUP=LIST_GROUP, num_warps=max(4, min(32, block_d // 256)))
    return h, y, kept


def _empty_outputs(x: Tensor) -> tuple:
    D = x.shape[1]
    return (torch.empty_like(x), torch.empty_like(x),
            torch.empty((1, D + 1), device=x.device, dtype=torch.int32))


@_add_rmsnorm_op.register_fake
def _(x, parts, weight, eps, thresholds, scale):
    return _empty_outputs(x)


def check_add_rmsnorm(x: Tensor, parts: Tensor, weight: Tensor, thresholds: Tensor, scale: Optional[Tensor]) -> None:
    if x.dim() != 2 or not x.is_contiguous() or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be a contiguous (rows, D) bf16/fp16/fp32 tensor, got {x.dtype} {tuple(x.shape)}")
    B, D = x.shape
    if B != 1 or D % LIST_GROUP or D == 0:
        raise ValueError(f"kept-channel lists need one row and D a positive multiple of {LIST_GROUP}, got "
                         f"{tuple(x.shape)}")
    if parts.dim() != 3 or parts.shape[0] == 0 or tuple(parts.shape[1:]) != (B, D) or not parts.is_contiguous() \
            or parts.dtype not in (x.dtype, torch.float32) or (parts.shape[0] > 1 and parts.dtype != torch.float32):
        raise ValueError(f"parts must be contiguous (parts >= 1, {B}, {D}), fp32 partial sums or one {x.dtype} "
                         f"output, got {parts.dtype} {tuple(parts.shape)}")
    # the kernel indexes weight, thresholds and scale as packed arrays: a strided view would be read wrongly
    if tuple(weight.shape) != (D,) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous ({D},) {x.dtype}, got {weight.dtype} {tuple(weight.shape)}")
    if tuple(thresholds.shape) != (2,) or thresholds.dtype != torch.float32 or not thresholds.is_contiguous():
        raise ValueError(f"thresholds must be contiguous fp32 (2,), gate's and up's, got {thresholds.dtype} "
                         f"{tuple(thresholds.shape)}")
    if scale is not None and (tuple(scale.shape) != (2, D) or scale.dtype != torch.float32
                              or not scale.is_contiguous()):
        raise ValueError(f"scale must be contiguous fp32 (2, {D}), got {scale.dtype} {tuple(scale.shape)}")
    devices = {t.device for t in (x, parts, weight, thresholds, scale) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x, parts, weight, thresholds and scale must be on one device, got "
                         f"{sorted(map(str, devices))}")


def kept_list(y: Tensor, thresholds: Tensor, scale: Optional[Tensor]) -> Tensor:
    """The list above for one row y (1, D), in plain torch."""
    D = y.shape[1]
    keep = keep_mask(y[0], thresholds[0], None if scale is None else scale[0])
    keep |= keep_mask(y[0], thresholds[1], None if scale is None else scale[1])
    idx = torch.nonzero(keep).flatten().to(torch.int32)
    row = torch.full((1, D + 1), -1, dtype=torch.int32, device=y.device)
    row[0, :idx.numel()] = idx
    row[0, D] = idx.numel()
    return row


def add_rmsnorm_ref(x: Tensor, parts: Tensor, weight: Tensor, eps: float, thresholds: Tensor,
                    scale: Optional[Tensor] = None) -> tuple:
    """Plain-torch reference, the op's contract: h = x + (sum of parts, in x's dtype), y = RMSNorm(h) * weight,
    and the list above of the channels of y that gate or up keeps."""
    h = x + sum_partials(parts, x.dtype)
    hf = h.float()
    y = (weight.float() * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)
    return h, y, kept_list(y, thresholds, scale)
