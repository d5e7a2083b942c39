"""The benchmark scripts' command lines: a bad value is a one-line usage error; bench_decode also runs end to end on
a CPU as a smoke test (the timings need a GPU)."""
import pytest
import torch

import bench_attention
import bench_decode
import bench_kernels


class Reached(Exception):
    """bench_decode got past its argument checks (to building the model)."""


def _reached(*a, **k):
    raise Reached


@pytest.mark.parametrize("main,argv", [
    (bench_decode.main, ["--sparsity", "abc", "--device", "cpu", "--preset", "smollm2-135m"]),
    (bench_decode.main, ["--sparsity", "0.5,1", "--device", "cpu", "--preset", "smollm2-135m"]),
    (bench_decode.main, ["--tokens", "0", "--device", "cpu", "--preset", "smollm2-135m"]),
    (bench_decode.main, ["--prompt_len", "-1", "--device", "cpu", "--preset", "smollm2-135m"]),
    (bench_decode.main, ["--batch_size", "9", "--device", "cpu", "--preset", "smollm2-135m"]),
    (bench_decode.main, ["--device", "bogus"]),
    (bench_decode.main, ["--device", "cpu"]),  # llama-3-8b: minutes and 16 GB for a smoke test
    (bench_decode.main, ["--device", "cpu", "--preset", "smollm2-135m", "--profile"]),  # no kernels to profile
    # past the preset's context, or past any use: refused before minutes of building and timing
    (bench_decode.main, ["--device", "cpu", "--preset", "smollm2-135m", "--tokens", "8177"]),
    (bench_decode.main, ["--device", "cpu", "--preset", "smollm2-135m", "--calib_tokens", str(10 ** 20)]),
    (bench_kernels.main, ["--batch", "abc"]),
    (bench_kernels.main, ["--batch", "16"]),
    (bench_kernels.main, ["--sparsity", "x"]),
    (bench_kernels.main, ["--sweep", "--compiled_baseline"]),  # the sweep has no such column
    (bench_attention.main, ["--context", "0"]),
    (bench_attention.main, ["--batch", "1,99"]),
    (bench_attention.main, ["--window", "0"]),
])
def test_bad_values_are_usage_errors(main, argv, capsys, monkeypatch):
    monkeypatch.setattr(bench_decode, "build", _reached)  # a check that let it through fails here, not minutes on
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len([l for l in err.splitlines() if "error:" in l]) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default device is a GPU's")
def test_bench_decode_without_a_gpu_names_the_smoke_test(capsys):
    with pytest.raises(SystemExit) as e:
        bench_decode.main(["--preset", "smollm2-135m"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no CUDA GPU here" in err and "--device cpu --preset smollm2-135m" in err, err


def test_bench_decode_cpu_smoke(tmp_path, monkeypatch):
    """The whole script on a CPU (eager, the reference ops), two rows a step: dense row, calibration on the fly,
    sparse rows, JSON; the row's figures from its own (per-row) sparsity, the rows no batch row keeps, the bytes."""
    import json
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter would take minutes; the kernels have their tests
    out = tmp_path / "decode.json"
    bench_decode.main(["--preset", "smollm2-135m", "--device", "cpu", "--tokens", "3", "--prompt_len", "4",
                       "--calib_tokens", "32", "--sparsity", "0,0.5", "--variants", "uniform,per_projection,weighted",
                       "--batch_size", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    rows = result.pop("rows")
    assert result == {"preset": "smollm2-135m", "gpu": "cpu", "torch": torch.__version__, "batch_size": 2,
                      "tokens": 3, "dtype": "bf16"}
    assert [(r["variant"], r["sparsity"]) for r in rows] == [("dense (F.linear)", 0.0)] + [
        (v, s) for v in ("uniform", "per_projection", "weighted") for s in (0.0, 0.5)]
    assert rows[0]["achieved"] == rows[0]["rows_skipped"] == 0
    assert rows[0]["speedup"] == rows[0]["speedup_vs_best_dense"] == 1
    # level 0 drops exact zeros only; 8 decode steps (5 warm-up, 3 timed) of random tokens against a 32-token
    # calibration come near 0.5
    assert all(r["achieved"] < 0.01 for r in rows[1::2]) and all(0.3 < r["achieved"] < 0.7 for r in rows[2::2])
    assert all(r["tokens_per_s"] > 0 for r in rows)
    # SmolLM2-135M by hand, bf16: 134,515,008 parameters (the tied embedding once), read every step; the linears of
    # its 30 blocks, per projection (q, k, v, o, gate, up, down): 576x576, 576x192 twice, 576x576, 576x1536 thrice
    total = 2 * 134_515_008
    per = [2 * 30 * 576 * n for n in (576, 192, 192, 576, 1536, 1536, 1536)]
    linear = sum(per)
    for r in rows:
        ach = [r["achieved_per_projection"][p] for p in ("q", "k", "v", "o", "gate", "up", "down")]
        assert r["achieved"] == pytest.approx(sum(b * a for b, a in zip(per, ach)) / linear, abs=2e-4)
        # a weight row is skipped only where both rows drop its input: fewer rows than inputs dropped
        assert r["rows_skipped"] <= r["achieved"] + 1e-4
        assert r["gb_s_read"] == pytest.approx((total - r["rows_skipped"] * linear) * r["tokens_per_s"] / 1e9,
                                               abs=0.06)
        # speedup is the unrounded tokens/s over the dense row's rounded one (0.01), itself rounded (0.001): on a
        # busy CPU the dense row can run under 1 token/s, where the rounding moves the ratio by more than 2e-3
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / rows[0]["tokens_per_s"],
                                             abs=6e-4 + 0.005 / rows[0]["tokens_per_s"])
    assert all(r["rows_skipped"] < r["achieved"] - 0.1 for r in rows[2::2])  # about 0.25 against 0.5


@pytest.mark.gpu
def test_bench_decode_profile_on_the_gpu(tmp_path):
    """--profile with fewer timed --tokens than the profiled steps: the cache has room for both runs, and every
    row gets its per-kernel breakdown."""
    import json
    out = tmp_path / "decode.json"
    bench_decode.main(["--preset", "smollm2-135m", "--tokens", "3", "--prompt_len", "4", "--calib_tokens", "64",
                       "--sparsity", "0.5", "--variants", "uniform", "--profile", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense (cuBLAS)", "dense (inductor GEMV)", "uniform"]
    best = max(rows[0]["tokens_per_s"], rows[1]["tokens_per_s"])
    # from the unrounded tokens/s: within a rounding of the printed ones
    assert [r["speedup_vs_best_dense"] for r in rows] == pytest.approx([r["tokens_per_s"] / best for r in rows],
                                                                       abs=2e-3)
    kernels = [r["kernel_breakdown"]["kernels"] for r in rows]
    cublas = ("nvjet", "gemv", "gemm", "splitk", "cutlass", "xmma")
    assert any(w in k.lower() for k in kernels[0] for w in cublas)  # the cuBLAS baseline calls it
    assert not any(w in k.lower() for k in kernels[1] for w in cublas)  # inductor's GEMVs replace it
    assert all(r["kernel_breakdown"]["wall_us_per_step"] > 0 for r in rows)
    assert rows[2]["kernel_breakdown"]["sparse_gemv"]["kernels_per_step"] > 0


# ---- presets and shapes against the published configs -------------------------------------------------------
# The models' config.json on the Hugging Face hub: (vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, intermediate_size, rope_theta, max_position_embeddings). Llama-2 has no rope_theta: 10000.
PUBLISHED = {
    "llama-2-7b": (32000, 4096, 32, 32, 32, 11008, 10000.0, 4096),  # meta-llama/Llama-2-7b-hf
    "llama-3-8b": (128256, 4096, 32, 32, 8, 14336, 500000.0, 8192),  # meta-llama/Meta-Llama-3-8B
    "mistral-7b": (32000, 4096, 32, 32, 8, 14336, 1000000.0, 32768),  # mistralai/Mistral-7B-Instruct-v0.2
    "smollm2-135m": (49152, 576, 30, 9, 3, 1536, 100000.0, 8192),  # HuggingFaceTB/SmolLM2-135M
}


@pytest.mark.parametrize("preset", PUBLISHED)
def test_presets_match_the_published_configs(preset):
    from model import ModelArgs
    a = ModelArgs(**bench_decode.PRESETS[preset])
    vocab, dim, layers, heads, kv_heads, ffn, rope, context = PUBLISHED[preset]
    assert (a.vocab_size, a.dim, a.n_layer, a.n_head, a.n_local_heads, a.intermediate_size, a.rope_base) == (
        vocab, dim, layers, heads, kv_heads, ffn, rope)
    assert a.head_dim == dim // heads and a.tie_embeddings == (preset == "smollm2-135m")
    assert a.block_size == context


def test_kernel_and_attention_shapes_are_the_models():
    l2, l3 = PUBLISHED["llama-2-7b"], PUBLISHED["llama-3-8b"]
    qkv3 = (l3[3] + 2 * l3[4]) * l3[1] // l3[3]  # q, k and v rows of Llama-3-8B: 32 + 2 * 8 heads of 128
    shapes = {name: (K, N) for name, K, N in bench_kernels.SHAPES}
    assert shapes == {
        "attn.o (7B/8B)": (4096, 4096), "llama-3 wqkv": (4096, qkv3),
        "llama-2 gate|up": (4096, l2[5]), "llama-2 down": (l2[5], 4096),
        "llama-3 gate|up": (4096, l3[5]), "llama-3 down": (l3[5], 4096),
        "llama-2 gate+up fused": (4096, 2 * l2[5]), "llama-3 gate+up fused": (4096, 2 * l3[5]),
        "llama-2 gate+up GLU, listed": (4096, 2 * l2[5]), "llama-3 gate+up GLU, listed": (4096, 2 * l3[5])}
    assert bench_attention.MODELS == [("llama-3-8b / mistral-7b", l3[3], l3[4]), ("llama-2-7b", l2[3], l2[4])]
    assert PUBLISHED["mistral-7b"][3:5] == l3[3:5]


# ---- bench_decode's checks at their bounds, its cache and its arithmetic ------------------------------------
@pytest.mark.parametrize("argv", [
    ["--tokens", str(8192 - 16 - bench_decode.WARMUP_ROOM)],  # the cache exactly fills smollm2's context
    ["--batch_size", "8"],
    ["--calib_tokens", str(2 ** 20)],
])
def test_bench_decode_accepts_the_bounds(monkeypatch, argv):
    monkeypatch.setattr(bench_decode, "build", _reached)
    with pytest.raises(Reached):
        bench_decode.main(["--device", "cpu", "--preset", "smollm2-135m", "--prompt_len", "16", *argv])


@pytest.mark.parametrize("tokens, profile", [(3, False), (3, True), (30, True), (200, False)])
def test_cache_length_holds_every_step(tokens, profile):
    """The prompt, the warm-up and the timed steps (or --profile's, where more) all get a cache position."""
    import argparse
    import inspect
    warmup = inspect.signature(bench_decode.time_decode).parameters["warmup"].default
    steps = max(tokens, bench_decode.PROFILE_STEPS) if profile else tokens
    n = bench_decode.cache_length(argparse.Namespace(prompt_len=4, tokens=tokens, profile=profile))
    assert 4 + warmup + steps <= n <= 4 + steps + 16


def test_per_projection_sparsities_keep_the_weighted_level():
    """Attention 0.1 above the level (at most 0.95), the MLP lowered so that the bytes-weighted level is unchanged:
    by hand for linears of 4, 1, 1, 4 (q, k, v, o) and 12, 12, 12 (gate, up, down) bytes."""
    from types import SimpleNamespace
    model = SimpleNamespace(config=SimpleNamespace(n_layer=2))
    lb = torch.tensor([4, 1, 1, 4, 12, 12, 12], dtype=torch.float64)
    for s, attn, mlp in [(0.5, 0.6, 0.5 - 0.1 * 10 / 36), (0.9, 0.95, 0.9 - 0.05 * 10 / 36),
                         (0.01, 0.01 + 0.036, 0.0), (0.0, 0.0, 0.0)]:
        per = bench_decode.per_projection_sparsities(model, s, lb)
        assert per.shape == (2, 7)
        assert per[1].tolist() == pytest.approx([attn] * 4 + [mlp] * 3, abs=1e-12), s
        assert float((per[0] * lb).sum() / lb.sum()) == pytest.approx(s, abs=1e-12)


# ---- bench_kernels / bench_attention: bounds and bytes ------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the checks pass on to the GPU run")
@pytest.mark.parametrize("main,argv", [
    (bench_kernels.main, ["--batch", "1,8"]),
    (bench_kernels.main, ["--sweep"]),
    (bench_kernels.main, ["--compiled_baseline"]),
    (bench_attention.main, ["--context", "1,8192", "--batch", "8"]),
])
def test_bench_values_at_the_bounds_pass_the_checks(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: needs a CUDA GPU" in err, err  # the next check: no GPU here


def test_bench_kernels_bytes_needed():
    """Union over the batch: a weight row is read where any row keeps its input; plus x and y (y half as wide for
    the GLU), in x's dtype. By hand: K = 8, N = 6, bf16 (2 bytes)."""
    x = torch.tensor([[5, 0, 5, 0, 0, 0, 0, 0],
                      [5, 5, 0, 0, 0, 0, 0, -5]], dtype=torch.bfloat16)
    assert bench_kernels.bytes_needed(x, 1.0, 6) == (0.5, 4 * 6 * 2 + 2 * (8 + 6) * 2)
    assert bench_kernels.bytes_needed(x, 1.0, 6, glu=True) == (0.5, 4 * 6 * 2 + 2 * (8 + 3) * 2)
    assert bench_kernels.bytes_needed(x[:1].float(), 1.0, 6) == (0.25, 2 * 6 * 4 + (8 + 6) * 4)
    assert bench_kernels.bytes_needed(x, 5.0, 6) == (0.0, 2 * (8 + 6) * 2)  # |x| > thr keeps: none of these


def test_bench_attention_bytes_of_the_filled_cache():
    # k and v, bf16, head size 128: Llama-3-8B's 8 key/value heads at 8192 positions are 32 MiB a layer
    assert bench_attention.kv_bytes(1, 8, 8192) == 32 * 2 ** 20
    assert bench_attention.kv_bytes(4, 32, 100) == 2 * 4 * 32 * 100 * 128 * 2


@pytest.mark.parametrize("positions", [256, 1024, 8192])
def test_bench_attention_cache_copies_defeat_l2(positions):
    """decode_attention reads only the filled positions (or the window): between two reads of one cache copy, the
    other copies' k and v positions must be more than L2 (50 MB) holds (sized on the whole cache, 9 copies' 256
    positions were 9 MB)."""
    for _, _, H_kv in bench_attention.MODELS:
        for B in (1, 4, 8):
            cache = torch.empty(B, H_kv, bench_attention.MAX_SEQ, 128, dtype=torch.bfloat16, device="meta")
            n = bench_attention.cache_copies(cache, positions)
            assert (n - 1) * bench_attention.kv_bytes(B, H_kv, positions) > 50 * 2 ** 20, (H_kv, B, n)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_bench_kernels_weight_copies_defeat_l2(sparsity):
    """Between two reads of one weight copy, the calls on the other copies must read more than L2 (50 MB) holds, in
    back-to-back graph replays too, counting only the kept rows that a sparse op reads: copies sized on the whole
    weight let 90% keep every copy's rows in L2, and 20 calls over 3 copies re-read copy 0 after one other call."""
    for name, K, N in bench_kernels.SHAPES:
        w = torch.empty(N, K, dtype=torch.bfloat16, device="meta")
        c = bench_kernels.copies_for(w, 1 - sparsity)
        order = bench_kernels.call_order(c) * 3  # three replays of the graph, back to back
        gap = min(j - i - 1 for i in range(len(order)) for j in range(i + 1, len(order))
                  if order[j] == order[i] and order[i] not in order[i + 1:j])
        kept = (1 - sparsity) * K * N * 2
        assert gap * kept > 50 * 2 ** 20, (name, sparsity, c, gap)
