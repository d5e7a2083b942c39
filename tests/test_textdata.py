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
    assert textdata.heldout_text() == SEP.join(topics[k] for k in held)
    # the calibration part: its topics' paragraphs, a few left out (those quoted in the held-out part)
    whole = SEP.join(topics[k] for k in cal)
    got = textdata.calibration_text()
    assert all(p in whole for p in got.split(SEP))
    assert 0.95 * len(whole) < len(got) < len(whole)


def test_split_deterministic_disjoint_complete():
    cal, held = split_keys()
    assert textdata.calibration_text() == textdata.calibration_text()
    assert textdata.heldout_text() == textdata.heldout_text()
    assert not set(cal) & set(held) and set(cal) | set(held) == set(topics)
    assert len(held) == len(topics) // 5


def test_no_held_out_text_in_the_calibration_part():
    """Topics quote one another ("compound" holds all of "class"): no paragraph or line of the held-out part that
    says anything (40 characters or more) stands in the calibration part; before the fix, about 40% did."""
    cal_text, held_text = textdata.calibration_text(), textdata.heldout_text()
    paras = [p.strip() for p in held_text.split(SEP) if len(p.strip()) >= 40]
    assert len(paras) > 100 and not [p for p in paras if p in cal_text]
    lines = [l.strip() for l in held_text.splitlines() if len(l.strip()) >= 70]
    assert len(lines) > 100 and not [l for l in lines if l in cal_text]
    quoted = [p.strip() for k in split_keys()[0] for p in topics[k].split(SEP) if len(p.strip()) >= 40]
    assert sum(p in held_text for p in quoted) > 30  # what the rule takes out is there to take out
    # the rule itself, on every paragraph, short ones too: none that stands in the held-out part (stripped: an
    # indented "    Note:" is the held-out part's "Note:" as well)
    assert not [p for p in cal_text.split(SEP) if p.strip() in held_text]


def test_sizes_plausible():
    cal, held = textdata.calibration_text(), textdata.heldout_text()
    assert len(cal) > 300_000 and len(held) > 20_000  # ~420K and ~31K with Python 3.11's topics
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


# ---- --dataset files (calibrate.py --dataset: one file of a Hugging Face dataset repo) ------------------------
ROWS = ["first row", "", "  second row  ", "third"]


def write_dataset(path: Path, rows=ROWS, column="text"):
    import json
    if path.suffix == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        pq.write_table(pa.table({column: rows, "id": list(range(len(rows)))}), path)
    elif path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps({column: r, "id": i}) for i, r in enumerate(rows)) + "\n")
    elif path.suffix == ".json":
        path.write_text(json.dumps([{column: r} for r in rows]))
    else:
        path.write_text("\n".join(rows))
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".json"])
def test_dataset_files(tmp_path, suffix):
    f = write_dataset(tmp_path / f"d{suffix}")
    assert textdata.text_from_file(f) == "first row\n\nsecond row\n\nthird"  # blank rows dropped, rows stripped
    assert textdata.text_from_file(f, max_chars=12) == "first row\n\nsecond row"  # stops once max_chars is reached
    g = write_dataset(tmp_path / f"e{suffix}", column="content")
    assert textdata.text_from_file(g, column="content").startswith("first row")
    with pytest.raises(ValueError, match="'text'") as e:
        textdata.text_from_file(g)  # no such column
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_dataset_file_with_a_bom(tmp_path, suffix):
    """A file that a Windows tool saved with a leading byte-order mark reads as without it, whatever its type."""
    plain = write_dataset(tmp_path / f"d{suffix}")
    bom = tmp_path / f"bom{suffix}"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert textdata.text_from_file(bom) == textdata.text_from_file(plain)


def test_dataset_max_chars_counts_the_stripped_rows(tmp_path):
    """Rows are taken whole until the stripped text taken reaches max_chars: at exactly max_chars it stops, and a
    row's surrounding whitespace (dropped from the text) does not count."""
    f = write_dataset(tmp_path / "d.jsonl", rows=["  ab  ", "cdef", "gh"])
    assert textdata.text_from_file(f, max_chars=2) == "ab"
    assert textdata.text_from_file(f, max_chars=3) == "ab\n\ncdef"
    assert textdata.text_from_file(f, max_chars=6) == "ab\n\ncdef"
    assert textdata.text_from_file(f, max_chars=7) == "ab\n\ncdef\n\ngh"


def test_dataset_txt(tmp_path):
    assert textdata.text_from_file(write_dataset(tmp_path / "d.txt")) == "first row\n\n  second row  \nthird"
    assert textdata.text_from_file(write_dataset(tmp_path / "e.txt"), max_chars=5) == "first"


@pytest.mark.parametrize("name, content, message", [("d.csv", "a,b", "unsupported dataset file type"),
                                                    ("d.jsonl", "{not json", "not a .jsonl file"),
                                                    ("d.json", '[{"text": 3}]', "no text"),
                                                    # records that are not objects: no field to read
                                                    ("d.json", '["a", "b"]', "records have no 'text' field"),
                                                    ("d.json", '{"text": "a"}', "records have no 'text' field"),
                                                    ("d.jsonl", '3\n', "records have no 'text' field"),
                                                    ("d.parquet", "not parquet", "cannot read column")])
def test_dataset_file_errors(tmp_path, name, content, message):
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        textdata.text_from_file(f)
    assert "\n" not in str(e.value)


def test_load_hub_text(tmp_path, monkeypatch):
    """The download goes through huggingface_hub (stood in for here: no network), the file is then read."""
    import huggingface_hub
    calls = []

    def download(repo_id, filename, repo_type=None):
        calls.append((repo_id, filename, repo_type))
        return str(write_dataset(tmp_path / Path(filename).name))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    text = textdata.load_hub_text("org/data", "sub/train.jsonl")
    assert text.startswith("first row") and calls == [("org/data", "sub/train.jsonl", "dataset")]

    def offline(*args, **kwargs):
        raise OSError("offline mode is enabled\nmore detail")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ValueError, match="cannot download sub/train.jsonl from dataset org/data: OSError: offline") as e:
        textdata.load_hub_text("org/data", "sub/train.jsonl")
    assert "\n" not in str(e.value)
    calls.clear()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(ValueError, match="unsupported dataset file type '.csv'"):  # refused before the download
        textdata.load_hub_text("org/data", "sub/train.csv")
    assert calls == []


def test_encode_head_is_the_head_of_the_whole_encoding():
    """encode_head(text, n) == encode(text)[:n], for a merging tokenizer (a byte-level BPE trained here on the
    calibration text) and at every n, yet it encodes only a head of a long text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = textdata.calibration_text()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=2000, show_progress=False))
    seen = []

    class Tok:
        def encode(self, t):
            seen.append(len(t))
            return bpe.encode(t).ids
    whole = Tok().encode(text)
    for n in (1, 100, 5000, len(whole) - 10, len(whole), len(whole) + 1000, None):
        seen.clear()
        assert textdata.encode_head(Tok(), text, n) == whole[:n], n
        if n is not None and n <= 5000:
            assert max(seen) < len(text) // 5, (n, seen)  # a head, not the whole text


def test_encode_head_of_a_text_of_long_tokens():
    """More than 8 characters per token (long words, runs of whitespace): the head is grown until the n tokens end
    before its cut, so the last of them is not a word cut in two. A word-level tokenizer: a cut word is another id."""
    text = " ".join(f"{'x' * (20 + i % 13)}{i}" for i in range(3000))

    class Tok:
        vocab = {}

        def encode(self, t):
            return [self.vocab.setdefault(w, len(self.vocab)) for w in t.split()]
    whole = Tok().encode(text)
    for n in range(1, 400):
        assert textdata.encode_head(Tok(), text, n) == whole[:n], n


def test_docstring_text():
    """--corpus stdlib-docstrings: each listed module's own docstring and those of its public classes and functions
    (over 200 characters), each once (modules re-export one another's)."""
    import importlib
    import inspect
    text = textdata.docstring_text()
    n_modules, n_docs = 0, 0
    for name in textdata.DOCSTRING_MODULES:
        mod = importlib.import_module(name)
        doc = inspect.getdoc(mod)
        if doc and len(doc) > 200:
            n_modules += 1
            assert text.count(doc) == 1, name
        for obj in vars(mod).values():
            doc = inspect.getdoc(obj) if inspect.isclass(obj) or inspect.isfunction(obj) else None
            public = getattr(obj, "__name__", "_")[0] != "_" and obj is getattr(mod, obj.__name__, None)
            if doc and len(doc) > 200 and public:
                n_docs += 1
                assert text.count(doc) == 1, (name, obj.__name__)
    assert n_modules >= 5 and n_docs > 50
    assert all(len(p) > 0 for p in text.split(SEP)) and textdata.docstring_text() == text
