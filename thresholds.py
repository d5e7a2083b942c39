"""The thresholds JSON written by calibrate.py and read by generate.py / eval_ppl.py (schema version 2).

    {"schema_version": 2,
     "model": {"n_layer", "dim", "intermediate_size", "n_head", "n_local_heads", "head_dim", "vocab_size",
               "rope_base"},                       # the fingerprint: a file loads only for a model that matches it
     "calibration": {"source": str, "tokens": int, "score": "magnitude" | "weighted"},
     "levels": [0.0, 0.005, ..., 0.999],                # sparsity grid
     "layers": [{"q": [t at each level], "k": [...], "v", "o", "gate", "up", "down"}, ...],
     "greedy": {"levels": [...], "layers": [{"q": [sparsity at each level], ...}, ...]},  # optional
     "cats": [[|silu(gate)| threshold at each level] for each layer],                    # optional
     "sparse_aware": {"levels": [...], "layers": [{"q": [threshold at each level], ...}, ...]}  # optional
    }

layers[l][p][i] is the levels[i]-quantile of projection p's input score in layer l on the calibration text:
zeroing entries at or below it drops that fraction of them, so it never decreases along the levels (the cats and
sparse_aware thresholds and the greedy sparsities neither). A sparsity is interpolated between levels; one above
the last level (0.999 in calibrate.py's grid) is refused.
"greedy" (calibrate.py --greedy) holds, for each parameter-weighted block sparsity, each projection's own level.
"sparse_aware" (calibrate.py --sparse_aware) holds uniform thresholds corrected on the sparse model's own
activations; uniform sparsities up to its last level use it.
Version 1 had no vocab_size or rope_base in the fingerprint (Mistral-7B and Llama-3-8B share all the shapes); its
files are refused: re-run calibrate.py.
"""
import json
from pathlib import Path

import torch

from model import PROJECTIONS, CheckpointError, ModelArgs, Transformer, projection_sizes

SCHEMA_VERSION = 2
SCORES = ("magnitude", "weighted")


def model_fingerprint(c: ModelArgs) -> dict:
    return dict(n_layer=c.n_layer, dim=c.dim, intermediate_size=c.intermediate_size, n_head=c.n_head,
                n_local_heads=c.n_local_heads, head_dim=c.head_dim, vocab_size=c.vocab_size,
                rope_base=float(c.rope_base))


def default_path(checkpoint_path, score: str = "magnitude") -> Path:
    name = "thresholds.json" if score == "magnitude" else f"thresholds_{score}.json"
    return Path(checkpoint_path).parent / name


def _layers(table: torch.Tensor) -> list:
    return [{p: [float(f"{v:.6g}") for v in table[l, i].tolist()] for i, p in enumerate(PROJECTIONS)}
            for l in range(table.shape[0])]


def save(path, config: ModelArgs, levels: list, table: torch.Tensor, source: str, tokens: int, score: str,
         greedy: dict = None, cats: torch.Tensor = None, sparse_aware: dict = None) -> None:
    """table: (n_layer, 7, len(levels)) thresholds."""
    data = {"schema_version": SCHEMA_VERSION, "model": model_fingerprint(config),
            "calibration": {"source": source, "tokens": tokens, "score": score},
            "levels": [round(x, 6) for x in levels], "layers": _layers(table)}
    if greedy is not None:
        data["greedy"] = greedy
    if cats is not None:
        data["cats"] = [[float(f"{v:.6g}") for v in row] for row in cats.tolist()]
    if sparse_aware is not None:
        data["sparse_aware"] = {"levels": [round(x, 6) for x in sparse_aware["levels"]],
                                "layers": _layers(sparse_aware["table"])}
    Path(path).write_text(json.dumps(data))


def load(path, config: ModelArgs) -> dict:
    """Read and validate a thresholds file against the model; CheckpointError with one line on any problem."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"thresholds file {path} is a folder")
    if path.exists() and not path.is_file():
        raise CheckpointError(f"thresholds file {path} is not a regular file")
    if not path.is_file():
        how = "calibrate.py --score weighted" if path.name == default_path(path, "weighted").name else "calibrate.py"
        raise CheckpointError(f"thresholds file not found: {path} (run {how} first)")
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # not JSON or UTF-8, an integer past Python's 4,300 digits; too deep
        raise CheckpointError(f"corrupt thresholds file {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"corrupt thresholds file {path}: a JSON object expected, got {type(data).__name__}")
    if "schema_version" not in data:
        raise CheckpointError(f"{path} is not a thresholds file (no schema_version; calibrate.py writes them)")
    version = data.get("schema_version")
    if type(version) is int and 1 <= version < SCHEMA_VERSION:  # type: a JSON true equals 1 but is no version
        raise CheckpointError(f"{path} has an older schema (version {version}, this runtime reads {SCHEMA_VERSION}): "
                              f"re-run calibrate.py")
    if version != SCHEMA_VERSION:
        raise CheckpointError(f"{path}: unsupported schema_version {version!r} (expected {SCHEMA_VERSION})")
    _check_fingerprint(data.get("model"), model_fingerprint(config), path)
    calibration = _field(data, "calibration", dict, path, "the file")
    score = _field(calibration, "score", str, path, "calibration")
    source = str(calibration.get("source"))
    levels = _numbers(_field(data, "levels", list, path, "the file"), path, "levels")
    rows = _rows(_field(data, "layers", list, path, "the file"), path, "layers")
    if not is_grid(levels, 0.0):
        raise CheckpointError(f"{path}: levels must be two or more, increase from 0 and stay below 1")
    n = len(levels)
    table = _numbers(rows, path, "threshold table")
    if table.shape != (config.n_layer, len(PROJECTIONS), n):
        raise CheckpointError(f"{path}: threshold table of shape {tuple(table.shape)} (layers, projections, levels); "
                              f"expected ({config.n_layer}, {len(PROJECTIONS)}, {n})")
    if not torch.isfinite(table).all() or (table < 0).any():
        raise CheckpointError(f"{path}: threshold table holds NaN, infinite or negative values")
    _check_non_decreasing(table, levels, path, "thresholds")
    if score not in SCORES:
        raise CheckpointError(f"{path}: unknown score {score!r}")
    greedy = _section(data, "greedy", config, path, lowest=0.0)
    if greedy is not None:  # levels from 0; each projection's own sparsity at each
        g_levels, g = greedy
        # each sparsity is read off the threshold table: above its last level it would drop less than asked
        if not ((g >= 0) & (g <= levels[-1])).all():
            raise CheckpointError(f"{path}: malformed greedy section: sparsities outside [0, {float(levels[-1]):g}] "
                                  f"(the threshold table's levels)")
        # greedy.search only ever raises a projection's sparsity as the block sparsity grows
        _check_non_decreasing(g, g_levels, path, "greedy sparsities")
        # and mixes its steps so that each level is the block's parameter-weighted sparsity, exactly
        sizes = projection_sizes(config)
        w = sizes / sizes.sum()
        miss = float(((w[None, :, None] * g).sum(1) - g_levels).abs().max())
        if miss > 1e-4:
            raise CheckpointError(f"{path}: malformed greedy section: a block's parameter-weighted sparsity misses its "
                                  f"level by {miss:.3g}")
        greedy = {"levels": g_levels, "table": g}
    cats = data.get("cats")
    if cats is not None:
        cats = _numbers(cats, path, "cats section")
        if cats.shape != (config.n_layer, n) or not torch.isfinite(cats).all() or (cats < 0).any():
            raise CheckpointError(f"{path}: malformed cats section: shape {tuple(cats.shape)}, or values not finite "
                                  f"and >= 0; expected ({config.n_layer}, {n})")
        _check_non_decreasing(cats, levels, path, "cats thresholds")
    sa = _section(data, "sparse_aware", config, path, lowest=None)
    if sa is not None:  # levels above 0; a threshold at each
        sa_levels, sa_table = sa
        if not (torch.isfinite(sa_table).all() and (sa_table >= 0).all()):
            raise CheckpointError(f"{path}: malformed sparse_aware section: thresholds not finite and >= 0")
        # thresholds_for reads them as levels of the dense quantile curve (calibrate.py takes them from it)
        if (sa_table > table[..., -1:]).any():
            raise CheckpointError(f"{path}: malformed sparse_aware section: a threshold above the dense table's "
                                  f"last level ({float(levels[-1]):g})")
        # level 0 keeps everything: threshold 0, at most every stored one
        sa = {"levels": torch.cat([torch.zeros(1, dtype=torch.float64), sa_levels]),
              "table": torch.cat([torch.zeros(config.n_layer, len(PROJECTIONS), 1, dtype=torch.float64), sa_table], -1)}
        _check_non_decreasing(sa["table"], sa["levels"], path, "sparse_aware thresholds")
    return {"levels": levels, "table": table, "score": score, "greedy": greedy, "cats": cats, "sparse_aware": sa,
            "path": str(path), "source": source}


def _check_fingerprint(got, want: dict, path: Path) -> None:
    """The file's model fingerprint against the model's; the error names each field that differs."""
    if not isinstance(got, dict):
        raise CheckpointError(f"malformed thresholds file {path}: no model fingerprint")
    keys = list(want) + [k for k in got if k not in want]
    diff = [f"{k} {got.get(k, '(absent)')} != {want.get(k, '(absent)')}" for k in keys
            if k not in got or k not in want or got[k] != want[k]]
    if diff:
        raise CheckpointError(f"{path} was calibrated for another model than config.json describes (its value, then "
                              f"config.json's): {', '.join(diff)}")


_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number", float: "a number",
          type(None): "null"}


def _field(obj: dict, key: str, kind: type, path: Path, where: str):
    """obj[key], which must be a JSON value of this kind; the error names the field."""
    value = obj.get(key)
    if not isinstance(value, kind):
        got = f"is {_KINDS[type(value)]}" if key in obj else "is missing"
        raise CheckpointError(f"malformed thresholds file {path}: {where}'s {key!r} {got}, expected {_KINDS[kind]}")
    return value


def _rows(layers: list, path: Path, what: str) -> list:
    """[{projection: values}] per layer -> [[values of each projection]]; the error names the layer and key."""
    for l, layer in enumerate(layers):
        missing = [p for p in PROJECTIONS if not isinstance(layer, dict) or p not in layer]
        if missing:
            raise CheckpointError(f"malformed thresholds file {path}: {what}[{l}] lacks {', '.join(missing)} "
                                  f"(one object per layer with a list per projection)")
    return [[layer[p] for p in PROJECTIONS] for layer in layers]


def _numbers(x, path: Path, what: str) -> torch.Tensor:
    """Nested JSON lists of numbers as a float64 tensor. true/false are refused: torch.tensor would read 1 and 0.
    Finite values past float32's range are refused too: the model keeps thresholds in float32, where they would be
    infinite."""
    error = CheckpointError(f"{path}: {what} must hold numbers only (no strings, true/false or ragged lists)")
    stack = [x]  # no recursion: a list nested hundreds deep is an error line, not a RecursionError
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, bool):
            raise error
    try:
        t = torch.tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, OverflowError):
        raise error from None
    top = torch.finfo(torch.float32).max
    if (torch.isfinite(t) & (t.abs() > top)).any():
        raise CheckpointError(f"{path}: {what} holds values past float32's range ({top:.4g})")
    return t


def _check_non_decreasing(values: torch.Tensor, levels: torch.Tensor, path: Path, what: str) -> None:
    """values (n_layer, [7,] len(levels)) may stay level from one level to the next (quantiles tie) but never fall;
    the error names the first place where they do."""
    falls = (values[..., 1:] < values[..., :-1]).nonzero()
    if len(falls):
        where = falls[0].tolist()
        name = f"layer {where[0]}" + (f" {PROJECTIONS[where[1]]}" if len(where) == 3 else "")
        raise CheckpointError(f"{path}: {what} fall from level {levels[where[-1]]:g} to {levels[where[-1] + 1]:g} "
                              f"({name}); they must not decrease as the sparsity rises")


def _section(data: dict, name: str, config: ModelArgs, path: Path, lowest):
    """The optional section {"levels": [...], "layers": [{projection: [value at each level]}, ...]} as (levels,
    table) tensors, or None where the file has none. Its levels increase and stay below 1, starting at `lowest`
    (or above 0 where None)."""
    if data.get(name) is None:
        return None
    sec = _field(data, name, dict, path, "the file")
    levels = _numbers(_field(sec, "levels", list, path, f"the {name} section"), path, f"{name} section's levels")
    rows = _rows(_field(sec, "layers", list, path, f"the {name} section"), path, f"{name} section's layers")
    table = _numbers(rows, path, f"{name} section's table")
    if not is_grid(levels, lowest):
        start = f"be two or more, increase from {lowest}" if lowest is not None else "increase above 0"
        raise CheckpointError(f"{path}: malformed {name} section: levels must {start} and stay below 1")
    if table.shape != (config.n_layer, len(PROJECTIONS), len(levels)):
        raise CheckpointError(f"{path}: malformed {name} section: table of shape {tuple(table.shape)}, expected "
                              f"({config.n_layer}, {len(PROJECTIONS)}, {len(levels)})")
    return levels, table


def is_grid(levels: torch.Tensor, lowest) -> bool:
    """A sparsity grid: 1-D, increasing, below 1, starting at `lowest` with at least two levels (interp needs an
    interval), or above 0 where None (the loader then puts level 0 first). NaN fails each test."""
    if levels.dim() != 1 or len(levels) < (1 if lowest is None else 2):
        return False
    first = levels[0] == lowest if lowest is not None else levels[0] > 0
    return bool(first and (levels[1:] > levels[:-1]).all() and levels[-1] < 1)


def interp(xs: torch.Tensor, ys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ys(x) along the last dim of ys; x broadcast against ys[..., 0]."""
    i = torch.searchsorted(xs, x.contiguous(), right=True).clamp(1, len(xs) - 1)
    x0, x1 = xs[i - 1], xs[i]
    y0 = torch.gather(ys, -1, (i - 1).unsqueeze(-1)).squeeze(-1)
    y1 = torch.gather(ys, -1, i.unsqueeze(-1)).squeeze(-1)
    w = ((x - x0) / (x1 - x0)).clamp(0, 1)
    return y0 + w * (y1 - y0)


def inverse_interp(xs: torch.Tensor, ys: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The x at which the piecewise-linear ys(x) reaches y, ys non-decreasing along its last dim (y matching ys's
    leading dims): on a flat stretch its far end, where a threshold of that value drops everything up to it;
    clamped to xs's range."""
    i = torch.searchsorted(ys.contiguous(), y.contiguous(), right=True).clamp(1, len(xs) - 1)
    x0, x1 = xs[i - 1], xs[i]
    y0, y1 = torch.gather(ys, -1, i - 1), torch.gather(ys, -1, i)
    w = torch.where(y1 > y0, (y - y0) / (y1 - y0), torch.ones_like(y)).clamp(0, 1)
    return x0 + w * (x1 - x0)


def projection_sparsities(cal: dict, sparsity: float, greedy: bool) -> torch.Tensor:
    """(n_layer, 7) sparsity per projection: uniform, or the greedy allocation for that block sparsity."""
    n_layer = cal["table"].shape[0]
    if not greedy:
        check_sparsity(sparsity, cal["levels"], "calibration")
        return torch.full((n_layer, len(PROJECTIONS)), float(sparsity), dtype=torch.float64)
    if cal["greedy"] is None:
        raise CheckpointError(f"{cal['path']} has no greedy allocation (run calibrate.py --greedy)")
    g = cal["greedy"]
    check_sparsity(sparsity, g["levels"], "greedy allocation")
    x = torch.full(g["table"].shape[:2], float(sparsity), dtype=torch.float64)
    return interp(g["levels"], g["table"], x)


def thresholds_for(cal: dict, sparsity: float, greedy: bool = False, sparse_aware: bool = True) -> torch.Tensor:
    """(n_layer, 7) fp32 thresholds that drop `sparsity` of every projection's input (per its own level).
    Uniform levels covered by a sparse_aware table come from it (between its levels, as below), unless sparse_aware
    is False: TEAL's own thresholds, the dense activations' quantiles."""
    s = projection_sparsities(cal, sparsity, greedy)
    if sparse_aware and uses_sparse_aware(cal, sparsity, greedy):
        # Each corrected threshold is a level of the dense quantile curve; those levels are interpolated and read
        # back off the curve: exact at the stored levels and, between them, following the curve's shape (a line
        # through the thresholds themselves misses the level, by 2 points at 25% from one stored level at 50%)
        sa = cal["sparse_aware"]
        s = interp(sa["levels"], inverse_interp(cal["levels"], cal["table"], sa["table"]), s)
    return interp(cal["levels"], cal["table"], s).float()


def uses_sparse_aware(cal: dict, sparsity: float, greedy: bool = False) -> bool:
    """Whether the file's sparse_aware table covers this uniform level."""
    sa = cal.get("sparse_aware")
    return not greedy and sa is not None and sparsity <= sa["levels"][-1]


def apply(model: Transformer, cal: dict, sparsity: float, greedy: bool = False, prefill: bool = False,
          sparse_aware: bool = True) -> None:
    """Sparse decode (and prefill where asked) at this sparsity, with the calibration's scores and thresholds."""
    model.set_scores(cal["score"] == "weighted")
    model.set_sparse(decode=True, prefill=prefill)
    model.set_thresholds(thresholds_for(cal, sparsity, greedy, sparse_aware).to(model.output.weight.device))


def cats_thresholds_for(cal: dict, sparsity: float) -> torch.Tensor:
    """(n_layer,) fp32 |silu(gate)| thresholds for the CATS baseline."""
    check_sparsity(sparsity, cal["levels"], "calibration")
    if cal["cats"] is None:
        raise CheckpointError(f"{cal['path']} has no CATS table (re-run calibrate.py)")
    x = torch.full((cal["cats"].shape[0],), float(sparsity), dtype=torch.float64)
    return interp(cal["levels"], cal["cats"], x).float()


def check_sparsity(sparsity: float, levels: torch.Tensor, grid: str) -> None:
    """A sparsity in [0, 1), not above the last of the grid's levels: interpolation would hold the last level's
    values there, and drop less than asked."""
    if not (0.0 <= sparsity < 1.0):  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if sparsity > levels[-1]:
        raise CheckpointError(f"sparsity {sparsity} is above the {grid}'s last level ({levels[-1].item():g})")
