"""Perplexity on held-out text at several TEAL sparsity levels, with the sparsity actually achieved.

    python scripts/eval_ppl.py --checkpoint checkpoints/smollm2-135m/model.pth --sparsity 0,0.25,0.4,0.5,0.65
    python scripts/eval_ppl.py ... --method uniform,greedy,weighted,greedy+weighted,cats --json r.json --plot r.png

Text is cut into --seq_len windows, each scored on its own. Every token is masked as decode masks it (one token
per row, thresholds per projection), through the same sparse_linear code path; 0 is the dense model.
Methods: uniform (TEAL: one level for all 7 projections, the dense activations' quantiles in thresholds.json),
sparse_aware (uniform with the table of calibrate.py --sparse_aware, which generate.py uses where the file has
one), greedy (per-projection levels from calibrate.py --greedy; the level is the parameter-weighted block
sparsity), weighted (|x|*||W col|| scores, thresholds_weighted.json), sparse_aware+weighted, greedy+weighted, cats
(only the MLP's silu(gate) output is thresholded).
"""
import functools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import textdata  # noqa: E402
import thresholds as thr_file  # noqa: E402
from checkpoint import check_output, load_config, load_model  # noqa: E402
from model import DTYPES, PROJECTIONS, FeedForward, Transformer, drop_counts, model_bytes  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

FEW_TOKENS = 1024  # fewer tokens than this to score: a warning
METHODS = ("uniform", "sparse_aware", "greedy", "weighted", "sparse_aware+weighted", "greedy+weighted", "cats")


@torch.no_grad()
def perplexity(model: Transformer, ids: list, seq_len: int, batch: int = 4) -> tuple:
    """(perplexity, (n_layer, 7, 4) drop counts (model.drop_counts), tokens predicted) over non-overlapping windows
    of ids; every token but each window's first is predicted."""
    device = model.output.weight.device
    windows = [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len)]
    full = [w for w in windows if len(w) == seq_len]
    groups = [full[i:i + batch] for i in range(0, len(full), batch)]
    groups += [[w] for w in windows if 1 < len(w) < seq_len]  # the shorter last window runs alone, uncut
    model.setup_caches(batch, seq_len)
    model.start_stats()
    nll, count = 0.0, 0
    for group in groups:
        L = len(group[0])
        x = torch.tensor(group, device=device)
        logits = model(x, torch.arange(L, device=device))
        if not torch.isfinite(logits).all():
            raise FloatingPointError("non-finite logits")
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += x[:, 1:].numel()
    if nll / count > math.log(sys.float_info.max):  # finite logits, yet predictions no working model makes
        raise FloatingPointError(f"the perplexity overflows: a mean loss of {nll / count:.0f} nats per token (a broken "
                                 f"checkpoint?)")
    return math.exp(nll / count), model.pop_stats(), count


def cats_forward(ff: FeedForward, threshold: Tensor, x: Tensor, thr: Tensor, sparse: bool, stats=None, kept=None):
    """FeedForward.forward for CATS (Lee et al. 2024), a baseline: only silu(gate) is thresholded; up and down
    skip its dropped rows."""
    a = F.silu(ff.w1(x))
    keep = a.abs() > threshold
    if stats is not None:
        stats[5:7] += drop_counts(keep, stats.dtype)
    return ff.w2(torch.where(keep, a * ff.w3(x), 0))


def score_of(method: str) -> str:
    """The thresholds file a method reads: weighted scores or magnitudes."""
    return "weighted" if "weighted" in method else "magnitude"


def configure(model: Transformer, method: str, sparsity: float, cals: dict) -> None:
    """Dense for sparsity 0; otherwise masks per the method, applied to every token (sparse prefill)."""
    for b in model.layers:
        b.feed_forward.__dict__.pop("forward", None)  # back to FeedForward.forward
    model.set_scores(False)
    model.set_sparse(decode=False, prefill=False)
    if sparsity == 0:
        return
    if method == "cats":
        t = thr_file.cats_thresholds_for(cals["magnitude"], sparsity).to(model.output.weight.device)
        for b, tl in zip(model.layers, t):
            b.feed_forward.forward = functools.partial(cats_forward, b.feed_forward, tl)
        return
    thr_file.apply(model, cals[score_of(method)], sparsity, greedy="greedy" in method, prefill=True,
                   sparse_aware="sparse_aware" in method)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", "--checkpoint_path", type=Path, required=True,
                   help="checkpoints/<name>/model.pth (config.json beside it); --checkpoint_path is gpt-fast's name")
    p.add_argument("--sparsity", type=cli.sparsities, default="0,0.25,0.4,0.5,0.65",
                   help="comma-separated levels in [0, 1)")
    p.add_argument("--method", default="uniform", help=f"comma-separated, from {', '.join(METHODS)}")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", type=Path, help="UTF-8 text file (default: --corpus)")
    src.add_argument("--corpus", choices=["pydoc-heldout", "stdlib-docstrings"], default="pydoc-heldout",
                     help="built-in text: the held-out part of pydoc_data.topics, or docstrings of stdlib modules "
                          "(a second text the calibration never saw)")
    p.add_argument("--max_tokens", type=cli.at_least(2), default=None, help="evaluate only the first N tokens (default: all)")
    p.add_argument("--seq_len", type=cli.at_least(2), default=None, help=f"window length {cli.SEQ_LEN_DEFAULT}")
    p.add_argument("--thresholds", type=Path, help="magnitude thresholds JSON (default: thresholds.json beside "
                                                   "the checkpoint; a file named here is checked even where every "
                                                   "level is 0)")
    p.add_argument("--weighted_thresholds", type=Path,
                   help="weighted-score thresholds JSON (default: thresholds_weighted.json beside the checkpoint)")
    p.add_argument("--device", type=cli.device, default=cli.default_device(), help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help=cli.DTYPE_HELP + "; as generate.py decodes")
    p.add_argument("--json", type=cli.out_file, help="write results here")
    p.add_argument("--plot", type=cli.plot_file,
                   help="write a plot of perplexity against sparsity here (.png, .pdf, .svg, ...)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or cli.default_dtype(args.device)
    args.method = args.method.split(",")
    bad = [m for m in args.method if m not in METHODS]
    if bad:
        p.error(f"unknown --method {bad[0]!r} (choose from {', '.join(METHODS)})")
    if len(set(args.method)) < len(args.method):  # as --sparsity: a typo that would run a method twice
        p.error(f"--method {','.join(args.method)}: a method is repeated")
    args.scores = {score_of(m) for m in args.method}  # the thresholds files the methods read
    # a file that no method reads would be ignored without a word
    if args.weighted_thresholds and "weighted" not in args.scores:
        p.error("--weighted_thresholds needs a weighted --method (weighted, sparse_aware+weighted or greedy+weighted)")
    if args.thresholds and "magnitude" not in args.scores:
        p.error("--thresholds needs a magnitude --method (uniform, sparse_aware, greedy or cats)")
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    config = load_config(args.checkpoint)  # inputs checked against it before the weights load
    for out, flag in ((args.json, "--json"), (args.plot, "--plot")):
        check_output(out, args.checkpoint, flag, inputs=[args.thresholds, args.weighted_thresholds, args.text],
                     outputs={"--json": args.json} if flag == "--plot" else None)
    args.seq_len = cli.seq_len(args.seq_len, config)
    tokenizer = get_tokenizer(args.checkpoint.parent)
    if args.text:
        text, source = textdata.read_text_file(args.text), str(args.text)
    else:
        text = textdata.heldout_text() if args.corpus == "pydoc-heldout" else textdata.docstring_text()
        source = args.corpus
    ids = textdata.encode_head(tokenizer, text, args.max_tokens)
    if len(ids) < 2:
        raise ValueError(f"{source} has {len(ids)} token(s); perplexity needs at least 2")
    cals = {}
    sparse = any(s > 0 for s in args.sparsity)  # the dense model needs no thresholds; a file named is checked
    if (sparse and "magnitude" in args.scores) or args.thresholds:
        cals["magnitude"] = thr_file.load(args.thresholds or thr_file.default_path(args.checkpoint), config)
    if (sparse or args.weighted_thresholds) and "weighted" in args.scores:
        cals["weighted"] = thr_file.load(args.weighted_thresholds or thr_file.default_path(args.checkpoint, "weighted"),
                                         config)
    for score, cal in cals.items():  # each file must hold the scores its flag names
        if cal["score"] != score:
            flag = "--weighted_thresholds" if score == "weighted" else "--thresholds"
            raise ValueError(f"{cal['path']} holds {cal['score']} scores; {flag} takes {score} ones")
    for method in args.method:  # every method's table read at every level: a missing one fails before any work
        for s in (s for s in args.sparsity if s > 0):
            if method == "cats":
                thr_file.cats_thresholds_for(cals["magnitude"], s)
            elif "sparse_aware" in method:
                cal = cals[score_of(method)]
                sa = cal.get("sparse_aware")
                if sa is None:
                    raise ValueError(f"{cal['path']} has no sparse_aware table (calibrate.py --sparse_aware)")
                thr_file.check_sparsity(s, sa["levels"], "sparse_aware table")
            else:
                thr_file.thresholds_for(cals[score_of(method)], s, "greedy" in method)
    model = load_model(args.checkpoint, device=cli.use_device(args.device), dtype=DTYPES[args.dtype])
    _, linear_bytes = model_bytes(model)
    results = []
    dense = None
    if len(ids) < FEW_TOKENS:  # after every check: a refused run stays one error line
        print(f"warning: {len(ids)} tokens: perplexity and achieved sparsity over so few are noisy (--max_tokens, "
              f"--text)", file=sys.stderr)
    w = max(len("method"), *map(len, args.method))  # the column fits the longest name asked for
    print(f"{'method':{w}s} {'sparsity':>8s} {'achieved':>8s} {'ppl':>9s}   per projection (q k v o gate up down)")
    for method in args.method:
        for s in args.sparsity:
            if s == 0 and dense is not None:
                ppl, ach, per = dense
            else:
                configure(model, method, s, cals)
                ppl, stats, predicted = perplexity(model, ids, args.seq_len)
                tot = stats[..., 1].sum(0)
                per = (stats[..., 0].sum(0) / tot.clamp_min(1)).tolist()
                ach = float((torch.tensor(per, dtype=torch.float64) * linear_bytes).sum() / linear_bytes.sum())
                if s == 0:
                    dense = (ppl, ach, per)
            results.append({"method": method, "sparsity": s, "achieved_sparsity": round(ach, 5),
                            "achieved_per_projection": dict(zip(PROJECTIONS, [round(v, 5) for v in per])),
                            "ppl": round(ppl, 5), "tokens": len(ids)})
            print(f"{method:{w}s} {s:8.2f} {ach:8.3f} {ppl:9.4f}   " + " ".join(f"{v:.3f}" for v in per), flush=True)
    configure(model, "uniform", 0, cals)
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "text": source, "python": sys.version.split()[0],
                                         "tokens": len(ids), "predicted": predicted, "seq_len": args.seq_len,
                                         "dtype": args.dtype,
                                         "results": results}, indent=1))
    if args.plot:
        plot(results, args.plot, f"{args.checkpoint.parent.name}, {len(ids)} tokens of {source}")
    return results


def plot(results: list, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["method"] for r in results):
        rs = [r for r in results if r["method"] == m]
        ax.plot([r["achieved_sparsity"] for r in rs], [r["ppl"] for r in rs], marker="o", label=m)
    ax.set_xlabel("achieved parameter-weighted sparsity of the block linears")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    cli.run(main)
