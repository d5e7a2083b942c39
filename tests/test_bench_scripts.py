"""The benchmark scripts' command lines: a bad value is a one-line usage error; bench_decode also runs end to end on
a CPU as a smoke test (the timings need a GPU)."""
import pytest
import torch

import bench_attention
import bench_decode
import bench_kernels


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
def test_bad_values_are_usage_errors(main, argv, capsys):
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
    """The whole script on a CPU (eager, the reference ops): dense row, calibration on the fly, sparse rows, JSON."""
    import json
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter would take minutes; the kernels have their tests
    out = tmp_path / "decode.json"
    bench_decode.main(["--preset", "smollm2-135m", "--device", "cpu", "--tokens", "3", "--prompt_len", "4",
                       "--calib_tokens", "32", "--sparsity", "0,0.5", "--variants", "uniform,per_projection,weighted",
                       "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["sparsity"]) for r in rows] == [("dense (F.linear)", 0.0)] + [
        (v, s) for v in ("uniform", "per_projection", "weighted") for s in (0.0, 0.5)]
    assert rows[0]["achieved"] == 0 and rows[0]["speedup"] == rows[0]["speedup_vs_best_dense"] == 1
    # level 0 drops exact zeros only; 8 decode steps (5 warm-up, 3 timed) of random tokens against a 32-token
    # calibration come near 0.5
    assert all(r["achieved"] < 0.01 for r in rows[1::2]) and all(0.3 < r["achieved"] < 0.7 for r in rows[2::2])
    assert all(r["tokens_per_s"] > 0 for r in rows)


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
