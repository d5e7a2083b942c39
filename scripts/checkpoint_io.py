"""Writing the runtime's checkpoint folder: model.pth + config.json + tokenizer files + tealfast.json."""
import json
import os
import shutil
from pathlib import Path

import torch

from tokenizer import SCHEMA_VERSION, TOKENIZER_CLASSES  # tealfast.json as the runtime reads it


def permute_qk(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """HF stores q/k rows for rotate-half RoPE; model.py rotates interleaved pairs. Reorder rows to match.

    Within each head, HF row j (first half) pairs with j + head_dim/2; interleaved order puts them side by side.
    Works for weights (rows, in) and biases (rows,).
    """
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def save_checkpoint(out_dir, state_dict: dict, config: dict, tokenizer_kind: str, tokenizer_files: dict,
                    source: str) -> Path:
    """tokenizer_files maps a file name in out_dir to a pathlib.Path (copied) or to bytes/str (written)."""
    if tokenizer_kind not in TOKENIZER_CLASSES:
        raise ValueError(f"unknown tokenizer kind {tokenizer_kind!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # model.pth takes its name last: prepare.sh takes a folder that has one as done, so a conversion cut short (a
    # full disk, Ctrl-C) must not leave one behind
    partial = out / "model.pth.partial"
    try:
        torch.save({k: v.contiguous() for k, v in state_dict.items()}, partial)
        (out / "config.json").write_text(json.dumps(config, indent=2))
        for name, src in tokenizer_files.items():
            if isinstance(src, Path):
                shutil.copyfile(src, out / name)
            else:
                (out / name).write_bytes(src.encode() if isinstance(src, str) else src)
        meta = {"schema_version": SCHEMA_VERSION, "tokenizer": tokenizer_kind, "source": source}
        (out / "tealfast.json").write_text(json.dumps(meta, indent=2))
        os.replace(partial, out / "model.pth")
    except BaseException:
        partial.unlink(missing_ok=True)  # a few GB that nothing would ever read
        raise
    return out / "model.pth"
