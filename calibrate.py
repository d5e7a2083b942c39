"""Calibrate TEAL thresholds: run the dense model over calibration text, record the distribution of every block
linear's input scores, and write per layer and per projection the threshold for each sparsity level.

    python calibrate.py --checkpoint checkpoints/smollm2-135m/model.pth            # -> thresholds.json beside it
    python calibrate.py --checkpoint ... --score weighted --greedy     # weighted scores, per-projection levels

The four distinct inputs of a block are the attention input (q, k, v), the attention output (o), the MLP input
(gate, up) and the down-projection input. Scores are |x| ("magnitude", TEAL) or |x_i| * ||W[:, i]||_2
("weighted"), the latter per projection. Quantiles come from a seeded uniform sample of about --samples scores
per layer and projection (the same number from each window, rounded up), so any sparsity's threshold is read off
the stored grid.
"""
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import textdata
import thresholds as thr_file
from checkpoint import check_output, load_config, load_model
from model import DTYPES, PROJECTIONS, Transformer, restored
from tokenizer import get_tokenizer

FEW_TOKENS = 1024  # fewer calibration tokens than this: a warning
LEVELS = [i / 200 for i in range(200)] + [0.999]  # sparsity grid: 0, 0.005, ..., 0.995, 0.999


class InputRecorder:
    """Forward pre-hooks on the block linears: keep a seeded random sample of each projection's input scores.

    The model must run dense prefill (two or more tokens per row): that path calls the nn.Linear modules
    themselves (model.sparse_linear), so their hooks see the exact inputs the sparse kernels will threshold.
    Weighted scores use the model's own column norms (model.set_scores).
    """

    def __init__(self, model: Transformer, per_call: int, seed: int = 0):
        self.samples = [[[] for _ in PROJECTIONS] for _ in model.layers]
        self.cats = [[] for _ in model.layers]  # |silu(gate)|, for the CATS baseline
        self.per_call = per_call
        self.gen = torch.Generator().manual_seed(seed)
        self.handles = []
        for l, b in enumerate(model.layers):
            a, f = b.attention, b.feed_forward
            # q, k, v share one input, as do gate and up (w3 is called on w1's): one sample of positions each, so
            # magnitude scores give them one threshold
            for lin, projs, norms in [(a.wqkv, (0, 1, 2), a.qkv_scale), (a.wo, (3,), a.o_scale),
                                      (f.w1, (4, 5), f.w13_scale), (f.w2, (6,), f.w2_scale)]:
                self.handles.append(lin.register_forward_pre_hook(self._hook(l, projs, norms)))
            self.handles.append(f.w1.register_forward_hook(self._cats_hook(l)))

    def _cats_hook(self, layer):
        def hook(module, inputs, out):
            a = torch.nn.functional.silu(out.detach().float()).abs().flatten()
            self.cats[layer].append(a[self._pick(a)].cpu())
        return hook

    def _hook(self, layer, projs, norms):
        def hook(module, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"non-finite activations at layer {layer} ({PROJECTIONS[projs[0]]} input)")
            idx = self._pick(x)
            for j, p in enumerate(projs):
                score = x.abs() if norms is None else x.abs() * norms[j]
                self.samples[layer][p].append(score.flatten()[idx].cpu())
        return hook

    def _pick(self, x: torch.Tensor):
        """Which of x's (flattened) values to keep: per_call drawn at random, or all of them where that is no more."""
        if self.per_call >= x.numel():
            return slice(None)
        return torch.randint(0, x.numel(), (self.per_call,), generator=self.gen).to(x.device)

    def remove(self):
        for h in self.handles:
            h.remove()

    def table(self) -> torch.Tensor:
        """(n_layer, 7, len(LEVELS)) quantiles of the sampled scores; level 0 keeps everything."""
        q = torch.tensor(LEVELS, dtype=torch.float64)
        out = torch.stack([torch.stack([quantiles(torch.cat(s).double(), q) for s in layer]) for layer in self.samples])
        out[..., 0] = 0.0
        return out

    def cats_table(self) -> torch.Tensor:
        """(n_layer, len(LEVELS)) quantiles of |silu(gate)|."""
        q = torch.tensor(LEVELS, dtype=torch.float64)
        out = torch.stack([quantiles(torch.cat(s).double(), q) for s in self.cats])
        out[..., 0] = 0.0
        return out


def quantiles(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """torch.quantile limits its input size; sort once instead (linear interpolation, like numpy's default)."""
    xs, _ = torch.sort(x)
    pos = q * (len(xs) - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def calibration_tokens(args, tokenizer) -> tuple:
    if args.text:
        text, source = textdata.read_text_file(args.text), str(args.text)
    elif args.dataset:
        text = textdata.load_hub_text(args.dataset, args.dataset_file, args.text_column, args.tokens * 8)
        source = f"hf-dataset:{args.dataset}/{args.dataset_file}"
    else:
        text, source = textdata.calibration_text(), "pydoc_data.topics (calibration split)"
    ids = textdata.encode_head(tokenizer, text, args.tokens)
    if len(ids) < args.seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than --seq_len {args.seq_len}")
    return ids, source


def windows(ids: list, seq_len: int) -> list:
    """Consecutive seq_len-token windows of ids; the remainder is dropped."""
    return [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


@torch.no_grad()
def record(model: Transformer, ids: list, seq_len: int, score: str, samples: int, device, progress=True,
           seed: int = 0) -> tuple:
    """Run the dense model over ids in seq_len windows. Returns (the (n_layer, 7, levels) threshold table, tokens
    used, the InputRecorder with its samples)."""
    if seq_len < 2:
        raise ValueError(f"calibration windows need at least 2 tokens, got {seq_len}")
    chunks = windows(ids, seq_len)
    with restored(model):
        model.set_sparse(False, False)
        model.set_scores(score == "weighted")
        rec = InputRecorder(model, per_call=-(-samples // len(chunks)), seed=seed)
        model.setup_caches(1, seq_len)
        try:
            for c in tqdm(chunks, desc="calibrating", unit="chunk", disable=not progress, file=sys.stderr):
                model(torch.tensor([c], device=device), torch.arange(len(c), device=device))
        finally:
            rec.remove()
    return rec.table(), len(chunks) * seq_len, rec


@torch.no_grad()
def sparse_aware(model: Transformer, ids: list, seq_len: int, table: torch.Tensor, anchors: list, score: str,
                 device, iters: int = 2, progress=True) -> torch.Tensor:
    """(n_layer, 7, len(anchors)) thresholds that hit each anchor level on the sparse model's own activations.

    The table holds quantiles of dense activations; under sparse decode each layer sees the sparse layers before it,
    and the o and down inputs drift above the requested level. Per anchor: run the model sparse (every token masked
    as decode masks it), measure each projection's dropped fraction, and move that projection's quantile level by
    the miss; `iters` rounds. Each anchor is corrected on its own sparse model, so anchors closer than the
    correction's noise could cross: a projection's threshold at an anchor is raised to its threshold at the anchor
    before (thresholds.load refuses thresholds that fall as the sparsity rises).
    """
    levels = torch.tensor(LEVELS, dtype=torch.float64)
    n_layer = table.shape[0]
    chunks = windows(ids, seq_len)
    out = []
    with restored(model):
        model.set_scores(score == "weighted")
        model.set_sparse(decode=True, prefill=True)
        model.setup_caches(1, seq_len)
        for s in tqdm(anchors, desc="sparse-aware levels", disable=not progress, file=sys.stderr):
            lev = torch.full((n_layer, len(PROJECTIONS)), float(s), dtype=torch.float64)
            for _ in range(iters):
                model.set_thresholds(thr_file.interp(levels, table, lev).float().to(device))
                model.start_stats()
                for c in chunks:
                    model(torch.tensor([c], device=device), torch.arange(len(c), device=device))
                stats = model.pop_stats()
                lev = (lev + s - stats[..., 0] / stats[..., 1]).clamp(0.0, LEVELS[-1])
            out.append(thr_file.interp(levels, table, lev))
    return torch.stack(out, dim=-1).cummax(dim=-1).values


def plot(rec: InputRecorder, path: Path, title: str, score: str) -> None:
    """Score histograms of the first, middle and last layers: one panel per distinct linear input for magnitudes
    (q/k/v and gate/up score the same |x|), one per projection for weighted scores (each its own column norms)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(rec.samples)
    layers = sorted({0, n // 2, n - 1})
    if score == "magnitude":
        panels = list(zip((0, 3, 4, 6), ("attention input (q/k/v)", "attention output (o)", "MLP input (gate/up)",
                                         "down input")))
    else:
        panels = [(p, f"{name} input") for p, name in enumerate(PROJECTIONS)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (p, name) in zip(axes, panels):
        for l in layers:
            v = torch.cat(rec.samples[l][p]).numpy()
            hi = float(torch.quantile(torch.from_numpy(v[:1_000_000]), 0.995))
            ax.hist(v, bins=200, range=(0, hi), histtype="step", density=True, label=f"layer {l}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("score")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


TOKENS_DEFAULT = 16384
WIKITEXT = "Salesforce/wikitext"
PASS_DEFAULTS = {"dataset_file": "wikitext-2-raw-v1/train-00000-of-00001.parquet", "text_column": "text",
                 "greedy_tokens": 2048, "sparse_aware_levels": [i / 20 for i in range(1, 19)],
                 "sparse_aware_tokens": 4096}


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", "--checkpoint_path", type=Path, required=True,
                   help="checkpoints/<name>/model.pth (config.json beside it); --checkpoint_path is gpt-fast's name")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", type=Path, help="calibrate on this UTF-8 text file "
                                               "(default: the calibration part of pydoc_data.topics)")
    src.add_argument("--dataset", help="a Hugging Face dataset repo id, e.g. Salesforce/wikitext (needs network)")
    # The flags of an optional pass default to None here, so that one given without its pass is told apart (and
    # refused) whatever argparse abbreviation spelt it; PASS_DEFAULTS fills them in afterwards.
    p.add_argument("--dataset_file", help="file inside --dataset: .parquet, .jsonl, .json or .txt (needed but for "
                                          f"{WIKITEXT}, whose default is {PASS_DEFAULTS['dataset_file']})")
    p.add_argument("--text_column", help=f"column holding the text in --dataset_file (default: "
                                         f"{PASS_DEFAULTS['text_column']})")
    p.add_argument("--tokens", type=cli.at_least(1),
                   help="calibration tokens, rounded down to whole --seq_len windows (default: "
                        f"{TOKENS_DEFAULT}, or one window where --seq_len is longer)")
    p.add_argument("--seq_len", type=cli.at_least(2), default=None,
                   help=f"tokens per forward pass {cli.SEQ_LEN_DEFAULT}")
    p.add_argument("--samples", type=cli.at_least(1000), default=500_000,
                   help="scores sampled per layer and projection for the quantiles (at least 1000)")
    p.add_argument("--score", choices=thr_file.SCORES, default="magnitude",
                   help="magnitude: |x| (TEAL); weighted: |x_i| * ||W[:, i]||_2 per projection")
    p.add_argument("--greedy", action="store_true",
                   help="also search per-projection sparsities per block (greedy allocation, see README)")
    p.add_argument("--greedy_tokens", type=cli.at_least(1),
                   help="calibration tokens used by the greedy search: the first of the --tokens (at least --seq_len; "
                        f"default: {PASS_DEFAULTS['greedy_tokens']}, or one window where --seq_len is longer)")
    p.add_argument("--sparse_aware", action="store_true",
                   help="also correct the uniform thresholds so each projection hits its level on the sparse "
                        "model's own activations (each layer sees the sparse layers before it); generate.py uses "
                        "them for uniform --sparsity up to the last of --sparse_aware_levels")
    p.add_argument("--sparse_aware_levels", type=cli.sparsities,
                   help="comma-separated, increasing sparsity levels in (0, 1) for --sparse_aware "
                        "(default: 0.05,0.1,...,0.9)")
    p.add_argument("--sparse_aware_tokens", type=cli.at_least(1),
                   help="calibration tokens used by --sparse_aware: the first of the --tokens (at least --seq_len; "
                        f"default: {PASS_DEFAULTS['sparse_aware_tokens']}, or one window where --seq_len is longer)")
    p.add_argument("--out", type=cli.out_file, help="output JSON (default: thresholds.json beside the checkpoint, "
                                            "thresholds_weighted.json for --score weighted)")
    p.add_argument("--plot", type=cli.plot_file,
                   help="also write a plot of the score distributions here (.png, .pdf, .svg, ...)")
    p.add_argument("--device", type=cli.device, default=cli.default_device(), help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help=cli.DTYPE_HELP)
    p.add_argument("--seed", type=cli.seed, default=0, help="seed of the score sampling and the greedy search")
    args = p.parse_args(argv)
    args.dtype = args.dtype or cli.default_dtype(args.device)
    # token budgets given: set_seq_len refuses one below a window, and raises a default to one window
    args.given = {f for f in ("tokens", "greedy_tokens", "sparse_aware_tokens") if getattr(args, f) is not None}
    args.tokens = TOKENS_DEFAULT if args.tokens is None else args.tokens
    if args.dataset and args.dataset.lower() not in (WIKITEXT.lower(), "wikitext") and args.dataset_file is None:
        p.error(f"--dataset {args.dataset} needs --dataset_file (the default file is {WIKITEXT}'s)")
    # A flag whose pass is off would be ignored without a word (and a default calibration overwrite the file)
    for flag, needs in (("dataset_file", "dataset"), ("text_column", "dataset"), ("greedy_tokens", "greedy"),
                        ("sparse_aware_levels", "sparse_aware"), ("sparse_aware_tokens", "sparse_aware")):
        if getattr(args, flag) is not None and not getattr(args, needs):
            p.error(f"--{flag} needs --{needs}")
        if getattr(args, flag) is None:
            setattr(args, flag, PASS_DEFAULTS[flag])
    lv = args.sparse_aware_levels
    if not all(a < b for a, b in zip([0.0] + lv, lv)) or lv[-1] >= 1:
        p.error("--sparse_aware_levels must increase within (0, 1)")
    if args.dataset:
        try:
            textdata.check_file_type(args.dataset_file)
        except ValueError as e:
            p.error(f"--dataset_file: {e}")
    return args


def replaced_sections(out: Path, args) -> list:
    """The optional sections of an existing thresholds file at `out` that this run's flags do not compute again."""
    try:
        data = json.loads(out.read_text())
    except (OSError, ValueError, RecursionError):  # no file, or one that is not JSON: nothing of value is replaced
        return []
    if not isinstance(data, dict):
        return []
    return [f"a {name} section (--{name})" for name, on in (("greedy", args.greedy), ("sparse_aware", args.sparse_aware))
            if data.get(name) is not None and not on]


def token_budgets(args) -> list:
    """The token-budget flags of the passes this run makes."""
    return ["tokens"] + ["greedy_tokens"] * args.greedy + ["sparse_aware_tokens"] * args.sparse_aware


def set_seq_len(args, config) -> None:
    """args.seq_len for a model of this context (cli.seq_len); each token budget must hold one window of it: a
    default that does not is raised to one window."""
    args.seq_len = cli.seq_len(args.seq_len, config)
    for flag in token_budgets(args):
        if getattr(args, flag) < args.seq_len:
            if flag in args.given:
                raise ValueError(f"--{flag} must be at least --seq_len ({args.seq_len})")
            setattr(args, flag, args.seq_len)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = cli.use_device(args.device)
    config = load_config(args.checkpoint)  # flags and text checked against it before the weights load
    default_out = thr_file.default_path(args.checkpoint, args.score)
    out = args.out or default_out
    if args.out is None:  # --out was checked as it was parsed; the default beside the checkpoint may be read-only
        cli.writable(out)
    check_output(out, args.checkpoint, "--out", allowed=(default_out.name,), inputs=[args.text])
    check_output(args.plot, args.checkpoint, "--plot", inputs=[args.text], outputs={"--out": out})
    set_seq_len(args, config)
    tokenizer = get_tokenizer(args.checkpoint.parent)
    ids, source = calibration_tokens(args, tokenizer)
    for flag in token_budgets(args):
        if flag in args.given and getattr(args, flag) > len(ids):  # a pass runs on the first tokens
            print(f"note: --{flag} {getattr(args, flag)}: the calibration has {len(ids)} tokens"
                  + ("" if flag == "tokens" else ", all of which the pass uses"), file=sys.stderr)
    replaced = replaced_sections(out, args)
    if replaced:  # the slow passes: a plain re-run would drop them without a word
        print(f"note: {out} holds {' and '.join(replaced)} that this run does not compute: the new file will not "
              f"have {'them' if len(replaced) > 1 else 'it'}", file=sys.stderr)
    model = load_model(args.checkpoint, device=device, dtype=DTYPES[args.dtype])
    t = time.perf_counter()
    table, n_tokens, rec = record(model, ids, args.seq_len, args.score, args.samples, device, seed=args.seed)
    greedy = None
    if args.greedy:
        import greedy as greedy_search
        greedy = greedy_search.search(model, ids[:args.greedy_tokens], args.seq_len, table, LEVELS, args.score,
                                      seed=args.seed)
    corrected = None
    if args.sparse_aware:
        t_sa = sparse_aware(model, ids[:args.sparse_aware_tokens], args.seq_len, table, args.sparse_aware_levels,
                            args.score, device)
        corrected = {"levels": args.sparse_aware_levels, "table": t_sa}
    if n_tokens < FEW_TOKENS:
        print(f"warning: {n_tokens} calibration tokens: the quantiles of so few scores are noisy (--tokens)",
              file=sys.stderr)
    thr_file.save(out, model.config, LEVELS, table, source, n_tokens, args.score, greedy, rec.cats_table(), corrected)
    print(f"calibrated on {n_tokens} tokens of {source} in {time.perf_counter() - t:.1f}s -> {out}")
    if args.plot:
        plot(rec, args.plot, f"{args.checkpoint.parent.name}: input scores ({args.score}), {n_tokens} tokens",
             args.score)
        print(f"plot -> {args.plot}")


if __name__ == "__main__":
    cli.run(main)
