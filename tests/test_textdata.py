"""textdata.py: a fixed, disjoint calibration / held-out split of pydoc_data's topics, and read_text_file's errors."""
import sys
from pathlib import Path

import pytest
from pydoc_data.topics import topics

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import textdata  # noqa: E402

SEP = "\n\n"


def split_keys():
    keys = sorted(topics)
    return [k for i, k in enumerate(keys) if i % 5 != 4], [k for i, k in enumerate(keys) if i % 5 == 4]


def test_split_follows_the_rule():
    cal, held = split_keys()
    assert textdata.calibration_text() == SEP.join(topics[k] for k in cal)
    assert textdata.heldout_text() == SEP.join(topics[k] for k in held)


def test_split_deterministic_disjoint_complete():
    cal, held = split_keys()
    assert textdata.calibration_text() == textdata.calibration_text()
    assert textdata.heldout_text() == textdata.heldout_text()
    assert not set(cal) & set(held) and set(cal) | set(held) == set(topics)
    assert len(held) == len(topics) // 5
    # each held-out topic's text is absent from the calibration part (long topics: short ones may recur)
    cal_text = textdata.calibration_text()
    assert not any(topics[k] in cal_text for k in held if len(topics[k]) > 500)


def test_sizes_plausible():
    cal, held = textdata.calibration_text(), textdata.heldout_text()
    assert len(cal) > 300_000 and len(held) > 20_000  # ~434K and ~31K with Python 3.11's topics
    assert len(cal) + len(held) - len(SEP) * (len(topics) - 2) == sum(len(t) for t in topics.values())
    assert "def" in held and "the" in held.split()


def test_read_text_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("héllo\nworld\n", encoding="utf-8")
    assert textdata.read_text_file(f) == "héllo\nworld\n"
    f.write_bytes(b"\xef\xbb\xbfbom")
    assert textdata.read_text_file(str(f)) == "bom"


@pytest.mark.parametrize("case, message", [("missing", "not found"), ("dir", "is a folder"), ("empty", "empty"),
                                           ("blank", "empty"), ("latin1", "not valid UTF-8")])
def test_read_text_file_errors(tmp_path, case, message):
    f = tmp_path / "t.txt"
    if case == "dir":
        f.mkdir()
    elif case == "empty":
        f.write_bytes(b"")
    elif case == "blank":
        f.write_bytes(b" \n\t\n")
    elif case == "latin1":
        f.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=message) as e:
        textdata.read_text_file(f)
    assert "\n" not in str(e.value)
