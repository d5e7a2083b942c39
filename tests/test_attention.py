"""Decode attention kernel (sparse_ops/attention.py) against PyTorch's SDPA and the plain-torch reference."""
import pytest
import torch
import torch.nn.functional as F

import sparse_ops
from sparse_ops import decode_attention, decode_attention_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}


def random_case(B, H, H_kv, S, D, dtype, pos, seed=0):
    """q before RoPE, caches filled up to pos, the position tensor and its RoPE cos/sin."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(B, H_kv, S, D, generator=g).to(dtype).to(DEV)
    v = torch.randn(B, H_kv, S, D, generator=g).to(dtype).to(DEV)
    # Positions past input_pos hold garbage: a kernel that reads them gives a visibly wrong answer.
    k[:, :, pos + 1:] = 1e3
    v[:, :, pos + 1:] = float("nan")
    return q, k, v, torch.tensor([pos], device=DEV), rope_freqs(pos, D)


def rope_freqs(pos, D, base=10000.0):
    angles = pos / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float().to(DEV)


def rotate(q, freqs):
    """RoPE written as a complex product: an oracle independent of sparse_ops.rope."""
    qc = torch.view_as_complex(q.double().reshape(*q.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(qc * torch.view_as_complex(freqs.double().contiguous())).flatten(-2)


def sdpa(q, k, v, pos, freqs):
    """PyTorch's own attention over the filled positions, in fp64: an oracle independent of decode_attention_ref."""
    L = int(pos.item()) + 1
    y = F.scaled_dot_product_attention(rotate(q, freqs)[:, :, None], k[:, :, :L].double(), v[:, :, :L].double(),
                                       enable_gqa=q.shape[1] != k.shape[1])
    return y[:, :, 0]


def rel_err(y, ref):
    assert torch.isfinite(y).all()
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,H,H_kv,D", [(1, 9, 3, 64), (2, 8, 8, 32), (3, 12, 4, 128), (1, 6, 2, 80)])
def test_matches_sdpa(dtype, B, H, H_kv, D):
    # SmolLM2's 9/3 heads of 64, multi-head, GQA with 128-wide heads, and a head size that is not a power of two
    for S, pos in [(40, 0), (40, 17), (100, 99), (77, 63), (16, 10)]:  # a 16-slot cache: a single chunk
        q, k, v, p, f = random_case(B, H, H_kv, S, D, dtype, pos, seed=S + pos)
        y = decode_attention(q, k, v, p, f)
        assert y.shape == q.shape and y.dtype == dtype
        assert rel_err(y, sdpa(q, k, v, p, f)) < TOL[dtype], (S, pos)


def test_reference_matches_sdpa():
    q, k, v, p, f = random_case(2, 8, 2, 50, 32, torch.float32, 30)
    assert rel_err(decode_attention_ref(q, k, v, p, f), sdpa(q, k, v, p, f)) < 1e-6


def test_position_follows_the_tensor():
    # The length comes from input_pos at run time (a CUDA graph replays with new positions, same launch)
    q, k, v, _, _ = random_case(1, 4, 2, 64, 32, torch.bfloat16, 63)
    outs = []
    for pos in (5, 40):
        p, f = torch.tensor([pos], device=DEV), rope_freqs(pos, 32)
        outs.append(decode_attention(q, k, v, p, f))
        assert rel_err(outs[-1], sdpa(q, k, v, p, f)) < TOL[torch.bfloat16]
    assert (outs[0] - outs[1]).abs().max() > 0


def test_strided_batch_rows():
    # q as the model hands it over: rows of a wider qkv buffer
    q, k, v, p, f = random_case(3, 4, 2, 40, 32, torch.float32, 25)
    wide = torch.cat([q.flatten(1), torch.randn(3, 64, device=DEV)], dim=1)[:, :128].view(3, 4, 32)
    assert not wide.is_contiguous()
    assert rel_err(decode_attention(wide, k, v, p, f), sdpa(q, k, v, p, f)) < TOL[torch.float32]


def test_opcheck():
    q, k, v, p, f = random_case(2, 4, 2, 48, 32, torch.bfloat16, 20)
    # AOT tracing runs the op's body on fake tensors, which Triton's CPU interpreter cannot; GPU runs them all.
    utils = "ALL" if DEV == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.tealfast.decode_attention.default, (q, k, v, p, f), test_utils=utils)


def test_bad_input():
    q, k, v, p, f = random_case(1, 4, 2, 16, 32, torch.bfloat16, 3)
    with pytest.raises(ValueError, match="does not fit"):
        decode_attention(q[:, :3].contiguous(), k, v, p, f)
    with pytest.raises(ValueError, match="does not fit"):
        decode_attention(q[..., :16].contiguous(), k, v, p, f)
    with pytest.raises(TypeError, match="dtype"):
        decode_attention(q.float(), k, v, p, f)
    with pytest.raises(ValueError, match="contiguous"):
        decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, p, f)
    with pytest.raises(ValueError, match="contiguous"):
        decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, p, f)
    with pytest.raises(ValueError, match="one integer position"):
        decode_attention(q, k, v, torch.tensor([1, 2], device=DEV), f)
    with pytest.raises(ValueError, match="equal"):
        decode_attention(q, k, v[:, :, :8], p, f)
    with pytest.raises(ValueError, match="freqs"):
        decode_attention(q, k, v, p, f[:8])
    with pytest.raises(ValueError, match="freqs"):
        decode_attention(q, k, v, p, f.double())


# ---- GPU only ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("B,H,H_kv,S", [(1, 32, 8, 4096), (4, 32, 32, 1024), (8, 32, 8, 300)])
def test_llama_shapes_gpu(B, H, H_kv, S):
    for pos in (0, 1, S // 3, S - 1):
        q, k, v, p, f = random_case(B, H, H_kv, S, 128, torch.bfloat16, pos, seed=pos)
        assert rel_err(decode_attention(q, k, v, p, f), sdpa(q, k, v, p, f)) < TOL[torch.bfloat16], pos


@pytest.mark.gpu
def test_cuda_graph_replay_follows_the_position():
    q, k, v, _, _ = random_case(1, 32, 8, 512, 128, torch.bfloat16, 511)
    pos, freqs = torch.tensor([10], device="cuda"), rope_freqs(10, 128)
    compiled = torch.compile(lambda q: sparse_ops.decode_attention(q, k, v, pos, freqs), fullgraph=True,
                             mode="reduce-overhead")
    for _ in range(3):
        compiled(q)
    for p in (10, 200, 511):
        pos.fill_(p)
        freqs.copy_(rope_freqs(p, 128))
        y = compiled(q).clone()
        assert rel_err(y, sdpa(q, k, v, pos, freqs)) < TOL[torch.bfloat16], p
