"""Decode attention kernel (sparse_ops/attention.py) against PyTorch's SDPA and the plain-torch reference."""
import pytest
import torch
import torch.nn.functional as F

import sparse_ops
from conftest import rel_err
from sparse_ops import decode_attention, decode_attention_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}


def random_case(B, H, H_kv, S, D, dtype, pos, parts=1, bias=False, b_max=None, seed=0):
    """qkv as the projection hands it over (`parts` split-K partial sums, fp32 when several), an optional bias,
    caches (b_max rows) filled before pos, the position tensor and a RoPE table (a row per cache position)."""
    g = torch.Generator().manual_seed(seed)
    N = (H + 2 * H_kv) * D
    qkv = (torch.randn(parts, B, N, generator=g) / parts ** 0.5).to(dtype if parts == 1 else torch.float32).to(DEV)
    b = (torch.randn(N, generator=g) / 4).to(dtype).to(DEV) if bias else None
    k = torch.randn(b_max or B, H_kv, S, D, generator=g).to(dtype).to(DEV)
    v = torch.randn(b_max or B, H_kv, S, D, generator=g).to(dtype).to(DEV)
    # Positions from input_pos on hold garbage: a kernel that reads one before writing it is visibly wrong.
    k[:, :, pos:] = 1e3
    v[:, :, pos:] = float("nan")
    return qkv, b, k, v, torch.tensor([pos], device=DEV), rope_table(S, D)


def rope_table(S, D, base=10000.0):
    angles = torch.arange(S, dtype=torch.float64)[:, None] / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float().to(DEV)


def rotate(x, freqs):
    """RoPE written as a complex product: an oracle independent of sparse_ops.rope."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * torch.view_as_complex(freqs.double().contiguous())).flatten(-2)


def oracle(qkv, bias, k_cache, v_cache, pos, table, H, window=0):
    """In fp64 with PyTorch's SDPA, independent of decode_attention_ref: (attention output, new k, new v). A
    window keeps the last `window` positions, the new one included."""
    B = qkv.shape[1]
    freqs = table[int(pos.item())]
    H_kv, _, D = k_cache.shape[1:]
    y = qkv.double().sum(0).to(k_cache.dtype).double()  # the projection's output is rounded to the model dtype
    if bias is not None:
        y = (y + bias.double()).to(k_cache.dtype).double()
    q, k, v = y.split([H * D, H_kv * D, H_kv * D], dim=-1)
    k_new = rotate(k.reshape(B, H_kv, D), freqs)
    v_new = v.reshape(B, H_kv, D)
    L = int(pos.item()) + 1
    lo = max(0, L - window) if window else 0
    keys = torch.cat([k_cache[:B, :, lo:L - 1].double(), k_new[:, :, None]], dim=2)
    values = torch.cat([v_cache[:B, :, lo:L - 1].double(), v_new[:, :, None]], dim=2)
    out = F.scaled_dot_product_attention(rotate(q.reshape(B, H, D), freqs)[:, :, None], keys, values,
                                         enable_gqa=H != H_kv)
    return out[:, :, 0], k_new, v_new


def check(qkv, bias, k, v, p, f, H, fn=decode_attention, window=0):
    """Run fn on copies of the caches; compare its output and the cache writes with the oracle."""
    dtype = k.dtype
    want, k_new, v_new = oracle(qkv, bias, k, v, p, f, H, window)
    kc, vc = k.clone(), v.clone()
    y = fn(qkv, bias, kc, vc, p, f, H, window)
    assert y.shape == want.shape and y.dtype == dtype
    assert rel_err(y, want) < TOL[dtype]
    B, pos = qkv.shape[1], int(p.item())
    assert rel_err(kc[:B, :, pos], k_new) < TOL[dtype] and rel_err(vc[:B, :, pos], v_new) < TOL[dtype]
    kc[:B, :, pos], vc[:B, :, pos] = k[:B, :, pos], v[:B, :, pos]
    assert torch.equal(kc, k) and torch.equal(vc.nan_to_num(), v.nan_to_num())  # nothing else written


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,H,H_kv,D", [(1, 9, 3, 64), (2, 8, 8, 32), (3, 12, 4, 128), (1, 6, 2, 80), (2, 8, 1, 32)])
def test_matches_sdpa(dtype, B, H, H_kv, D):
    # SmolLM2's 9/3 heads of 64, multi-head, GQA with 128-wide heads, a head size that is not a power of two, MQA;
    # split-K partials (fp32) or the projection itself; with and without a (Qwen2) bias
    for S, pos, parts, bias in [(40, 0, 1, False), (40, 17, 3, True), (100, 99, 5, False), (77, 63, 1, True),
                                (16, 10, 2, False)]:  # a 16-slot cache: a single chunk
        check(*random_case(B, H, H_kv, S, D, dtype, pos, parts, bias, seed=S + pos), H)


def test_reference_matches_sdpa():
    case = random_case(2, 8, 2, 50, 32, torch.float32, 30, parts=3, bias=True)
    check(*case, 8, fn=decode_attention_ref)
    check(*case, 8, fn=decode_attention_ref, window=7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sliding_window(dtype):
    # Mistral's and Qwen2's windows: the last `window` positions, the new one included. Positions before the
    # window hold random keys, so attending to them shows. A window of one (the token itself), windows that
    # split into several chunks or start mid-chunk, one longer than the positions filled, one as long as the cache.
    for S, pos, window in [(40, 17, 5), (40, 17, 1), (100, 99, 30), (100, 70, 33), (40, 3, 8), (48, 47, 48),
                           (64, 40, 16)]:
        case = random_case(2, 8, 2, S, 32, dtype, pos, parts=3, bias=True, seed=S + pos + window)
        check(*case, 8, window=window)
        if window <= pos:  # the window must matter: the full attention differs
            assert rel_err(oracle(*case, 8)[0], oracle(*case, 8, window)[0]) > 10 * TOL[dtype]


def test_cache_write_rounds_like_the_linear():
    # v goes to the cache as the model's linear gives it: the fp32 sum of the partials rounded to the model dtype,
    # then the bias added and rounded again. Emulated exactly in fp16 (partials summed in their order).
    qkv, bias, k, v, p, f = random_case(2, 4, 2, 40, 32, torch.float16, 21, parts=3, bias=True, seed=5)
    vc = v.clone()
    decode_attention(qkv, bias, k.clone(), vc, p, f, 4)
    s = qkv[0].float()
    for part in qkv[1:]:
        s = s + part.float()
    y = (s.to(torch.float16).float() + bias.float()).to(torch.float16)
    assert torch.equal(vc[:, :, 21], y[:, (4 + 2) * 32:].reshape(2, 2, 32))


def test_fewer_rows_than_the_cache():
    # A cache set up for 4 rows decoding 2: rows 2 and 3 stay untouched
    check(*random_case(2, 4, 2, 40, 32, torch.bfloat16, 20, parts=2, b_max=4), 4)


def test_position_follows_the_tensor():
    # The length comes from input_pos at run time (a CUDA graph replays with new positions, same launch)
    qkv, bias, k, v, _, f = random_case(1, 4, 2, 64, 32, torch.bfloat16, 63, parts=2)
    outs = []
    for pos in (5, 40):
        p = torch.tensor([pos], device=DEV)
        outs.append(decode_attention(qkv, bias, k.clone(), v.clone(), p, f, 4))
        assert rel_err(outs[-1], oracle(qkv, bias, k, v, p, f, 4)[0]) < TOL[torch.bfloat16]
    assert (outs[0] - outs[1]).abs().max() > 0


def test_strided_batch_rows():
    # qkv rows of a wider buffer
    qkv, bias, k, v, p, f = random_case(3, 4, 2, 40, 32, torch.float32, 25, parts=2)
    wide = torch.cat([qkv, torch.randn(2, 3, 64, device=DEV)], dim=2)[:, :, :qkv.shape[2]]
    assert not wide.is_contiguous()
    check(wide, bias, k, v, p, f, 4)


def test_position_past_the_cache_writes_nothing():
    # A caller's bug the op cannot see without a host sync per step: input_pos past the cache. The kernel must not
    # write outside the cache (here it would land on the next head's first position).
    if not sparse_ops.use_triton(torch.empty(0, device=DEV)):
        pytest.skip("the kernel runs on a GPU or in Triton's interpreter")
    qkv, bias, k, v, _, f = random_case(2, 4, 2, 16, 32, torch.float32, 16, parts=2, bias=True)
    kc, vc = k.clone(), v.clone()
    decode_attention(qkv, bias, kc, vc, torch.tensor([16], device=DEV), f, 4)
    assert torch.equal(kc, k) and torch.equal(vc.nan_to_num(), v.nan_to_num())
    with pytest.raises(IndexError):  # the reference indexes the cache itself
        decode_attention_ref(qkv, bias, kc, vc, torch.tensor([16], device=DEV), f, 4)


def test_opcheck():
    args = random_case(2, 4, 2, 48, 32, torch.bfloat16, 20, parts=3, bias=True)
    # AOT tracing runs the op's body on fake tensors, which Triton's CPU interpreter cannot; GPU runs them all.
    utils = "ALL" if DEV == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")
    for window in (0, 5):
        torch.library.opcheck(torch.ops.tealfast.decode_attention.default, (*args, 4, window), test_utils=utils)


def test_bad_input():
    qkv, bias, k, v, p, f = random_case(1, 4, 2, 16, 32, torch.bfloat16, 3)
    with pytest.raises(ValueError, match="does not fit"):
        decode_attention(qkv, bias, k, v, p, f, 3)
    with pytest.raises(ValueError, match="does not fit"):
        decode_attention(qkv[..., :-32], bias, k, v, p, f, 4)
    with pytest.raises(ValueError, match="does not fit"):
        decode_attention(qkv.expand(1, 2, -1), bias, k, v, p, f, 4)  # more rows than the cache
    with pytest.raises(TypeError, match="dtype"):
        decode_attention(qkv.half(), bias, k, v, p, f, 4)
    with pytest.raises(TypeError, match="dtype"):
        decode_attention(qkv.expand(2, -1, -1).contiguous(), bias, k, v, p, f, 4)  # several partials come in fp32
    with pytest.raises(ValueError, match="bias"):
        decode_attention(qkv, torch.zeros(10, device=DEV, dtype=torch.bfloat16), k, v, p, f, 4)
    with pytest.raises(ValueError, match="contiguous"):
        decode_attention(qkv, bias, k.transpose(2, 3).contiguous().transpose(2, 3), v, p, f, 4)
    with pytest.raises(ValueError, match="contiguous"):
        decode_attention(qkv.expand(2, -1, -1).transpose(0, 2).contiguous().transpose(0, 2), bias, k, v, p, f, 4)
    with pytest.raises(ValueError, match="one integer position"):
        decode_attention(qkv, bias, k, v, torch.tensor([1, 2], device=DEV), f, 4)
    with pytest.raises(ValueError, match="equal"):
        decode_attention(qkv, bias, k, v[:, :, :8], p, f, 4)
    with pytest.raises(ValueError, match="freqs"):
        decode_attention(qkv, bias, k, v, p, f[:8], 4)  # fewer rows than cache positions
    with pytest.raises(ValueError, match="freqs"):
        decode_attention(qkv, bias, k, v, p, f[3], 4)  # one position's row, not the table
    with pytest.raises(ValueError, match="freqs"):
        decode_attention(qkv, bias, k, v, p, f.double(), 4)
    for window in (-1, 2.0, True):
        with pytest.raises(ValueError, match="window"):
            decode_attention(qkv, bias, k, v, p, f, 4, window)


def test_chunks_cover_every_position():
    # The attended length is split at run time into N_SPLIT chunks of whole BLOCK_S steps (3 of 16 in Triton's
    # interpreter, 64 on a GPU): lengths one past that grid (49 = 3 x 16 + 1, 129 = 2 x 64 + 1), on it and one short
    # of it, windows likewise, must still reach the new token and every position before it
    for S, pos, window in [(100, 48, 0), (100, 47, 0), (100, 49, 0), (100, 96, 0), (200, 128, 0), (100, 60, 49),
                           (100, 80, 33), (200, 150, 129)]:
        check(*random_case(1, 4, 2, S, 16, torch.float32, pos, parts=2, seed=pos + window), 4, window=window)


@pytest.mark.parametrize("shift,at", [(-110.0, None), (110.0, 1)])
def test_logits_far_from_zero(shift, at):
    # Softmax does not change when every score moves by the same amount, and the kernel must not either: every
    # key's score about 110 (nats) below zero, where exp underflows fp32 unless each chunk and the merge subtract
    # the largest score they have seen; or one key (position 1, the first step of the first chunk) 110 above the
    # others, after which a maximum that falls back to a later step's would scale the chunk's sums by 2^159
    H, D, S, pos = 2, 32, 100, 99
    qkv, bias, k, v, p, f = random_case(1, H, H, S, D, torch.float32, pos, seed=4)
    q = qkv[0, 0, :H * D].reshape(H, D)
    along = rotate(q, f[pos]).float() / q.pow(2).sum(-1, keepdim=True) * shift * D ** 0.5  # q . along = shift sqrt(D)
    if at is None:  # the cached keys and the new one
        k[0, :, :pos] += along[:, None]
        qkv[0, 0, H * D:2 * H * D] += (q / q.pow(2).sum(-1, keepdim=True) * shift * D ** 0.5).flatten()
    else:
        k[0, :, at] += along
    want, k_new, _ = oracle(qkv, bias, k, v, p, f, H)
    kc, vc = k.clone(), v.clone()
    y = decode_attention(qkv, bias, kc, vc, p, f, H)
    assert rel_err(y, want) < 1e-4 and rel_err(kc[:, :, pos], k_new) < 1e-5
    if at is not None:
        assert rel_err(want, v[:1, :, at]) < 1e-6  # the one key takes all the weight


# ---- GPU only ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("B,H,H_kv,S,parts,window", [(1, 32, 8, 4096, 5, 0), (4, 32, 32, 1024, 1, 0),
                                                     (8, 32, 8, 300, 3, 0), (1, 32, 8, 8192, 5, 4096),
                                                     (2, 28, 4, 1024, 2, 100)])
def test_llama_shapes_gpu(B, H, H_kv, S, parts, window):
    # Llama-2/3, Mistral-7B v0.1's 4,096-token window in an 8K cache, Qwen2-7B's 28/4 heads with a short window
    for pos in (0, 1, S // 3, S - 1):
        check(*random_case(B, H, H_kv, S, 128, torch.bfloat16, pos, parts, seed=pos), H, window=window)


@pytest.mark.gpu
def test_cuda_graph_replay_follows_the_position():
    qkv, bias, k, v, _, _ = random_case(1, 32, 8, 512, 128, torch.bfloat16, 511, parts=5, bias=True)
    kc, vc = k.clone(), v.clone()
    pos, freqs = torch.tensor([10], device="cuda"), rope_table(512, 128)
    compiled = torch.compile(lambda qkv: sparse_ops.decode_attention(qkv, bias, kc, vc, pos, freqs, 32),
                             fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        compiled(qkv)
    for p in (10, 200, 511):
        pos.fill_(p)
        kc.copy_(k)
        vc.copy_(v)
        y = compiled(qkv).clone()
        want, k_new, _ = oracle(qkv, bias, k, v, pos, freqs, 32)
        assert rel_err(y, want) < TOL[torch.bfloat16], p
        assert rel_err(kc[:, :, p], k_new) < TOL[torch.bfloat16], p  # the compiled graph wrote the cache in place
