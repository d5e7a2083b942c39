"""Real English text for calibration and evaluation: the topic help texts in Python's stdlib (pydoc_data).

The split is fixed: topics sorted by key, every fifth one (sorted index i with i % 5 == 4) is held out. Topics
quote one another word for word ("compound" holds all of "class", "comparisons" all of "in"), so the calibration
part leaves out each of its paragraphs that stands anywhere in the held-out part: without that, about 40% of
the held-out text stood in the calibration part too.
"""
from pathlib import Path
from typing import Optional

from pydoc_data.topics import topics as _TOPICS

_KEYS = sorted(_TOPICS)


def _topics(heldout: bool) -> list:
    return [_TOPICS[k] for i, k in enumerate(_KEYS) if (i % 5 == 4) == heldout]


def calibration_text() -> str:
    held = heldout_text()
    return "\n\n".join("\n\n".join(p for p in t.split("\n\n") if p.strip() not in held) for t in _topics(False))


def heldout_text() -> str:
    return "\n\n".join(_topics(True))


def read_text_file(path) -> str:
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"text file {p} is a folder")
    if not p.is_file():
        raise ValueError(f"text file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8-sig")  # -sig: a leading BOM is not text
    except UnicodeDecodeError as e:
        raise ValueError(f"text file is not valid UTF-8 (byte {e.start}): {p}") from None
    if not text.strip():
        raise ValueError(f"text file is empty: {p}")
    return text


def load_hub_text(repo_id: str, filename: str, column: str = "text", max_chars: int = 10_000_000) -> str:
    """Text of one file of a Hugging Face dataset repo (downloaded with huggingface_hub; needs network).

    .parquet, .jsonl / .json (records holding `column`) or .txt; rows joined by blank lines.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import logging as hub_logging

    check_file_type(filename)  # before a download of what could not be read

    hub_logging.set_verbosity_error()  # its retry warnings would come before our one-line error
    try:
        local = Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except Exception as e:  # the hub raises many kinds: offline, 404, auth
        raise ValueError(f"cannot download {filename} from dataset {repo_id}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return text_from_file(local, column, max_chars)


FILE_TYPES = (".parquet", ".jsonl", ".json", ".txt")


def check_file_type(name) -> None:
    suffix = Path(name).suffix.lower()
    if suffix not in FILE_TYPES:
        raise ValueError(f"unsupported dataset file type {suffix!r} ({', '.join(FILE_TYPES)})")


def text_from_file(path: Path, column: str = "text", max_chars: int = 10_000_000) -> str:
    """Rows of a .parquet / .jsonl / .json / .txt dataset file joined by blank lines, up to max_chars."""
    import json

    check_file_type(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("reading .parquet datasets needs pyarrow (pip install pyarrow)") from None
        try:
            rows = pq.read_table(path, columns=[column]).column(column).to_pylist()
        except Exception as e:  # pyarrow's errors for a missing column or a corrupt file, with long messages
            raise ValueError(f"{path.name}: cannot read column {column!r}: {(str(e).splitlines() or [''])[0]}") from None
    elif suffix in (".jsonl", ".json"):
        try:
            raw = path.read_text(encoding="utf-8-sig")  # a leading BOM (Windows tools) is not JSON
            records = json.loads(raw) if suffix == ".json" else []
            for i, line in enumerate(raw.splitlines() if suffix == ".jsonl" else []):
                try:
                    records += [json.loads(line)] if line.strip() else []
                except ValueError as e:
                    raise ValueError(f"line {i + 1}: {e}") from None
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested past the parser
            raise ValueError(f"{path.name}: not a {suffix} file: {e}") from None
        try:
            rows = [r[column] for r in records]
        except (KeyError, TypeError):
            raise ValueError(f"{path.name}: records have no {column!r} field") from None
    else:
        rows = [read_text_file(path)[:max_chars]]  # one row: cut, where records are taken whole
    out, n = [], 0
    for r in rows:
        if isinstance(r, str) and r.strip():
            out.append(r.strip())
            n += len(out[-1])
            if n >= max_chars:
                break
    if not out:
        raise ValueError(f"{path.name}: no text in column {column!r}")
    return "\n\n".join(out)


def encode_head(tokenizer, text: str, n: Optional[int]) -> list:
    """tokenizer.encode(text)[:n] (all where n is None) without encoding all of a long text: a head of it, grown
    until it holds 64 tokens more than n, so that the cut, which can split a word, is not among the n."""
    if n is None:
        return tokenizer.encode(text)
    chars = 8 * (n + 64)
    while True:
        ids = tokenizer.encode(text[:chars])
        if chars >= len(text) or len(ids) >= n + 64:
            return ids[:n]
        chars *= 2


DOCSTRING_MODULES = ("argparse", "collections", "email.message", "json", "logging", "pathlib", "subprocess",
                     "threading", "unittest", "urllib.request", "zipfile", "asyncio.events", "http.client")


def docstring_text() -> str:
    """A second English text the calibration never sees: docstrings of a fixed list of stdlib modules
    (technical prose unlike pydoc's language reference). Depends on the Python version; record it."""
    import importlib
    import inspect
    parts = []
    for name in DOCSTRING_MODULES:
        mod = importlib.import_module(name)
        for obj in [mod] + [getattr(mod, a) for a in sorted(vars(mod)) if not a.startswith("_")]:
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj) or obj is mod) else None
            if doc and len(doc) > 200 and doc not in parts:
                parts.append(doc)
    return "\n\n".join(parts)
