"""Real English text for calibration and evaluation: the topic help texts in Python's stdlib (pydoc_data).

The split is fixed: topics sorted by key, every fifth one (sorted index i with i % 5 == 4) is held out.
"""
from pathlib import Path

from pydoc_data.topics import topics as _TOPICS

_KEYS = sorted(_TOPICS)


def _join(heldout: bool) -> str:
    return "\n\n".join(_TOPICS[k] for i, k in enumerate(_KEYS) if (i % 5 == 4) == heldout)


def calibration_text() -> str:
    return _join(heldout=False)


def heldout_text() -> str:
    return _join(heldout=True)


def read_text_file(path) -> str:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"text file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8-sig")  # -sig: a leading BOM is not text
    except UnicodeDecodeError as e:
        raise ValueError(f"text file is not valid UTF-8 (byte {e.start}): {p}") from None
    if not text.strip():
        raise ValueError(f"text file is empty: {p}")
    return text
