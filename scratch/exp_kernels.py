"""Batch-1 listed-row GEMV variants for the session-12 experiment."""
import triton
import triton.language as tl


@triton.jit
def _list_kept(x_ptr, thr, idx_base, k_lo, K, K_PER_SPLIT, CHUNK: tl.constexpr):
    rc = tl.arange(0, CHUNK)
    count = k_lo * 0
    for c0 in range(0, K_PER_SPLIT, CHUNK):
        ks = k_lo + c0 + rc
        valid = ((c0 + rc) < K_PER_SPLIT) & (ks < K)
        score = tl.abs(tl.load(x_ptr + ks, mask=valid, other=0.0).to(tl.float32))
        keep = (score > thr) & valid
        kept = keep.to(tl.int32)
        tl.store(idx_base + count + tl.cumsum(kept, 0) - 1, ks, mask=keep)
        count += tl.sum(kept, 0)
    tl.debug_barrier()
    return count


@triton.jit
def _count_kept(x_ptr, thr, k_lo, K, K_PER_SPLIT, CHUNK: tl.constexpr, SCAN: tl.constexpr):
    """Diagnostics: the listing's loads and reductions without its stores (SCAN: with the cumsum too)."""
    rc = tl.arange(0, CHUNK)
    count = k_lo * 0
    for c0 in range(0, K_PER_SPLIT, CHUNK):
        ks = k_lo + c0 + rc
        valid = ((c0 + rc) < K_PER_SPLIT) & (ks < K)
        score = tl.abs(tl.load(x_ptr + ks, mask=valid, other=0.0).to(tl.float32))
        kept = ((score > thr) & valid).to(tl.int32)
        if SCAN:
            count += tl.max(tl.cumsum(kept, 0), 0)
        else:
            count += tl.sum(kept, 0)
    tl.debug_barrier()
    return count


@triton.jit
def gemv_b1(x_ptr, w_ptr, thr_ptr, idx_ptr, out_ptr, K, N, K_PER_SPLIT, cnt_ptr,
            MODE: tl.constexpr, LIST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
            STAGES: tl.constexpr, M: tl.constexpr, CACHE: tl.constexpr = ".cg", BLOCKED: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    thr = tl.load(thr_ptr)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < N
    k_lo = pid_k * K_PER_SPLIT
    idx_base = idx_ptr + k_lo
    if LIST == 2:  # a private list per program: no two programs write the same address
        idx_base += pid_n.to(tl.int64) * K
    if MODE == 2:  # list a chunk, stream its kept rows, list the next chunk: listing interleaved with streaming
        rk = tl.arange(0, BLOCK_K)
        rc = tl.arange(0, CHUNK)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for c0 in range(0, K_PER_SPLIT, CHUNK):
            if LIST == 5:
                n_c = _list_kept_2d(x_ptr, thr, idx_base + c0, k_lo + c0, K, tl.minimum(K_PER_SPLIT - c0, CHUNK), CHUNK, 8)
            else:
                n_c = _list_kept(x_ptr, thr, idx_base + c0, k_lo + c0, K, tl.minimum(K_PER_SPLIT - c0, CHUNK), CHUNK)
            for j0 in range(0, n_c, BLOCK_K):
                jm = (j0 + rk) < n_c
                rows = tl.load(idx_base + c0 + j0 + rk, mask=jm, other=0, cache_modifier=".cg")
                w = tl.load(w_ptr + rows[:, None] * N + cols[None, :], mask=jm[:, None] & n_mask[None, :], other=0.0)
                xv = tl.load(x_ptr + rows, mask=jm, other=0.0).to(tl.float32)
                acc += w.to(tl.float32) * xv[:, None]
        tl.store(out_ptr + pid_k * N + cols, tl.sum(acc, axis=0), mask=n_mask)
        return
    if LIST == 5:
        count = _list_kept_2d(x_ptr, thr, idx_base, k_lo, K, K_PER_SPLIT, CHUNK, 8)
    elif LIST >= 3:
        count = _count_kept(x_ptr, thr, k_lo, K, K_PER_SPLIT, CHUNK, LIST == 4)
    elif LIST >= 1:
        count = _list_kept(x_ptr, thr, idx_base, k_lo, K, K_PER_SPLIT, CHUNK)
        if pid_n == 0:
            tl.store(cnt_ptr + pid_k, count)
    else:  # lists from an earlier launch: the streaming phase alone
        count = tl.load(cnt_ptr + pid_k)
    rk = tl.arange(0, BLOCK_K)
    if BLOCKED:  # (N / BLOCK_N, K, BLOCK_N): a column block's rows are one contiguous slab
        w_ptr += pid_n.to(tl.int64) * K * BLOCK_N
        ld = BLOCK_N
        wc = tl.arange(0, BLOCK_N)
    else:
        ld = N
        wc = cols
    if MODE == 0:  # FMA into a 2-D accumulator (the kept kernel)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for j0 in tl.range(0, count, BLOCK_K, num_stages=STAGES):
            jm = (j0 + rk) < count
            rows = tl.load(idx_base + j0 + rk, mask=jm, other=0, cache_modifier=CACHE)
            w = tl.load(w_ptr + rows[:, None] * ld + wc[None, :], mask=jm[:, None] & n_mask[None, :], other=0.0)
            xv = tl.load(x_ptr + rows, mask=jm, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * xv[:, None]
        res = tl.sum(acc, axis=0)
    else:  # tensor-core dot of x broadcast to M rows: the weight loads feed a dot, so Triton pipelines them
        acc = tl.zeros((M, BLOCK_N), dtype=tl.float32)
        for j0 in tl.range(0, count, BLOCK_K, num_stages=STAGES):
            jm = (j0 + rk) < count
            rows = tl.load(idx_base + j0 + rk, mask=jm, other=0)
            w = tl.load(w_ptr + rows[:, None] * N + cols[None, :], mask=jm[:, None] & n_mask[None, :], other=0.0)
            xv = tl.load(x_ptr + rows, mask=jm, other=0.0)
            xm = tl.broadcast_to(xv[None, :], (M, BLOCK_K))
            acc = tl.dot(xm, w, acc)
        res = tl.max(acc, axis=0)  # every row holds the same sums
    tl.store(out_ptr + pid_k * N + cols, res, mask=n_mask)


@triton.jit
def list_kernel(x_ptr, thr_ptr, idx_ptr, cnt_ptr, K, K_PER_SPLIT, CHUNK: tl.constexpr):
    """One program per K range: the kept-channel list of that range and its length, for the streaming kernel."""
    pid_k = tl.program_id(0)
    k_lo = pid_k * K_PER_SPLIT
    count = _list_kept(x_ptr, tl.load(thr_ptr), idx_ptr + k_lo, k_lo, K, K_PER_SPLIT, CHUNK)
    tl.store(cnt_ptr + pid_k, count)


@triton.jit
def _list_kept_2d(x_ptr, thr, idx_base, k_lo, K, K_PER_SPLIT, CHUNK: tl.constexpr, GROUP: tl.constexpr):
    """The listing with a cheap scan: a chunk as (CHUNK / GROUP, GROUP) channels; prefix sums of the per-group
    counts (one value per group) plus positions inside each group (a short scan along the row)."""
    rg = tl.arange(0, CHUNK // GROUP)
    ri = tl.arange(0, GROUP)
    count = k_lo * 0
    for c0 in range(0, K_PER_SPLIT, CHUNK):
        offs = c0 + rg[:, None] * GROUP + ri[None, :]
        ks = k_lo + offs
        valid = (offs < K_PER_SPLIT) & (ks < K)
        score = tl.abs(tl.load(x_ptr + ks, mask=valid, other=0.0).to(tl.float32))
        kept = ((score > thr) & valid).to(tl.int32)
        inner = tl.cumsum(kept, 1)                           # inclusive, inside a group
        per_group = tl.sum(kept, 1)
        before = tl.cumsum(per_group, 0) - per_group         # exclusive, over the groups
        tl.store(idx_base + count + before[:, None] + inner - 1, ks, mask=kept > 0)
        count += tl.sum(per_group, 0)
    tl.debug_barrier()
    return count


@triton.jit
def list_kernel_2d(x_ptr, thr_ptr, idx_ptr, cnt_ptr, K, K_PER_SPLIT, CHUNK: tl.constexpr, GROUP: tl.constexpr):
    pid_k = tl.program_id(0)
    k_lo = pid_k * K_PER_SPLIT
    count = _list_kept_2d(x_ptr, tl.load(thr_ptr), idx_ptr + k_lo, k_lo, K, K_PER_SPLIT, CHUNK, GROUP)
    tl.store(cnt_ptr + pid_k, count)
