"""cli.py: the argument types turn bad values into a one-line usage error (exit status 2); --seq_len against the
model's context."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
from conftest import ROOT
from model import ModelArgs


def parse(type_fn, value, default=None):
    p = cli.ArgumentParser(prog="x")
    p.add_argument("--v", type=type_fn, default=default)
    return p.parse_args(["--v", value]).v


def usage_error(type_fn, value, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        parse(type_fn, value)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("x: error: "), err  # no usage block
    return err


def test_device(capsys):
    assert parse(cli.device, "cpu") == "cpu"
    for bad in ("bogus", "mps", "cuda:x"):
        assert "--v" in usage_error(cli.device, bad, capsys)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in usage_error(cli.device, "cuda", capsys)
    else:
        assert parse(cli.device, "cuda:0") == "cuda:0"
        assert "CUDA GPUs" in usage_error(cli.device, f"cuda:{torch.cuda.device_count()}", capsys)


def test_device_index_past_the_gpus_is_refused(monkeypatch, capsys):
    """On a machine with one GPU (stood in for here), cuda:0 is taken and cuda:1 refused while the flags are parsed,
    not when the model is moved there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert parse(cli.device, "cuda") == "cuda" and parse(cli.device, "cuda:0") == "cuda:0"
    assert "there are 1 CUDA GPUs" in usage_error(cli.device, "cuda:1", capsys)


def test_use_device_makes_a_numbered_gpu_current(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    assert cli.use_device("cpu") == torch.device("cpu") and cli.use_device("cuda") == torch.device("cuda")
    assert calls == []  # "cuda" is the current device already
    assert cli.use_device("cuda:1") == torch.device("cuda:1") and calls == [torch.device("cuda:1")]


def test_default_dtype():
    assert cli.default_dtype("cpu") == "fp32"
    assert cli.default_dtype("cuda:1") == "bf16"


def test_sparsities(capsys):
    assert parse(cli.sparsities, "0,0.25,0.999") == [0.0, 0.25, 0.999]
    assert parse(cli.sparsity, "0.5") == 0.5
    for bad in ("abc", "0,1", "1.0", "-0.1", "nan", "inf", "0.2,"):
        usage_error(cli.sparsities, bad, capsys)
    assert "a level is repeated" in usage_error(cli.sparsities, "0.5,0.50", capsys)
    assert "'0_4' is not a number" in usage_error(cli.sparsity, "0_4", capsys)  # float() would read 4.0
    usage_error(cli.sparsity, "0.0_4", capsys)


def test_integers(capsys):
    assert parse(cli.positive_ints, "1,2,8") == [1, 2, 8]
    assert parse(cli.at_least(2), "2") == 2
    for fn, bad in ((cli.positive_ints, "abc"), (cli.positive_ints, "1,0"), (cli.at_least(2), "1"),
                    (cli.at_least(1), "1.5"), (cli.non_negative_float, "-1"), (cli.non_negative_float, "nan"),
                    (cli.non_negative_float, "inf")):
        usage_error(fn, bad, capsys)
    assert parse(cli.non_negative_float, "0") == 0.0  # generate.py --temperature 0: greedy decoding


def test_output_paths(tmp_path, capsys):
    assert parse(cli.out_file, str(tmp_path / "r.json")) == tmp_path / "r.json"
    assert "is a folder" in usage_error(cli.out_file, str(tmp_path), capsys)
    assert "does not exist" in usage_error(cli.out_file, str(tmp_path / "no" / "r.json"), capsys)
    # a folder that takes no new files: refused before the work, not after it
    assert "folder /proc does not take new files" in usage_error(cli.out_file, "/proc/r.json", capsys)
    assert parse(cli.out_file, "/dev/null") == Path("/dev/null")  # a file that exists: its own permission
    (tmp_path / "f").write_text("x")
    assert "f is not a folder" in usage_error(cli.out_file, str(tmp_path / "f" / "r.json"), capsys)
    (tmp_path / "f").unlink()
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind
    # --plot: a format matplotlib writes, known before the work is done
    assert parse(cli.plot_file, str(tmp_path / "p.svg")) == tmp_path / "p.svg"
    assert "matplotlib writes" in usage_error(cli.plot_file, str(tmp_path / "p.txt"), capsys)
    assert "without an extension" in usage_error(cli.plot_file, str(tmp_path / "p"), capsys)
    assert "does not exist" in usage_error(cli.plot_file, str(tmp_path / "no" / "p.png"), capsys)
    assert "not .pgf" in usage_error(cli.plot_file, str(tmp_path / "p.pgf"), capsys)  # its writer runs LaTeX
    (tmp_path / "f").write_text("x")
    assert parse(cli.out_folder, str(tmp_path / "new")) == tmp_path / "new"
    assert "not a folder" in usage_error(cli.out_folder, str(tmp_path / "f"), capsys)
    assert parse(cli.out_folder, str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"  # to be made, with its parents
    assert "f is not a folder" in usage_error(cli.out_folder, str(tmp_path / "f" / "sub"), capsys)
    # the converters' --out: refused before a conversion, not after it
    assert "folder /proc does not take new files" in usage_error(cli.out_folder, "/proc/ckpt", capsys)


def test_read_only_file_is_refused(tmp_path, capsys):
    """An existing file the user may not write (a result of another user's run) is refused before the work."""
    f = tmp_path / "r.json"
    f.write_text("x")
    f.chmod(0o444)
    if os.access(f, os.W_OK):
        pytest.skip("this user may write any file (root)")
    assert "is not writable" in usage_error(cli.out_file, str(f), capsys)


def test_help_shows_defaults():
    p = cli.ArgumentParser()
    p.add_argument("--n", type=int, default=7, help="a count")
    p.add_argument("--name", default=None, help="a name")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--level", type=float, default=0.0, help="a level")  # 0.0 == False, still a default to show
    p.add_argument("--k", type=int, default=0, help="a k")
    p.add_argument("--file", default="a.json", help="which default file")  # "default" in the text, not stated
    p.add_argument("--mode", default="x", help="a mode (default: x, or y on a GPU)")  # stated by the help itself
    text = " ".join(p.format_help().split())
    assert "which default file (default: a.json)" in text and "GPU) (default" not in text
    assert "a count (default: 7)" in text and "(default: None)" not in text and "(default: False)" not in text
    assert "a level (default: 0.0)" in text and "a k (default: 0)" in text


def test_run_ends_quietly_on_ctrl_c(capsys):
    def main():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    assert e.value.code == 130 and capsys.readouterr().err == "\ninterrupted\n"


def test_run_ends_quietly_when_the_reader_goes_away():
    """`generate.py ... | head`: status 141, as SIGPIPE ends a shell tool, and nothing on stderr."""
    code = "import cli\ndef main():\n    while True:\n        print('x' * 1000, flush=True)\ncli.run(main)"
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()
    assert p.wait(timeout=60) == 141 and p.stderr.read() == b""


@pytest.mark.parametrize("exc", [ValueError("bad\nvalue"), OSError(13, "Permission denied", "/x/out.json"),
                                 FloatingPointError("nan"), MemoryError()])
def test_run_ends_with_one_line(exc, capsys):
    def main():
        raise exc
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_seq_len():
    """--seq_len of calibrate.py and eval_ppl.py: 512, or the whole context where shorter; never past the context."""
    long, short = (ModelArgs(1, 64, 1, 4, 4, 16, 128, block_size=n) for n in (8192, 64))
    assert cli.seq_len(None, long) == 512 and cli.seq_len(None, short) == 64
    assert cli.seq_len(2048, long) == 2048 and cli.seq_len(64, short) == 64
    with pytest.raises(ValueError, match=r"--seq_len 65 exceeds the model's context of 64 tokens"):
        cli.seq_len(65, short)


def test_seed(capsys):
    for ok in ("0", "1234", str(2 ** 64 - 1)):
        v = parse(cli.seed, ok)
        torch.manual_seed(v)  # every accepted seed is one torch takes
    for bad in ("-1", str(2 ** 64), "1e3", "x"):
        assert "--v" in usage_error(cli.seed, bad, capsys)


CUDA_OOM = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 3.44 "
            "GiB is free. Including non-PyTorch memory, this process has 75.74 GiB memory in use. Of the allocated "
            "memory 74.90 GiB is allocated by PyTorch, and 284.69 MiB is reserved by PyTorch but unallocated. If "
            "reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to "
            "avoid fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/"
            "cuda.html#environment-variables)")
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 1792000000000 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("exc,want", [
    (torch.OutOfMemoryError(CUDA_OOM), "error: out of memory: CUDA out of memory. Tried to allocate 20.00 GiB "),
    (RuntimeError(CPU_OOM), "error: out of memory: can't allocate memory: you tried to allocate 1792000000000 bytes "),
    (MemoryError(), "error: out of memory (")])
def test_run_names_the_allocation_that_failed(exc, want, capsys):
    def main():
        raise exc
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(want) and len(err.strip().splitlines()) == 1, err


def test_run_keeps_the_traceback_of_other_runtime_errors():
    def main():
        raise RuntimeError("shape mismatch")  # a bug, not the user's input
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.run(main)
