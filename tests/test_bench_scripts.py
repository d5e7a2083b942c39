"""The benchmark scripts' command lines: a bad value is a one-line usage error (the timings need a GPU)."""
import pytest

import bench_attention
import bench_decode
import bench_kernels


@pytest.mark.parametrize("main,argv", [
    (bench_decode.main, ["--sparsity", "abc", "--device", "cpu"]),
    (bench_decode.main, ["--sparsity", "0.5,1", "--device", "cpu"]),
    (bench_decode.main, ["--tokens", "0", "--device", "cpu"]),
    (bench_decode.main, ["--prompt_len", "-1", "--device", "cpu"]),
    (bench_decode.main, ["--batch_size", "9", "--device", "cpu"]),
    (bench_decode.main, ["--device", "bogus"]),
    (bench_kernels.main, ["--batch", "abc"]),
    (bench_kernels.main, ["--batch", "16"]),
    (bench_kernels.main, ["--sparsity", "x"]),
    (bench_attention.main, ["--context", "0"]),
    (bench_attention.main, ["--batch", "1,99"]),
])
def test_bad_values_are_usage_errors(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len([l for l in err.splitlines() if "error:" in l]) == 1, err
