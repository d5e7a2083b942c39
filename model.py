"""A minimal Llama-family decoder (Llama-2/3, Mistral, SmolLM2, Qwen2) with TEAL activation sparsity.

Names follow gpt-fast. TEAL zeroes the input entries of every block linear whose magnitude is at or below a
per-projection threshold. `sparse_linear` does it for prefill and for the decode GEMVs of q|k|v, o and down:
with one token per row it is a sparse GEMV custom op that reads only the weight columns it needs. Decode also
runs gate|up as one op (`sparse_ops.sparse_glu`; at batch 1 a single kernel that streams the channels the norm
before it listed, `add_norm`, and applies silu(gate) * up itself), and attention as one kernel
(`sparse_ops.decode_attention`).
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import sparse_ops

# Order of the seven projections in every threshold tensor and in the thresholds JSON.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the --dtype choices of the CLIs


class CheckpointError(ValueError):
    """A checkpoint, config or threshold file that does not fit the model."""


@dataclass
class ModelArgs:
    """The architecture; checkpoint.from_hf_config reads it from an HF config.json."""
    vocab_size: int
    dim: int
    n_layer: int
    n_head: int
    n_local_heads: int  # key/value heads (GQA)
    head_dim: int
    intermediate_size: int
    block_size: int = 2048  # the context
    sliding_window: int = 0  # positions a windowed layer attends to, its own included (0: no window)
    full_layers: tuple = ()  # the layers that attend to every position all the same (config.json's layer_types)
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None
    qkv_bias: bool = False
    tie_embeddings: bool = False

    def context(self) -> str:
        """block_size as the error messages name it."""
        return f"the model's context of {self.block_size} tokens"

    def window(self, layer: int) -> int:
        """The sliding window of a layer's attention (0: full attention)."""
        return 0 if layer in self.full_layers else self.sliding_window


def sparse_linear(x: Tensor, lin: nn.Linear, thresholds: Tensor, seg_ends: list, sparse: bool,
                  scale: Optional[Tensor] = None, stats: Optional[Tensor] = None, partials: bool = False) -> Tensor:
    """y = W (x * 1[score(x) > t_s]) for each output segment s; the plain nn.Linear when `sparse` is False.

    One token per row (decode, or a one-token prompt with sparse prefill) runs the sparse GEMV op, which skips the
    weight columns it does not need; more tokens mask the input and use a dense matmul. `stats` (segments, 4), when given, gathers
    drop_counts per segment: eager measurement only. `partials`: return the decode GEMV's split-K partial sums,
    (split, rows, N) without the bias, for a consumer that sums them (decode attention, add_norm).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if not sparse:
        return F.linear(x2, lin.weight)[None] if partials else lin(x)
    if shape[-2] == 1 and x2.shape[0] <= sparse_ops.MAX_BATCH:
        y = sparse_ops.sparse_gemv(x2, lin.weight.t(), thresholds, seg_ends, scale, reduce=not partials)
    else:
        y = sparse_ops.sparse_gemv_ref(x2, lin.weight.t(), thresholds, seg_ends, scale)
        y = y[None] if partials else y
    if stats is not None:
        for s in range(len(seg_ends)):
            keep = sparse_ops.keep_mask(x2, thresholds[s], None if scale is None else scale[s])
            stats[s] += drop_counts(keep.view(shape), stats.dtype)
    if partials:
        return y
    if lin.bias is not None:
        y = y + lin.bias
    return y.view(*shape[:-1], -1)


def drop_counts(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """keep (B, T, K): (entries dropped, entries, channels no row keeps, channels) summed over the T positions.
    The last pair is what a batched decode step skips: it reads a weight row wherever any batch row keeps it."""
    any_row = keep.any(0)
    return torch.tensor([keep.numel() - keep.sum().item(), keep.numel(), any_row.numel() - any_row.sum().item(),
                         any_row.numel()], dtype=dtype)


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, config.window(i)) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_length = -1
        self.freqs_cis: Optional[Tensor] = None

    def setup_caches(self, max_batch_size: int, max_seq_length: int, keep: int = 0) -> None:
        """New KV caches; keep: positions [0, keep) carried over from the old ones (a conversation's earlier turns)."""
        if max_seq_length > self.config.block_size:
            raise ValueError(f"sequence length {max_seq_length} exceeds {self.config.context()}")
        if keep and not (max_batch_size == self.max_batch_size and keep <= min(max_seq_length, self.max_seq_length)):
            raise ValueError(f"cannot keep {keep} positions of a ({self.max_batch_size}, {self.max_seq_length}) cache "
                             f"in a ({max_batch_size}, {max_seq_length}) one")
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        c = self.config
        dtype, device = self.output.weight.dtype, self.output.weight.device
        for b in self.layers:
            old = b.attention.kv_cache
            b.attention.kv_cache = KVCache(max_batch_size, max_seq_length, c.n_local_heads, c.head_dim, dtype, device)
            if keep:
                b.attention.kv_cache.k_cache[:, :, :keep] = old.k_cache[:, :, :keep]
                b.attention.kv_cache.v_cache[:, :, :keep] = old.v_cache[:, :, :keep]
        self.freqs_cis = precompute_freqs_cis(max_seq_length, c.head_dim, c.rope_base, c.rope_scaling).to(device)
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))

    def forward(self, idx: Tensor, input_pos: Tensor, prefill: Optional[bool] = None) -> Tensor:
        """idx: (B, T) token ids at positions input_pos (T,). Returns fp32 logits (B, T, vocab). prefill: whether
        the blocks take their prefill or their decode sparsity (set_sparse); by default prefill when T > 1. A
        prompt of one token is a prefill too: generate passes True."""
        assert self.freqs_cis is not None, "call setup_caches first"
        prefill = idx.shape[1] > 1 if prefill is None else prefill
        mask = self.causal_mask[None, None, input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, input_pos, self.freqs_cis, mask, prefill)
        return self.output(self.norm(x)).float()

    # ---- TEAL sparsity -------------------------------------------------------------------------------
    def set_sparse(self, decode: bool = True, prefill: bool = False) -> None:
        """Route linears through the sparse ops. Set before compiling: it is part of the traced graph."""
        for b in self.layers:
            b.sparse_decode, b.sparse_prefill = decode, prefill

    @torch.no_grad()
    def set_thresholds(self, thresholds: Tensor) -> None:
        """thresholds: (n_layer, 7) in PROJECTIONS order. Copied in place, so compiled graphs keep working."""
        if tuple(thresholds.shape) != (self.config.n_layer, len(PROJECTIONS)):
            raise CheckpointError(f"thresholds have shape {tuple(thresholds.shape)}, the model needs "
                                  f"({self.config.n_layer}, {len(PROJECTIONS)})")
        if not torch.isfinite(thresholds).all() or (thresholds < 0).any():
            raise CheckpointError("thresholds must be finite and non-negative")
        for b, t in zip(self.layers, thresholds):
            b.thresholds.copy_(t)

    @torch.no_grad()
    def set_scores(self, weighted: bool) -> None:
        """Weight-informed scores: channel i's score is |x_i| * ||W[:, i]||_2 (per projection)."""
        for b in self.layers:
            b.set_scores(weighted)

    def start_stats(self) -> None:
        """Count dropped inputs per projection in the following eager forwards (see sparse_linear)."""
        for b in self.layers:
            b.stats = torch.zeros(len(PROJECTIONS), 4, dtype=torch.float64)

    def pop_stats(self) -> Tensor:
        """(n_layer, 7, 4) counts since start_stats (drop_counts: dropped and total input entries, then channels
        that no batch row keeps and their total); stops counting."""
        out = torch.stack([b.stats for b in self.layers])
        for b in self.layers:
            b.stats = None
        return out


@contextmanager
def restored(model: Transformer):
    """Sparse flags, thresholds, scores, drop counting and cache shape as they were, after the block: for the
    calibration and measurement passes that switch them."""
    saved = [(b.sparse_decode, b.sparse_prefill, b.stats, b.thresholds.clone()) for b in model.layers]
    weighted = model.layers[0].attention.qkv_scale is not None
    caches = (model.max_batch_size, model.max_seq_length)
    try:
        yield
    finally:
        for b, (dec, pre, stats, t) in zip(model.layers, saved):
            b.sparse_decode, b.sparse_prefill, b.stats = dec, pre, stats
            b.thresholds.copy_(t)
        if (model.layers[0].attention.qkv_scale is not None) != weighted:
            model.set_scores(weighted)
        if caches[0] > 0 and (model.max_batch_size, model.max_seq_length) != caches:
            model.setup_caches(*caches)


def projection_sizes(c: ModelArgs) -> Tensor:
    """(7,) float64 weight count of each projection of a block, PROJECTIONS order (q, k, v are rows of wqkv)."""
    q, kv, ff = c.n_head * c.head_dim * c.dim, c.n_local_heads * c.head_dim * c.dim, c.intermediate_size * c.dim
    return torch.tensor([q, kv, kv, q, ff, ff, ff], dtype=torch.float64)


def model_bytes(model: Transformer) -> tuple:
    """(bytes a dense decode step reads, bytes of the block linears per projection type in PROJECTIONS order).
    A step reads every parameter except the embedding table, of which it gathers one row per token (as gpt-fast
    counts); tied to the output layer, the table is read there."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_embeddings:
        total -= model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    per = projection_sizes(model.config) * model.config.n_layer * model.output.weight.element_size()
    return total, per


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs, window: int) -> None:
        super().__init__()
        self.attention = Attention(config, window)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        # Per-projection thresholds (PROJECTIONS order); a tensor, so new values need no recompile.
        self.register_buffer("thresholds", torch.zeros(len(PROJECTIONS), dtype=torch.float32), persistent=False)
        self.sparse_decode = False
        self.sparse_prefill = False
        self.stats: Optional[Tensor] = None  # (7, 4) drop counts while measuring, on the CPU

    def forward(self, x: Tensor, input_pos: Tensor, freqs_cis: Tensor, mask: Tensor, prefill: bool) -> Tensor:
        sparse = self.sparse_prefill if prefill else self.sparse_decode
        # Sparse decode at batch 1: the MLP norm's kernel also lists the channels that gate or up keep. Listing
        # them in the GEMV costs more, as each of its programs scans the whole input (qkv's scan a fraction).
        lists = sparse and fused_decode(x) and glu_list(x) and self.stats is None
        a = self.attention(self.attention_norm(x), freqs_cis, mask, input_pos, self.thresholds, sparse, self.stats,
                           partials=lists)
        f = self.feed_forward
        h, y, kept = add_norm(x, a, self.ffn_norm, self.thresholds[4:6] if lists else None,
                              f.w13_scale if lists else None)
        return h + f(y, self.thresholds, sparse, self.stats, kept)

    def set_scores(self, weighted: bool) -> None:
        self.attention.set_scores(weighted)
        self.feed_forward.set_scores(weighted)


def fused_decode(x: Tensor) -> bool:
    """One token per row on the GPU (or Triton's interpreter): the fused decode kernels run."""
    return x.shape[1] == 1 and sparse_ops.use_triton(x)


def glu_list(x: Tensor) -> bool:
    """One row of a width that the MLP norm can list (sparse_ops.add_rmsnorm): there decode's gate|up kernel
    streams one list, reading both weights' rows of every channel that gate or up keeps."""
    return x.shape[0] == 1 and x.shape[-1] % sparse_ops.LIST_GROUP == 0


def add_norm(x: Tensor, delta: Tensor, norm: "RMSNorm", thresholds: Optional[Tensor] = None,
             scale: Optional[Tensor] = None) -> tuple:
    """(x + delta, its RMSNorm, kept). With the next GEMV's thresholds (and scale): delta is the last GEMV's split-K
    partials (parts, rows, dim), summed in one kernel with the add and the norm, which also lists the channels
    that the next GEMV keeps (sparse_ops.add_rmsnorm); else kept is None."""
    if thresholds is None:
        x = x + delta
        return x, norm(x), None
    h, y, kept = sparse_ops.add_rmsnorm(x.reshape(-1, x.shape[-1]), delta, norm.weight, norm.eps, thresholds, scale)
    return h.view_as(x), y.view_as(x), kept


def column_norms(w: Tensor, seg_ends: list) -> Tensor:
    """(segments, in_features) L2 norm of each input column of each output segment of w (out, in)."""
    starts = [0] + seg_ends[:-1]
    return torch.stack([w[a:b].float().norm(dim=0) for a, b in zip(starts, seg_ends)])


class Attention(nn.Module):
    def __init__(self, config: ModelArgs, window: int) -> None:
        super().__init__()
        c = config
        self.n_head, self.n_local_heads, self.head_dim = c.n_head, c.n_local_heads, c.head_dim
        self.window = window  # sliding window: attend to the last `window` positions only (0: all)
        self.q_size, self.kv_size = c.n_head * c.head_dim, c.n_local_heads * c.head_dim
        self.wqkv = nn.Linear(c.dim, self.q_size + 2 * self.kv_size, bias=c.qkv_bias)
        self.wo = nn.Linear(self.q_size, c.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None  # Transformer.setup_caches, before any forward
        self.qkv_ends = [self.q_size, self.q_size + self.kv_size, self.q_size + 2 * self.kv_size]
        self.qkv_scale: Optional[Tensor] = None
        self.o_scale: Optional[Tensor] = None

    def set_scores(self, weighted: bool) -> None:
        self.qkv_scale = column_norms(self.wqkv.weight, self.qkv_ends) if weighted else None
        self.o_scale = column_norms(self.wo.weight, [self.wo.out_features]) if weighted else None

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor, input_pos: Tensor, thr: Tensor, sparse: bool,
                stats: Optional[Tensor] = None, partials: bool = False) -> Tensor:
        """freqs_cis: the whole RoPE table (positions, head_dim/2, 2). partials: return the o GEMV's split-K partial
        sums (see sparse_linear)."""
        bsz, seqlen, _ = x.shape
        qkv_stats = None if stats is None else stats[0:3]
        if fused_decode(x):
            # Decode: one kernel sums the qkv GEMV's split-K partials, adds the bias, applies RoPE, writes the
            # cache and attends over the filled positions only (SDPA with the mask reads the whole cache).
            qkv = sparse_linear(x, self.wqkv, thr[0:3], self.qkv_ends, sparse, self.qkv_scale, qkv_stats,
                                partials=True)
            y = sparse_ops.decode_attention(qkv, self.wqkv.bias, self.kv_cache.k_cache, self.kv_cache.v_cache,
                                            input_pos, freqs_cis, self.n_head, self.window)
        else:
            qkv = sparse_linear(x, self.wqkv, thr[0:3], self.qkv_ends, sparse, self.qkv_scale, qkv_stats)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            freqs = freqs_cis[input_pos]
            q = apply_rotary_emb(q.view(bsz, seqlen, self.n_head, self.head_dim), freqs)
            k = apply_rotary_emb(k.view(bsz, seqlen, self.n_local_heads, self.head_dim), freqs)
            v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            k, v = self.kv_cache.update(input_pos, k, v)
            if self.window:  # transformers' sliding-window mask: key position > query position - window
                mask = mask & (torch.arange(mask.shape[-1], device=mask.device) > input_pos[:, None] - self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                               enable_gqa=self.n_head != self.n_local_heads).transpose(1, 2)
        y = y.contiguous().view(bsz, seqlen, self.q_size)
        return sparse_linear(y, self.wo, thr[3:4], [self.wo.out_features], sparse, self.o_scale,
                             None if stats is None else stats[3:4], partials)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)  # down
        self.w13_scale: Optional[Tensor] = None
        self.w2_scale: Optional[Tensor] = None

    def set_scores(self, weighted: bool) -> None:
        self.w13_scale = torch.cat([column_norms(self.w1.weight, [self.w1.out_features]),
                                    column_norms(self.w3.weight, [self.w3.out_features])]) if weighted else None
        self.w2_scale = column_norms(self.w2.weight, [self.w2.out_features]) if weighted else None

    def forward(self, x: Tensor, thr: Tensor, sparse: bool, stats: Optional[Tensor] = None,
                kept: Optional[Tensor] = None) -> Tensor:
        """kept: the channels that gate or up keep, listed by add_norm (decode at batch 1, not measuring)."""
        sc = self.w13_scale
        if sparse and x.shape[-2] == 1 and x.shape[0] <= sparse_ops.MAX_BATCH and stats is None:
            # gate and up share their input: one fused op, a threshold each (with kept, silu * up in its kernel)
            h = sparse_ops.sparse_glu(x.view(x.shape[0], -1), self.w1.weight.t(), self.w3.weight.t(), thr[4:6], sc,
                                      kept).view(x.shape[0], 1, -1)
        else:
            g = sparse_linear(x, self.w1, thr[4:5], [self.w1.out_features], sparse, None if sc is None else sc[0:1])
            u = sparse_linear(x, self.w3, thr[5:6], [self.w3.out_features], sparse, None if sc is None else sc[1:2])
            h = F.silu(g) * u
            if stats is not None and sparse:  # as sparse_linear: a dense run drops nothing
                keep = [sparse_ops.keep_mask(x, thr[4 + i], None if sc is None else sc[i]) for i in (0, 1)]
                union = drop_counts(keep[0] | keep[1], stats.dtype)[2:] if glu_list(x) else None
                for i in (0, 1):
                    c = drop_counts(keep[i], stats.dtype)
                    if union is not None:
                        c[2:] = union
                    stats[4 + i] += c
        return sparse_linear(h, self.w2, thr[6:7], [self.w2.out_features], sparse, self.w2_scale,
                             None if stats is None else stats[6:7])


class KVCache(nn.Module):
    def __init__(self, max_batch_size, max_seq_length, n_heads, head_dim, dtype, device) -> None:
        super().__init__()
        shape = (max_batch_size, n_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k_val: Tensor, v_val: Tensor):
        b = k_val.shape[0]
        self.k_cache[:b, :, input_pos] = k_val
        self.v_cache[:b, :, input_pos] = v_val
        return self.k_cache[:b], self.v_cache[:b]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # normalise in fp32, as the reference implementations do
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * y).to(x.dtype)


def precompute_freqs_cis(seq_len: int, n_elem: int, base: float, rope_scaling: Optional[dict]) -> Tensor:
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float64)[: n_elem // 2] / n_elem))
    if rope_scaling is not None:  # Llama-3.1: stretch the low frequencies, keep the high ones
        factor = rope_scaling["factor"]
        lo, hi = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
        old_len = rope_scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freqs
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, freqs / factor, freqs)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        freqs = torch.where(mid, (1 - smooth) * freqs / factor + smooth * freqs, scaled)
    t = torch.arange(seq_len, dtype=torch.float64)
    angles = torch.outer(t, freqs)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """x (B, T, H, D), freqs_cis (T, D/2, 2): rotate interleaved pairs (the converters permute q/k weights to match)."""
    return sparse_ops.rope(x, freqs_cis[None, :, None])


@torch.no_grad()
def to_column_major(model: Transformer) -> None:
    """Store every block linear's weight (out, in) transposed in memory, i.e. W.t() is contiguous (in, out).

    The sparse GEMV then reads each kept input column as one contiguous row of W.t(); F.linear handles the
    transposed layout natively, so dense prefill is unaffected and no second copy is kept.
    """
    for b in model.layers:
        for lin in (b.attention.wqkv, b.attention.wo, b.feed_forward.w1, b.feed_forward.w2, b.feed_forward.w3):
            lin.weight = nn.Parameter(lin.weight.t().contiguous().t(), requires_grad=False)
