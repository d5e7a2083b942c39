"""TEAL's block-wise greedy allocation of sparsity among a block's seven projections (calibrate.py --greedy).

For each block on its own, with the dense model's block inputs X and outputs Y on the calibration tokens: start
every projection at sparsity 0; at each step try raising each projection by a step worth STEP of the block's
linear parameters and keep the one raise whose block output is closest to Y (squared error, fp32). Each
projection's sparsity is recorded where the parameter-weighted block sparsity crosses each grid level.

Cost: the error is measured at EVAL_TOKENS sampled query positions only (seeded). The block is still called
as the runtime calls it (sparse prefill), with the KV cache holding every position's keys and values, so the
output at those positions is exact. Keys and values only change with the k and v sparsities, which move a few
times per block, so they are computed once per (k, v) pair and copied back into the cache before each call.
"""
import math
import sys
from contextlib import contextmanager

import torch
from tqdm import tqdm

import thresholds as thr_file
from model import PROJECTIONS, Transformer, projection_sizes, restored

# Parameter-weighted block sparsity added by one step. On SmolLM2-135M (held-out block error), 0.02 was clearly
# worse and 0.005 only a little better, at twice the time.
STEP = 0.01
CAP = 0.99  # no projection goes sparser than this
# Query positions (over all chunks) where the error is measured; 64, 128 and 384 gave nearly the same allocations
# and held-out errors there.
EVAL_TOKENS = 64
DEFAULT_GRID = [round(i * 0.05, 2) for i in range(19)]  # 0.0, 0.05, ..., 0.9


@contextmanager
def search_mode(model: Transformer, score: str):
    """Weighted scores on (if asked) and drop counting off for the duration; the model's state restored after."""
    with restored(model):
        for b in model.layers:
            b.stats = None  # counting would slow down the blocks being measured
        model.set_scores(score == "weighted")
        yield


@torch.no_grad()
def block_inputs(model: Transformer, chunks: torch.Tensor) -> list:
    """Dense pass over chunks (B, T): each block's input hidden states, a (B, T, dim) tensor per block. Run it
    inside search_mode, which restores the sparse flags and caches it changes."""
    inputs = [[] for _ in model.layers]

    def hook(layer):
        def fn(module, args):
            inputs[layer].append(args[0])
        return fn

    handles = [b.register_forward_pre_hook(hook(l)) for l, b in enumerate(model.layers)]
    model.set_sparse(False, False)
    model.setup_caches(1, chunks.shape[1])
    try:
        pos = torch.arange(chunks.shape[1], device=chunks.device)
        for c in chunks:  # one chunk at a time: the logits of all of them at once can be large
            model(c[None], pos)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in inputs]


def query_positions(seq_len: int, batch: int, seed: int, device=None) -> torch.Tensor:
    """Sorted positions where the error is measured: a seeded sample of about EVAL_TOKENS / batch of them.

    The first quarter is skipped (as TEAL does): decoding happens after a prompt, and the first positions
    (attention sinks, huge activations) would dominate the error otherwise. At least 2 positions, so that
    the block's linears run the masked dense matmul (sparse_linear), not the decode GEMV.
    """
    first = seq_len // 4 if seq_len - seq_len // 4 >= 2 else 0
    n = min(seq_len - first, max(2, -(-EVAL_TOKENS // batch)))
    g = torch.Generator().manual_seed(seed)
    pos = first + torch.randperm(seq_len - first, generator=g)[:n]
    return pos.sort().values.to(device)


class BlockError:
    """Squared error of one block's output under given projection sparsities, at the query positions.

    Needs the model's caches set up for (batch, seq_len) of x, and the model's scores as in the table.
    """

    @torch.no_grad()
    def __init__(self, model: Transformer, layer: int, x: torch.Tensor, table: torch.Tensor, levels, positions):
        self.block = model.layers[layer]
        self.table = torch.as_tensor(table[layer], dtype=torch.float64).cpu()
        self.levels = torch.as_tensor(levels, dtype=torch.float64)
        pos = torch.arange(x.shape[1], device=x.device)
        # Block arguments as Transformer.forward builds them: all positions, and the query positions only.
        self.full = (x, pos, model.freqs_cis, model.causal_mask[None, None, pos], True)
        self.query = (x[:, positions], positions, model.freqs_cis, model.causal_mask[None, None, positions], True)
        self.block.sparse_prefill = False
        self.target = self.block(*self.full)[:, positions].float()
        self.block.sparse_prefill = True
        self.kv = {}  # (k threshold, v threshold) -> every position's keys and values

    def thresholds(self, sparsities) -> torch.Tensor:
        """(7,) fp32 thresholds: the table lookup thresholds.thresholds_for does, per projection."""
        s = torch.as_tensor(sparsities, dtype=torch.float64)
        return thr_file.interp(self.levels, self.table, s).float()

    @torch.no_grad()
    def __call__(self, sparsities) -> float:
        thr = self.thresholds(sparsities)
        cache = self.block.attention.kv_cache
        key = tuple(thr[1:3].tolist())
        if key not in self.kv:
            if len(self.kv) >= 8:  # only the current pair and its two candidates are still needed
                self.kv.clear()
            self.block.thresholds.copy_(thr)
            self.block(*self.full)  # writes every position's keys and values into the cache
            self.kv[key] = (cache.k_cache.clone(), cache.v_cache.clone())
        k, v = self.kv[key]
        cache.k_cache.copy_(k)
        cache.v_cache.copy_(v)
        self.block.thresholds.copy_(thr)
        y = self.block(*self.query)
        return (y.float() - self.target).pow(2).sum().item()


def search_block(error, counts: torch.Tensor, grid: list) -> torch.Tensor:
    """Greedy search for one block; error(sparsities) -> float. Returns (len(grid), 7) float64 sparsities."""
    weights = counts / counts.sum()
    steps = STEP / weights  # each raise adds STEP of parameter-weighted sparsity (less at the cap)
    s = torch.zeros(len(PROJECTIONS), dtype=torch.float64)
    out = torch.zeros(len(grid), len(PROJECTIONS), dtype=torch.float64)
    i = 0
    while i < len(grid) and grid[i] <= 0:
        i += 1  # levels at 0 keep everything: rows stay 0
    while i < len(grid):
        best, best_err = None, float("inf")
        for p in range(len(PROJECTIONS)):
            if s[p] >= CAP:
                continue
            cand = s.clone()
            cand[p] = min(CAP, s[p].item() + steps[p].item())
            err = error(cand)
            if not math.isfinite(err):  # an overflow: every comparison would fail, and q would win by order
                raise FloatingPointError(f"the greedy search's block error is {err} (activations overflowed?)")
            if err < best_err or best is None:  # ties: the first in PROJECTIONS order
                best, best_err = cand, err
        if best is None:  # everything at the cap: only reachable by rounding at a grid level of CAP
            out[i:] = s
            break
        lo, hi = float(weights @ s), float(weights @ best)
        while i < len(grid) and grid[i] <= hi:
            # block sparsity is linear in s: this mix of the steps before and after hits the level exactly
            a = (grid[i] - lo) / (hi - lo)
            out[i] = s + a * (best - s)
            i += 1
        s = best
    return out


@torch.no_grad()
def search(model: Transformer, ids: list, seq_len: int, table: torch.Tensor, levels: list, score: str,
           seed: int = 0, grid: list = None, progress: bool = True) -> dict:
    """Greedy per-projection sparsities for every block, for the "greedy" section of the thresholds JSON.

    ids: calibration tokens, cut into chunks of seq_len (the remainder is dropped); table: (n_layer, 7,
    len(levels)) score quantiles from calibrate.record, with `score` the score they were taken with.
    Returns {"levels": grid, "layers": [{projection: [sparsity at each grid level]}, ...]}.
    """
    grid = DEFAULT_GRID if grid is None else [float(g) for g in grid]
    if not thr_file.is_grid(torch.tensor(grid, dtype=torch.float64), 0.0) or grid[-1] > CAP:  # as the loader
        raise ValueError(f"greedy grid must be two or more levels increasing from 0 up to {CAP}, got {grid}")
    if score not in thr_file.SCORES:
        raise ValueError(f"unknown score {score!r}")
    n_layer = model.config.n_layer
    if tuple(table.shape) != (n_layer, len(PROJECTIONS), len(levels)):
        raise ValueError(f"threshold table has shape {tuple(table.shape)}, expected "
                         f"({n_layer}, {len(PROJECTIONS)}, {len(levels)})")
    seq_len = min(seq_len, len(ids))
    if seq_len < 2:
        raise ValueError("the greedy search needs at least 2 calibration tokens")
    batch = len(ids) // seq_len
    device = model.output.weight.device
    chunks = torch.tensor(ids[:batch * seq_len], device=device).view(batch, seq_len)

    layers = []
    with search_mode(model, score):
        xs = block_inputs(model, chunks)
        model.setup_caches(batch, seq_len)  # one block call covers all chunks
        positions = query_positions(seq_len, batch, seed, device)
        for l in tqdm(range(n_layer), desc="greedy search", unit="layer", disable=not progress, file=sys.stderr):
            error = BlockError(model, l, xs[l], table, levels, positions)
            alloc = search_block(error, projection_sizes(model.config), grid)
            layers.append({p: [round(float(v), 6) for v in alloc[:, j]] for j, p in enumerate(PROJECTIONS)})
            xs[l] = None  # free as we go
    return {"levels": [round(g, 6) for g in grid], "layers": layers}
