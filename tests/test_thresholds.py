"""thresholds.py: the JSON written by calibrate.py and read by generate.py / eval_ppl.py.

Round trip, interpolation against the stored grid, and every way a file can fail to fit the model: each a
CheckpointError with a one-line message."""
import json
import math
from pathlib import Path

import pytest
import torch

import thresholds
from model import PROJECTIONS, CheckpointError, ModelArgs, projection_sizes

ARGS = ModelArgs(vocab_size=256, dim=64, n_layer=2, n_head=4, n_local_heads=2, head_dim=16,
                 intermediate_size=128, block_size=128)
LEVELS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999]


def random_table(n_layer=ARGS.n_layer, levels=LEVELS, seed=0) -> torch.Tensor:
    """(n_layer, 7, len(levels)) strictly increasing along the levels, 0 at level 0 (as calibrate.py writes)."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.rand(n_layer, len(PROJECTIONS), len(levels), generator=g, dtype=torch.float64) + 0.01
    steps[..., 0] = 0
    return steps.cumsum(-1)


@pytest.fixture
def saved(tmp_path):
    table = random_table()
    path = tmp_path / "thresholds.json"
    thresholds.save(path, ARGS, LEVELS, table, "unit test", 1234, "magnitude")
    return path, table


def load_error(path, config=ARGS) -> str:
    with pytest.raises(CheckpointError) as e:
        thresholds.load(path, config)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def rewrite(path, **changes):
    data = json.loads(path.read_text())
    for k, v in changes.items():
        data[k] = v
    path.write_text(json.dumps(data))
    return data


def test_round_trip(saved):
    path, table = saved
    cal = thresholds.load(path, ARGS)
    assert cal["levels"].tolist() == LEVELS
    assert cal["score"] == "magnitude"
    assert cal["greedy"] is None and cal["cats"] is None
    assert cal["path"] == str(path)
    assert cal["table"].shape == (ARGS.n_layer, len(PROJECTIONS), len(LEVELS))
    # stored with 6 significant digits
    assert torch.allclose(cal["table"], table, rtol=1e-5, atol=0)
    data = json.loads(path.read_text())
    assert data["schema_version"] == thresholds.SCHEMA_VERSION
    assert data["calibration"] == {"source": "unit test", "tokens": 1234, "score": "magnitude"}
    assert [list(layer) for layer in data["layers"]] == [list(PROJECTIONS)] * ARGS.n_layer
    assert data["model"] == {"n_layer": 2, "dim": 64, "intermediate_size": 128, "n_head": 4, "n_local_heads": 2,
                             "head_dim": 16, "vocab_size": 256, "rope_base": 10000.0}
    # saved again over it: replaced
    thresholds.save(path, ARGS, LEVELS, table * 2, "again", 1, "magnitude")
    assert torch.allclose(thresholds.load(path, ARGS)["table"], table * 2, rtol=1e-5, atol=0)


def test_fingerprint_is_plain_json(tmp_path):
    """A Llama-3 rope_base is written as a JSON number (no NaN/Infinity extensions) and read back exactly."""
    config = ModelArgs(**{**ARGS.__dict__, "rope_base": 500000.0, "vocab_size": 128256})
    path = tmp_path / "t.json"
    thresholds.save(path, config, LEVELS, random_table(), "x", 1, "magnitude")

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    model = json.loads(path.read_text(), parse_constant=no_constants)["model"]
    assert model["rope_base"] == 500000.0 and type(model["rope_base"]) is float and model["vocab_size"] == 128256
    thresholds.load(path, config)


def test_round_trip_cats_and_weighted(tmp_path):
    table = random_table()
    cats = random_table()[:, 0]
    path = tmp_path / "thresholds_weighted.json"
    thresholds.save(path, ARGS, LEVELS, table, "x", 1, "weighted", cats=cats)
    cal = thresholds.load(path, ARGS)
    assert cal["score"] == "weighted"
    assert torch.allclose(cal["cats"], cats, rtol=1e-5, atol=0)
    for i, level in enumerate(LEVELS):
        assert torch.allclose(thresholds.cats_thresholds_for(cal, level).double(), cats[:, i], rtol=1e-5, atol=1e-7)
    assert thresholds.default_path("/a/b/model.pth", "weighted").name == "thresholds_weighted.json"
    assert thresholds.default_path("/a/b/model.pth").name == "thresholds.json"


def test_interpolation(saved):
    path, _ = saved
    cal = thresholds.load(path, ARGS)
    stored = cal["table"]
    for i, level in enumerate(LEVELS):
        got = thresholds.thresholds_for(cal, level)
        assert got.dtype == torch.float32 and got.shape == (ARGS.n_layer, len(PROJECTIONS))
        assert torch.allclose(got.double(), stored[..., i], rtol=1e-6, atol=0), level
    for i in range(len(LEVELS) - 1):
        lo, hi = LEVELS[i], LEVELS[i + 1]
        for frac in (0.25, 0.5, 0.9):
            s = lo + frac * (hi - lo)
            got = thresholds.thresholds_for(cal, s).double()
            a, b = stored[..., i], stored[..., i + 1]
            assert (got > a * (1 - 1e-6)).all() and (got < b * (1 + 1e-6)).all(), s
            # piecewise linear: written out independently
            assert torch.allclose(got, a + frac * (b - a), rtol=1e-5, atol=1e-7)


def test_interpolation_monotone(saved):
    path, _ = saved
    cal = thresholds.load(path, ARGS)
    prev = None
    for s in torch.linspace(0, 0.99, 67).tolist():
        t = thresholds.thresholds_for(cal, s)
        if prev is not None:
            assert (t >= prev).all()
        prev = t
    assert (thresholds.thresholds_for(cal, 0.0) == 0).all()


@pytest.mark.parametrize("other", [
    dict(n_layer=3), dict(dim=128), dict(intermediate_size=256), dict(n_head=8), dict(n_local_heads=4),
    dict(head_dim=32), dict(vocab_size=32000), dict(rope_base=500000.0),
    dict(vocab_size=32000, rope_base=1000000.0),  # Mistral-7B against Llama-3-8B: the same shapes
])
def test_other_model(saved, other):
    path, _ = saved
    config = ModelArgs(**{**ARGS.__dict__, **other})
    msg = load_error(path, config)
    assert "another model" in msg
    # each differing field named with the file's value and the model's, and no other field
    for key, value in other.items():
        assert f"{key} {getattr(ARGS, key)} != {value}" in msg, msg
    assert msg.count("!=") == len(other), msg


def test_fingerprint_field_missing_or_extra(saved):
    path, _ = saved
    data = json.loads(path.read_text())
    fingerprint = dict(data["model"])
    del fingerprint["rope_base"]
    rewrite(path, model=fingerprint)
    assert "rope_base (absent) != 10000.0" in load_error(path)
    rewrite(path, model={**data["model"], "sliding_window": 4096})
    assert "sliding_window 4096 != (absent)" in load_error(path)
    rewrite(path, model=None)
    assert "fingerprint" in load_error(path)


def test_missing_file(tmp_path):
    msg = load_error(tmp_path / "nope.json")
    assert "not found" in msg and "calibrate.py" in msg
    assert "is a folder" in load_error(tmp_path)
    assert "is not a regular file" in load_error(Path("/dev/zero"))  # read, never written


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00garbage", b'{"schema_version": 1, "mod',
                                     b"[" * 100000 + b"]" * 100000,  # nested past Python's parser: RecursionError
                                     b'{"schema_version": ' + b"9" * 5000 + b"}"])  # past int()'s 4,300 digits
def test_corrupt_json(tmp_path, content):
    path = tmp_path / "thresholds.json"
    path.write_bytes(content)
    assert "corrupt" in load_error(path)


@pytest.mark.parametrize("version", [0, 3, "2", None, True])
def test_wrong_schema_version(saved, version):
    path, _ = saved
    rewrite(path, schema_version=version)
    assert "unsupported schema_version" in load_error(path)


def test_older_schema_asks_to_recalibrate(saved):
    """A version-1 file (its fingerprint without vocab_size and rope_base) is refused, and says what to do."""
    path, _ = saved
    data = json.loads(path.read_text())
    old = {k: v for k, v in data["model"].items() if k not in ("vocab_size", "rope_base")}
    rewrite(path, schema_version=1, model=old)
    msg = load_error(path)
    assert "older schema" in msg and "version 1" in msg and "re-run calibrate.py" in msg, msg


def test_another_json_file(tmp_path):
    # e.g. --thresholds config.json: named for what it is, not for a schema version it lacks
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert "is not a thresholds file" in load_error(path)


@pytest.mark.parametrize("content", ["[]", "3", '"text"', "null"])
def test_not_an_object(tmp_path, content):
    path = tmp_path / "thresholds.json"
    path.write_text(content)
    assert "a JSON object expected" in load_error(path)


def test_wrong_table_shape(saved):
    path, _ = saved
    data = json.loads(path.read_text())
    # one layer too few
    rewrite(path, layers=data["layers"][:1])
    load_error(path)
    # one level too few in one projection
    layers = json.loads(json.dumps(data["layers"]))
    layers[1]["down"] = layers[1]["down"][:-1]
    rewrite(path, layers=layers)
    load_error(path)
    # a projection missing
    layers = json.loads(json.dumps(data["layers"]))
    del layers[0]["gate"]
    rewrite(path, layers=layers)
    assert "malformed" in load_error(path)
    # levels and table disagree
    rewrite(path, layers=data["layers"], levels=LEVELS[:-1])
    load_error(path)


@pytest.mark.parametrize("levels", [[0.1, 0.5, 0.9, 0.95, 0.96, 0.97, 0.98], [0.0, 0.5, 0.4, 0.6, 0.7, 0.8, 0.9],
                                    [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0], [0.0, 0.1, 0.1, 0.5, 0.75, 0.9, 0.999],
                                    [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, float("nan")], 5, "0.1", None,
                                    [0.0, "a", 0.2, 0.3, 0.4, 0.5, 0.6], [0.0, True, 0.2, 0.3, 0.4, 0.5, 0.6]])
def test_bad_levels(saved, levels):
    path, _ = saved
    rewrite(path, levels=levels)
    assert "levels" in load_error(path)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_bad_threshold_values(saved, bad):
    path, _ = saved
    data = json.loads(path.read_text())
    data["layers"][1]["o"][3] = bad
    path.write_text(json.dumps(data))  # json writes NaN / Infinity, which json.loads reads back
    assert "finite" in load_error(path)


@pytest.mark.parametrize("where", ["layers", "cats", "sparse_aware"])
def test_thresholds_past_float32_are_refused(saved, where):
    """A threshold finite in the file but past float32's range would be infinite in the model's float32 tensors:
    refused when the file is read, not once the weights have loaded (or, for cats, never)."""
    path, _ = saved
    data = json.loads(path.read_text())
    big = float(torch.finfo(torch.float32).max) * 2
    if where == "layers":
        data["layers"][1]["o"][-1] = big
    elif where == "cats":
        data["cats"] = [[0.0] + [big] * (len(LEVELS) - 1)] * 2
    else:
        data["sparse_aware"] = {"levels": [0.5], "layers": [{p: [big] for p in PROJECTIONS}] * 2}
    path.write_text(json.dumps(data))
    assert "past float32's range" in load_error(path)


def test_lists_nested_deeply_are_refused_in_one_line(saved):
    """Lists nested hundreds deep where numbers belong (past the checks' recursion, short of the JSON parser's)."""
    path, _ = saved
    data = json.loads(path.read_text())
    data["levels"] = json.loads("[" * 600 + "0" + "]" * 600)
    path.write_text(json.dumps(data))
    assert "levels must hold numbers only" in load_error(path)


def falling_entry(shape, seed) -> tuple:
    """A random index into a (..., levels) table where a value is made to fall below the one before: at level 2 or
    above, since the tables hold 0 at level 0 and nothing can fall below a 0 at level 1."""
    g = torch.Generator().manual_seed(seed)
    return tuple(int(torch.randint(lo, n, (1,), generator=g)) for lo, n in zip([0] * (len(shape) - 1) + [2], shape))


@pytest.mark.parametrize("seed", range(4))
def test_thresholds_falling_along_the_levels(tmp_path, seed):
    """Each threshold is a quantile of one distribution: a file where one falls below the level before is refused,
    naming where; an equal neighbour (a tie between quantiles) loads."""
    table = random_table(seed=seed + 10)
    l, p, i = falling_entry(table.shape, seed)
    path = tmp_path / "t.json"
    tied = table.clone()
    tied[l, p, i] = tied[l, p, i - 1]
    thresholds.save(path, ARGS, LEVELS, tied, "x", 1, "magnitude")
    loaded = thresholds.load(path, ARGS)["table"]
    assert loaded[l, p, i] == loaded[l, p, i - 1] > 0
    fallen = table.clone()
    fallen[l, p, i] = fallen[l, p, i - 1] * 0.9
    thresholds.save(path, ARGS, LEVELS, fallen, "x", 1, "magnitude")
    msg = load_error(path)
    assert f"fall from level {LEVELS[i - 1]:g} to {LEVELS[i]:g} (layer {l} {PROJECTIONS[p]})" in msg, msg


@pytest.mark.parametrize("seed", range(3))
def test_sections_falling_along_the_levels(tmp_path, seed):
    """cats and sparse_aware thresholds and greedy sparsities never fall along their levels either."""
    path = tmp_path / "t.json"
    cats = random_table(seed=seed)[:, 0]
    l, i = falling_entry(cats.shape, seed)
    cats[l, i] = cats[l, i - 1] / 2
    thresholds.save(path, ARGS, LEVELS, random_table(), "x", 1, "magnitude", cats=cats)
    assert f"cats thresholds fall from level {LEVELS[i - 1]:g} to {LEVELS[i]:g} (layer {l})" in load_error(path)

    sa_levels = [0.25, 0.5, 0.75]
    sa = random_table(levels=sa_levels, seed=seed)
    l, p, i = falling_entry(sa.shape, seed)
    sa[l, p, i] = sa[l, p, i - 1] / 2
    thresholds.save(path, ARGS, LEVELS, random_table(), "x", 1, "magnitude",
                    sparse_aware={"levels": sa_levels, "table": sa})
    msg = load_error(path)
    assert f"sparse_aware thresholds fall from level {sa_levels[i - 1]:g} to {sa_levels[i]:g} " \
           f"(layer {l} {PROJECTIONS[p]})" in msg, msg

    g_levels = [0.0, 0.3, 0.6]
    g = random_table(levels=g_levels, seed=seed) / 10  # sparsities from 0, below 1
    l, p, i = falling_entry(g.shape, seed)
    g[l, p, i] = g[l, p, i - 1] / 2
    greedy = {"levels": g_levels, "layers": [{q: g[layer, j].tolist() for j, q in enumerate(PROJECTIONS)}
                                             for layer in range(ARGS.n_layer)]}
    thresholds.save(path, ARGS, LEVELS, random_table(), "x", 1, "magnitude", greedy=greedy)
    msg = load_error(path)
    assert f"greedy sparsities fall from level {g_levels[i - 1]:g} to {g_levels[i]:g} " \
           f"(layer {l} {PROJECTIONS[p]})" in msg, msg


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("where, named", [
    ("layers", "threshold table"), ("cats", "cats section"), ("greedy", "greedy section's table"),
    ("greedy levels", "greedy section's levels"), ("sparse_aware", "sparse_aware section's table")])
def test_booleans_are_not_numbers(tmp_path, value, where, named):
    """JSON true/false inside a table (torch.tensor would read 1 and 0) is refused, in every section."""
    g = torch.Generator().manual_seed(len(where) + value)
    l, p = int(torch.randint(ARGS.n_layer, (1,), generator=g)), PROJECTIONS[int(torch.randint(7, (1,), generator=g))]
    path = tmp_path / "t.json"
    greedy = {"levels": [0.0, 0.5], "layers": [{q: [0.0, 0.5] for q in PROJECTIONS} for _ in range(ARGS.n_layer)]}
    thresholds.save(path, ARGS, LEVELS, random_table(), "x", 1, "magnitude", greedy=greedy, cats=random_table()[:, 0],
                    sparse_aware={"levels": [0.25, 0.5], "table": random_table(levels=[0.1, 0.2], seed=3)})
    thresholds.load(path, ARGS)  # as saved: valid
    data = json.loads(path.read_text())
    if where == "layers":
        data["layers"][l][p][-1] = value
    elif where == "cats":
        data["cats"][l][-1] = value
    elif where == "greedy":
        data["greedy"]["layers"][l][p][0] = value  # false here equals the 0.0 it replaces
    elif where == "greedy levels":
        data["greedy"]["levels"][0] = value
    else:
        data["sparse_aware"]["layers"][l][p][-1] = value
    path.write_text(json.dumps(data))
    msg = load_error(path)
    assert "numbers only" in msg and named in msg, msg


def test_unknown_score(saved):
    path, _ = saved
    data = json.loads(path.read_text())
    rewrite(path, calibration={**data["calibration"], "score": "random"})
    assert "score" in load_error(path)


def test_malformed_optional_sections(saved):
    path, _ = saved
    rewrite(path, cats=[[0.0] * len(LEVELS)])  # one layer only
    assert "cats" in load_error(path)
    rewrite(path, cats=[[0.0] * len(LEVELS), [0.0, float("nan")] + [1.0] * (len(LEVELS) - 2)])
    assert "cats" in load_error(path)
    rewrite(path, cats=None, greedy={"levels": [0.0, 0.5], "layers": [{p: [0.0, 1.5] for p in PROJECTIONS}] * 2})
    assert "greedy" in load_error(path)
    # levels that are not numbers, not increasing or not from 0: each a one-line error naming the section
    # ([0.0] alone: no interval to interpolate in)
    for levels in (["a", "b"], [0.0, 0.5, 0.25], [0.1, 0.5], [0.0, 1.0], [0.0, float("nan")], [0.0]):
        rewrite(path, greedy={"levels": levels, "layers": [{p: [0.0] * len(levels) for p in PROJECTIONS}] * 2})
        assert "greedy" in load_error(path), levels
    rewrite(path, greedy={"levels": [0.0, 0.5], "layers": [{p: [0.0, 0.5] for p in PROJECTIONS}]})  # one layer
    assert "greedy" in load_error(path)
    # a projection at sparsity 1 (everything dropped) is no allocation either
    rewrite(path, greedy={"levels": [0.0, 0.5], "layers": [{p: [0.0, 1.0] for p in PROJECTIONS}] * 2})
    assert "greedy" in load_error(path)
    rewrite(path, greedy={"levels": [0.0, 0.5], "layers": [{p: [-0.1, 0.5] for p in PROJECTIONS}] * 2})
    assert "greedy section: sparsities outside" in load_error(path)
    # nor one above the threshold table's last level (0.999), which interpolation would hold at that level's
    rewrite(path, greedy={"levels": [0.0, 0.5], "layers": [{p: [0.0, 0.9995] for p in PROJECTIONS}] * 2})
    assert "greedy section: sparsities outside [0, 0.999]" in load_error(path)
    rewrite(path, greedy={"levels": [0.0, 0.999], "layers": [{p: [0.0, 0.999] for p in PROJECTIONS}] * 2})
    thresholds.load(path, ARGS)  # at the last level: read off exactly
    # an allocation whose parameter-weighted sparsity is not its level: a run "at greedy 50%" would run at another
    rewrite(path, greedy={"levels": [0.0, 0.5], "layers": [{p: [0.0, 0.25] for p in PROJECTIONS}] * 2})
    assert "parameter-weighted sparsity misses its level by 0.25" in load_error(path)


@pytest.mark.parametrize("field, value, words", [
    ("layers", None, "'layers' is null"), ("layers", {}, "'layers' is an object"), ("layers", [1, 2], "layers[0] lacks q"),
    ("calibration", None, "'calibration' is null"), ("calibration", {"source": "x"}, "'score' is missing"),
    ("greedy", [0.0], "'greedy' is a list"), ("greedy", {"layers": []}, "greedy section's 'levels' is missing"),
    ("sparse_aware", {"levels": [0.5], "layers": None}, "sparse_aware section's 'layers' is null")])
def test_missing_or_wrong_typed_fields_are_named(saved, field, value, words):
    path, _ = saved
    rewrite(path, **{field: value})
    msg = load_error(path)
    assert "malformed" in msg and words in msg, msg


def test_missing_weighted_file_names_the_calibration_to_run(saved):
    path, _ = saved
    assert "run calibrate.py --score weighted first" in load_error(path.parent / "thresholds_weighted.json")
    assert "run calibrate.py first" in load_error(path.parent / "other.json")


def test_set_thresholds_rejects_bad_tables():
    import model
    m = model.Transformer(ARGS)
    with pytest.raises(CheckpointError):
        m.set_thresholds(torch.zeros(3, len(PROJECTIONS)))
    with pytest.raises(CheckpointError):
        m.set_thresholds(torch.full((ARGS.n_layer, len(PROJECTIONS)), -1.0))
    one_negative = torch.zeros(ARGS.n_layer, len(PROJECTIONS))
    one_negative[1, 3] = -1.0
    with pytest.raises(CheckpointError):
        m.set_thresholds(one_negative)
    with pytest.raises(CheckpointError):
        m.set_thresholds(torch.full((ARGS.n_layer, len(PROJECTIONS)), float("nan")))


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_check_sparsity_rejects(saved, s):
    with pytest.raises(ValueError):
        thresholds.check_sparsity(s, torch.tensor([0.0, 0.9999]), "calibration")
    path, _ = saved
    with pytest.raises(ValueError):
        thresholds.thresholds_for(thresholds.load(path, ARGS), s)


def test_sparsity_above_the_last_level_is_refused(tmp_path):
    """Interpolation would hold the last level's values and drop less than asked: uniform, CATS and greedy alike."""
    path = tmp_path / "t.json"
    greedy = {"levels": [0.0, 0.5], "layers": [{p: [0.0, 0.5] for p in PROJECTIONS}] * ARGS.n_layer}
    thresholds.save(path, ARGS, LEVELS, random_table(), "x", 1, "magnitude", greedy=greedy, cats=random_table()[:, 0])
    cal = thresholds.load(path, ARGS)
    thresholds.thresholds_for(cal, 0.999)
    thresholds.cats_thresholds_for(cal, 0.999)
    thresholds.thresholds_for(cal, 0.5, greedy=True)
    with pytest.raises(CheckpointError, match=r"sparsity 0.9995 is above the calibration's last level \(0.999\)"):
        thresholds.thresholds_for(cal, 0.9995)
    with pytest.raises(CheckpointError, match=r"sparsity 0.9995 is above the calibration's last level \(0.999\)"):
        thresholds.cats_thresholds_for(cal, 0.9995)
    with pytest.raises(CheckpointError, match=r"sparsity 0.6 is above the greedy allocation's last level \(0.5\)"):
        thresholds.thresholds_for(cal, 0.6, greedy=True)


@pytest.mark.parametrize("s", [0.0, 0.5, 0.999, 0.9999])
def test_check_sparsity_accepts(s):
    thresholds.check_sparsity(s, torch.tensor([0.0, 0.9999]), "calibration")
    assert not math.isnan(s)


def test_greedy_requires_section(saved):
    path, _ = saved
    cal = thresholds.load(path, ARGS)
    with pytest.raises(CheckpointError) as e:
        thresholds.thresholds_for(cal, 0.4, greedy=True)
    assert "greedy" in str(e.value) and "\n" not in str(e.value)


def test_sparse_aware_section(tmp_path):
    """Uniform levels up to the sparse-aware table's last level come from it; higher ones and greedy from the
    dense table; a malformed section is refused."""
    table = random_table()
    sa_levels = [0.25, 0.5]
    sa_table = random_table(levels=[0.1, 0.2], seed=3)  # any increasing values
    path = tmp_path / "t.json"
    thresholds.save(path, ARGS, LEVELS, table, "x", 1, "magnitude",
                    sparse_aware={"levels": sa_levels, "table": sa_table})
    cal = thresholds.load(path, ARGS)
    for i, s in enumerate(sa_levels):
        assert torch.allclose(thresholds.thresholds_for(cal, s).double(), sa_table[..., i], rtol=1e-5)
    assert torch.allclose(thresholds.thresholds_for(cal, 0.75).double(), table[..., LEVELS.index(0.75)], rtol=1e-5)
    data = json.loads(path.read_text())
    data["sparse_aware"]["levels"] = [0.5, 0.25]
    path.write_text(json.dumps(data))
    assert "sparse_aware" in load_error(path)
    # a corrected threshold is a level of the dense curve: one above its last level is no file calibrate.py writes
    data = json.loads(path.read_text())
    data["sparse_aware"]["levels"] = sa_levels
    data["sparse_aware"]["layers"][1]["down"][-1] = float(table[1, -1, -1]) * 2
    path.write_text(json.dumps(data))
    assert "a threshold above the dense table's last level (0.999)" in load_error(path)


def test_sparse_aware_between_and_below_its_levels(tmp_path):
    """Between the stored levels, and below the first, the corrected thresholds follow the dense activations'
    quantile curve. Here the scores are exponential (threshold -log(1 - s) drops s of them) and the correction
    moves every level to 0.9 of itself, so the corrected threshold for s is -log(1 - 0.9 s) at every s, not
    only at the stored 0.25 and 0.5 (a line through the stored thresholds would be 7% high at 12.5%)."""
    levels = [i / 200 for i in range(200)] + [0.999]  # calibrate.py's grid
    curve = -torch.log1p(-torch.tensor(levels, dtype=torch.float64))
    table = curve.expand(ARGS.n_layer, len(PROJECTIONS), -1).clone()
    sa_levels = torch.tensor([0.25, 0.5], dtype=torch.float64)
    sa_table = (-torch.log1p(-0.9 * sa_levels)).expand(ARGS.n_layer, len(PROJECTIONS), -1).clone()
    path = tmp_path / "t.json"
    thresholds.save(path, ARGS, levels, table, "x", 1, "magnitude",
                    sparse_aware={"levels": sa_levels.tolist(), "table": sa_table})
    cal = thresholds.load(path, ARGS)
    for s in (0.01, 0.125, 0.25, 0.3, 0.4, 0.5):
        want = -math.log1p(-0.9 * s)
        assert torch.allclose(thresholds.thresholds_for(cal, s).double(), torch.tensor(want, dtype=torch.float64),
                              rtol=2e-3), s
    assert torch.allclose(thresholds.thresholds_for(cal, 0.6).double(), torch.tensor(-math.log1p(-0.6)).double(),
                          rtol=2e-3)  # above the stored levels: TEAL's own


def test_sparse_aware_levels_start_above_zero(tmp_path):
    # load prepends level 0 itself: a stored level 0 would repeat it (and divide by zero when interpolating)
    path = tmp_path / "t.json"
    thresholds.save(path, ARGS, LEVELS, random_table(), "x", 1, "magnitude",
                    sparse_aware={"levels": [0.0, 0.5], "table": random_table(levels=[0.1, 0.2], seed=3)})
    assert "sparse_aware" in load_error(path)


def test_greedy_ignores_the_sparse_aware_table(tmp_path):
    """Greedy allocations interpolate the dense table at each projection's own level, even where a sparse-aware
    table covers the block sparsity asked for."""
    table = random_table()
    alloc = [LEVELS[2 + i % 2] for i in range(len(PROJECTIONS))]
    sizes = projection_sizes(ARGS)
    block = float(sizes @ torch.tensor(alloc, dtype=torch.float64) / sizes.sum())  # 0.35, in the sparse-aware range
    greedy = {"levels": [0.0, block], "layers": [{p: [0.0, a] for p, a in zip(PROJECTIONS, alloc)}
                                                 for _ in range(ARGS.n_layer)]}
    path = tmp_path / "t.json"
    thresholds.save(path, ARGS, LEVELS, table, "x", 1, "magnitude", greedy=greedy,
                    sparse_aware={"levels": [0.25, 0.5], "table": random_table(levels=[0.1, 0.2], seed=3)})
    cal = thresholds.load(path, ARGS)
    got = thresholds.thresholds_for(cal, block, greedy=True).double()
    want = torch.stack([table[:, i, 2 + i % 2] for i in range(len(PROJECTIONS))], dim=1)  # grid levels: stored
    assert torch.allclose(got, want, rtol=1e-5)


def test_inverse_interp_takes_the_far_end_of_a_flat_stretch():
    """Where the quantile curve is flat (tied scores), a threshold of that value drops everything up to the
    stretch's far end: the level it stands for is that end, not its start."""
    xs = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    ys = torch.tensor([[0.0, 1.0, 1.0], [0.0, 2.0, 4.0]], dtype=torch.float64)
    got = thresholds.inverse_interp(xs, ys, torch.tensor([[1.0], [1.0]], dtype=torch.float64))
    assert got.flatten().tolist() == [1.0, 0.25]


def test_negative_cats_thresholds_are_refused(tmp_path):
    """|silu(gate)| is never negative: a negative CATS threshold would drop nothing, the baseline silently dense."""
    path = tmp_path / "t.json"
    thresholds.save(path, ARGS, LEVELS, random_table(), "x", 1, "magnitude", cats=random_table()[:, 0] - 100)
    assert "malformed cats section" in load_error(path)
