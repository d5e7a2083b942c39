"""Argument types shared by the command lines (generate.py, calibrate.py, scripts/).

Each turns a bad value into a one-line usage error (exit status 2; ArgumentParser) while the arguments are parsed, so
nothing is loaded, computed or half-written before the user hears about it. --seq_len, bounded by the model's
context, is settled from the checkpoint's config.json before the weights load (seq_len).
"""
import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import torch


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each flag's default after its help."""

    def _get_help_string(self, action):
        h = action.help or ""
        # by identity: a default of 0 or 0.0 is shown (it equals False, so `not in` would hide it)
        if action.option_strings and all(action.default is not v for v in (None, False, argparse.SUPPRESS)) \
                and "(default" not in h:  # a help that states its default itself
            h += " (default: %(default)s)"
        return h


class ArgumentParser(argparse.ArgumentParser):
    """The command lines' parser: HelpFormatter, and a bad flag or value reported in one line, without argparse's
    usage block before it (--help shows that), exit status 2."""

    def __init__(self, description=None, **kwargs):
        super().__init__(description=description, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def run(main) -> None:
    """Run a command line's main(). A bad file or value (the loaders' errors are ValueErrors: CheckpointError,
    TokenizerError, ...), a file that cannot be read or written (OSError), non-finite activations or memory running
    out end it with a one-line error and exit status 1; Ctrl-C ends it with status 130; a reader of its output that
    goes away (`generate.py ... | head`) ends it quietly with 141, as SIGPIPE ends a shell tool."""
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: the shell's status for it, without a traceback
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # stdout to nowhere: Python's own flush of it at exit would fail and complain again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:
        # a batch, context or model too large for the device; any other RuntimeError is a bug: its traceback stays
        msg = " ".join(str(e).split())
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in msg:
            raise
        # the allocation asked for: CUDA's message starts with it, the CPU allocator's comes after its source line
        cpu = msg.find("can't allocate memory")
        why = msg[cpu:].split(". ")[0] if cpu >= 0 else ". ".join(msg.split(". ")[:2])
        print(f"error: out of memory{': ' + why if why else ''} (a smaller batch, context or model may fit)",
              file=sys.stderr)
        sys.exit(1)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device(s: str) -> str:
    """--device: cpu, or cuda / cuda:N where that GPU exists."""
    try:
        d = torch.device(s)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {s!r} (cpu or cuda)") from None
    if d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {s!r} is not supported (cpu or cuda)")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{s} asked for, but no CUDA GPU is available (use --device cpu)")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{s}: there are {torch.cuda.device_count()} CUDA GPUs")
    return s


def use_device(name: str) -> torch.device:
    """--device as a torch.device, made the current CUDA device: Triton launches an eager kernel on the current
    device, and torch.cuda's memory and synchronize calls default to it, whatever device the tensors are on."""
    d = torch.device(name)
    if d.type == "cuda" and d.index is not None:
        torch.cuda.set_device(d)
    return d


def default_dtype(device_name: str) -> str:
    """bf16 on a GPU; fp32 on a CPU, where bf16 matrix products run many times slower."""
    return "bf16" if torch.device(device_name).type == "cuda" else "fp32"


DTYPE_HELP = "weight and activation dtype (default: bf16 on a GPU, fp32 on a CPU, where bf16 is many times slower)"


SEQ_LEN = 512  # default --seq_len of calibrate.py and eval_ppl.py, where the model's context is as long
SEQ_LEN_DEFAULT = f"(default: {SEQ_LEN}, or the model's context where shorter)"


def seq_len(requested, config) -> int:
    """--seq_len for a model of this ModelArgs (config.json's): SEQ_LEN cut to its context when not given (None); as
    given when the context holds it."""
    if requested is None:
        return min(SEQ_LEN, config.block_size)
    if requested > config.block_size:
        raise ValueError(f"--seq_len {requested} exceeds {config.context()}")
    return requested


def _number(s: str) -> float:
    try:
        if "_" in s:  # float() reads 0_4 as 4.0: a typo for 0.4, not a number written with a separator
            raise ValueError
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None


def sparsity(s: str) -> float:
    """One sparsity level in [0, 1)."""
    v = _number(s)
    if not 0 <= v < 1:  # also NaN
        raise argparse.ArgumentTypeError(f"{s} is not in [0, 1)")
    return v


def sparsities(s: str) -> list:
    """Comma-separated sparsity levels, each in [0, 1), none twice (a typo that would run a level twice)."""
    levels = [sparsity(x) for x in s.split(",")]
    if len(set(levels)) < len(levels):
        raise argparse.ArgumentTypeError(f"{s}: a level is repeated")
    return levels


def non_negative_float(s: str) -> float:
    v = _number(s)
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{s} must be a finite number >= 0")
    return v


def at_least(n: int):
    """An integer type that must be >= n."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < n:
            raise argparse.ArgumentTypeError(f"{s} is below {n}")
        return v
    return parse


def seed(s: str) -> int:
    """--seed: an integer torch.manual_seed takes (0 to 2**64 - 1)."""
    v = at_least(0)(s)
    if v >= 2 ** 64:
        raise argparse.ArgumentTypeError(f"{s} is above 2**64 - 1")
    return v


def positive_ints(s: str) -> list:
    """Comma-separated integers >= 1."""
    return [at_least(1)(x) for x in s.split(",")]


def writable(p: Path, folder: bool = False) -> None:
    """Refuse, with a ValueError, a file (or with `folder`, a folder to fill, made where missing) that the command
    could not write, before any work is done: an existing file by its permission (/dev/stdout too), a new one by a
    file made in its folder and removed (a read-only mount, /proc ...)."""
    try:
        if folder:
            if p.exists() and not p.is_dir():
                raise ValueError(f"{p} exists and is not a folder")
            where = next(a for a in [p, *p.absolute().parents] if a.exists())
            if not where.is_dir():
                raise ValueError(f"{where} is not a folder: {p} cannot be made")
        else:
            if p.is_dir():
                raise ValueError(f"{p} is a folder; give a file name")
            if p.exists():
                if not os.access(p, os.W_OK):
                    raise ValueError(f"{p} is not writable")
                return
            if not p.parent.is_dir():
                raise ValueError(f"{p.parent} is not a folder" if p.parent.exists() else
                                 f"folder {p.parent} does not exist")
            where = p.parent
    except OSError as e:  # a folder on the way that cannot be read
        raise ValueError(f"cannot reach {p}: {e.strerror or e}") from None
    try:
        tempfile.TemporaryFile(dir=where).close()
    except OSError as e:
        raise ValueError(f"folder {where} does not take new files ({e.strerror or e})") from None


def out_file(s: str) -> Path:
    """--out, --json, --profile: a file the command can write (cli.writable)."""
    p = Path(s)
    try:
        writable(p)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return p


def plot_file(s: str) -> Path:
    """--plot: an out_file in a format matplotlib writes (.png, .pdf, .svg, ...), known before the work is done;
    not .pgf, whose writer runs LaTeX (xelatex), which few machines have."""
    p = out_file(s)
    from matplotlib.figure import Figure
    formats = set(Figure().canvas.get_supported_filetypes()) - {"pgf"}
    if p.suffix.lstrip(".").lower() not in formats:
        raise argparse.ArgumentTypeError(f"{p}: matplotlib writes {', '.join('.' + f for f in sorted(formats))}, "
                                         f"not {p.suffix or 'a file without an extension'}")
    return p


def out_folder(s: str) -> Path:
    """The converters' --out: a folder the command can fill, made where missing (cli.writable)."""
    p = Path(s)
    try:
        writable(p, folder=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return p
