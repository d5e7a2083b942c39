"""The thresholds JSON written by calibrate.py and read by generate.py / eval_ppl.py (schema version 1).

    {"schema_version": 1,
     "model": {"n_layer", "dim", "intermediate_size", "n_head", "n_local_heads", "head_dim"},
     "calibration": {"source": str, "tokens": int, "score": "magnitude" | "weighted"},
     "levels": [0.0, 0.005, ..., 0.999],                # sparsity grid
     "layers": [{"q": [t at each level], "k": [...], "v", "o", "gate", "up", "down"}, ...],
     "greedy": {"levels": [...], "layers": [{"q": [sparsity at each level], ...}, ...]},  # optional
     "cats": [[|silu(gate)| threshold at each level] for each layer],                    # optional
     "sparse_aware": {"levels": [...], "layers": [{"q": [threshold at each level], ...}, ...]}  # optional
    }

layers[l][p][i] is the levels[i]-quantile of projection p's input score in layer l on the calibration text:
zeroing entries at or below it drops that fraction of them. Any sparsity in [0, 1) is interpolated.
"greedy" (calibrate.py --greedy) holds, for each parameter-weighted block sparsity, each projection's own level.
"sparse_aware" (calibrate.py --sparse_aware) holds uniform thresholds corrected on the sparse model's own
activations; uniform sparsities up to its last level use it.
"""
import json
from pathlib import Path

import torch

from model import PROJECTIONS, CheckpointError, ModelArgs

SCHEMA_VERSION = 1
SCORES = ("magnitude", "weighted")


def model_fingerprint(c: ModelArgs) -> dict:
    return dict(n_layer=c.n_layer, dim=c.dim, intermediate_size=c.intermediate_size, n_head=c.n_head,
                n_local_heads=c.n_local_heads, head_dim=c.head_dim)


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


def _require(ok) -> None:
    """A section's consistency check: raises inside load's try blocks (an assert would vanish under python -O)."""
    if not ok:
        raise ValueError


def load(path, config: ModelArgs) -> dict:
    """Read and validate a thresholds file against the model; CheckpointError with one line on any problem."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"thresholds file {path} is a folder")
    if not path.is_file():
        raise CheckpointError(f"thresholds file not found: {path} (run calibrate.py first)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt thresholds file {path}: {e}") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{path}: unsupported schema_version {data.get('schema_version') if isinstance(data, dict) else None!r}"
                              f" (expected {SCHEMA_VERSION})")
    if data.get("model") != model_fingerprint(config):
        raise CheckpointError(f"{path} was calibrated for another model: {data.get('model')} != {model_fingerprint(config)}")
    try:
        levels = data["levels"]
        table = torch.tensor([[layer[p] for p in PROJECTIONS] for layer in data["layers"]], dtype=torch.float64)
        score = data["calibration"]["score"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"malformed thresholds file {path}: {type(e).__name__} {e}") from None
    if not isinstance(levels, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in levels):
        raise CheckpointError(f"{path}: levels must be a list of numbers")
    n = len(levels)
    if n < 2 or not _increasing(torch.tensor(levels, dtype=torch.float64), 0.0):
        raise CheckpointError(f"{path}: levels must increase from 0 and stay below 1")
    if table.shape != (config.n_layer, len(PROJECTIONS), n) or not torch.isfinite(table).all() or (table < 0).any():
        raise CheckpointError(f"{path}: threshold table has shape {tuple(table.shape)} or bad values; "
                              f"expected ({config.n_layer}, {len(PROJECTIONS)}, {n}) finite and >= 0")
    if score not in SCORES:
        raise CheckpointError(f"{path}: unknown score {score!r}")
    greedy = data.get("greedy")
    if greedy is not None:  # levels from 0; each projection's own sparsity at each
        g_levels, g = _section(greedy, config, path, "greedy", lowest=0.0)
        if not ((g >= 0) & (g < 1)).all():
            raise CheckpointError(f"{path}: malformed greedy section: sparsities outside [0, 1)")
        greedy = {"levels": g_levels, "table": g}
    cats = data.get("cats")
    if cats is not None:
        try:
            cats = torch.tensor(cats, dtype=torch.float64)
            _require(cats.shape == (config.n_layer, n) and torch.isfinite(cats).all())
        except Exception:
            raise CheckpointError(f"{path}: malformed cats section") from None
    sa = data.get("sparse_aware")
    if sa is not None:  # levels above 0; a threshold at each
        sa_levels, sa_table = _section(sa, config, path, "sparse_aware", lowest=None)
        if not (torch.isfinite(sa_table).all() and (sa_table >= 0).all()):
            raise CheckpointError(f"{path}: malformed sparse_aware section: thresholds not finite and >= 0")
        # level 0 keeps everything: threshold 0
        sa = {"levels": torch.cat([torch.zeros(1, dtype=torch.float64), sa_levels]),
              "table": torch.cat([torch.zeros(config.n_layer, len(PROJECTIONS), 1, dtype=torch.float64), sa_table], -1)}
    return {"levels": torch.tensor(levels, dtype=torch.float64), "table": table, "score": score, "greedy": greedy,
            "cats": cats, "sparse_aware": sa, "path": str(path)}


def _section(sec, config: ModelArgs, path: Path, name: str, lowest) -> tuple:
    """An optional section {"levels": [...], "layers": [{projection: [value at each level]}, ...]} as (levels,
    table) tensors. Its levels increase and stay below 1, starting at `lowest` (or above 0 where None)."""
    try:
        levels = torch.tensor(sec["levels"], dtype=torch.float64)
        table = torch.tensor([[layer[p] for p in PROJECTIONS] for layer in sec["layers"]], dtype=torch.float64)
    except Exception:
        raise CheckpointError(f"{path}: malformed {name} section (levels and layers must hold numbers)") from None
    if not _increasing(levels, lowest):
        start = f"from {lowest}" if lowest is not None else "above 0"
        raise CheckpointError(f"{path}: malformed {name} section: levels must increase {start} and stay below 1")
    if table.shape != (config.n_layer, len(PROJECTIONS), len(levels)):
        raise CheckpointError(f"{path}: malformed {name} section: table of shape {tuple(table.shape)}, expected "
                              f"({config.n_layer}, {len(PROJECTIONS)}, {len(levels)})")
    return levels, table


def _increasing(levels: torch.Tensor, lowest) -> bool:
    """A sparsity grid: 1-D, increasing, below 1, starting at `lowest` (above 0 where None). NaN fails each test."""
    if levels.dim() != 1 or len(levels) == 0:
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


def projection_sparsities(cal: dict, sparsity: float, greedy: bool) -> torch.Tensor:
    """(n_layer, 7) sparsity per projection: uniform, or the greedy allocation for that block sparsity."""
    check_sparsity(sparsity)
    n_layer = cal["table"].shape[0]
    if not greedy:
        return torch.full((n_layer, len(PROJECTIONS)), float(sparsity), dtype=torch.float64)
    if cal["greedy"] is None:
        raise CheckpointError(f"{cal['path']} has no greedy allocation (run calibrate.py --greedy)")
    g = cal["greedy"]
    glev = g["levels"]
    if sparsity > glev[-1]:
        raise CheckpointError(f"greedy allocation covers sparsity up to {glev[-1].item():.2f}, asked {sparsity}")
    x = torch.full(g["table"].shape[:2], float(sparsity), dtype=torch.float64)
    return interp(glev, g["table"], x)


def thresholds_for(cal: dict, sparsity: float, greedy: bool = False) -> torch.Tensor:
    """(n_layer, 7) fp32 thresholds that drop `sparsity` of every projection's input (per its own level).
    Uniform levels covered by a sparse_aware table come from it (thresholds interpolated between its levels)."""
    s = projection_sparsities(cal, sparsity, greedy)
    sa = cal.get("sparse_aware")
    if not greedy and sa is not None and sparsity <= sa["levels"][-1]:
        return interp(sa["levels"], sa["table"], s).float()
    return interp(cal["levels"], cal["table"], s).float()


def cats_thresholds_for(cal: dict, sparsity: float) -> torch.Tensor:
    """(n_layer,) fp32 |silu(gate)| thresholds for the CATS baseline."""
    check_sparsity(sparsity)
    if cal["cats"] is None:
        raise CheckpointError(f"{cal['path']} has no CATS table (re-run calibrate.py)")
    x = torch.full((cal["cats"].shape[0],), float(sparsity), dtype=torch.float64)
    return interp(cal["levels"], cal["cats"], x).float()


def check_sparsity(sparsity: float) -> None:
    if not (0.0 <= sparsity < 1.0):  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
