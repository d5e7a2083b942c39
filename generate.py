"""Decode with a Llama-family model, optionally with TEAL activation sparsity (gpt-fast's command line).

    python generate.py --checkpoint checkpoints/smollm2-135m/model.pth --prompt "Hello" --sparsity 0.4

Prefill runs once over the prompt (dense unless --sparse_prefill); decode runs one token at a time, compiled
with CUDA graphs when --compile is given on a GPU. With --sparsity > 0 every block linear reads only the weight
columns whose input survives the calibrated threshold (thresholds.json beside the checkpoint, from calibrate.py).
"""
import contextlib
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import cli
import sparse_ops
import thresholds as thr_file
from checkpoint import check_output, load_config, load_model
from model import DTYPES, PROJECTIONS, ModelArgs, Transformer, model_bytes, restored
from tokenizer import get_tokenizer


def argmax(x: Tensor, chunk: int = 1024) -> Tensor:
    """torch.argmax(x, dim=-1, keepdim=True) for x (B, V), the first maximum included, in two reductions: each
    chunk's max, then the best chunk. Compiled, one reduction over a 128K vocabulary runs on one SM (28 us per
    decode step on an H100); these two run on many (3.6 us in all, docs/benchmarks.md)."""
    B, V = x.shape
    n = -(-V // chunk)
    vals, idx = F.pad(x, (0, n * chunk - V), value=float("-inf")).view(B, n, chunk).max(dim=-1)
    best = vals.argmax(dim=-1, keepdim=True)
    return best * chunk + idx.gather(-1, best)


def sample(logits: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    """logits (B, V) -> next token (B, 1). temperature 0 is greedy."""
    if temperature < 1e-6:  # greedy is the limit; dividing by a tinier one overflows the logits to inf
        return argmax(logits)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = torch.where(logits < v[:, -1:], -float("inf"), logits)
    probs = torch.softmax(logits, dim=-1)
    # Exponential-race sampling: same distribution as multinomial, with no host sync.
    return argmax(probs / torch.empty_like(probs).exponential_(1))


def decode_one_token(model: Transformer, cur: Tensor, input_pos: Tensor, temperature: float,
                     top_k: Optional[int], is_prefill: bool = False):
    """cur (B, T) at positions input_pos (T,) -> the token after the last one (B, 1), and whether all logits were
    finite. Decode calls it with T = 1 (compiled with --compile); prefill once over the prompt."""
    logits = model(cur, input_pos, prefill=is_prefill)[:, -1]
    return sample(logits, temperature, top_k), torch.isfinite(logits).all()


def prefill(model: Transformer, prompt: Tensor, input_pos: Tensor, temperature: float, top_k: Optional[int]):
    """decode_one_token over the whole prompt, with the prefill's sparsity (dense unless --sparse_prefill) even
    for a prompt of one token: a function of its own, so that --compile_prefill compiles it apart from decode,
    its length dynamic (one compile serves every prompt of two or more tokens; generate() prefills one eagerly)."""
    return decode_one_token(model, prompt, input_pos, temperature, top_k, is_prefill=True)


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, decode_fn, temperature: float = 0.0,
             top_k: Optional[int] = None, stop_ids=(), on_token=None, prefill_fn=prefill, cached: int = 0) -> Tensor:
    """prompt (B, T). Returns (B, T + n), n <= max_new_tokens the tokens decoded: it stops early once every row
    hit a stop id, checked every step when streaming, else every 16 steps (a host sync), so up to 15 steps past
    the last stop may be decoded, timed and counted; the text shown ends at each row's stop. cached (< T): the
    KV cache holds the prompt's first `cached` positions already (a conversation's earlier turns), so the prefill
    runs over the rest."""
    B, T = prompt.shape
    device = prompt.device
    seq = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)
    seq[:, :T] = prompt
    # a copy with its own strides: a slice keeps the prompt's row stride, T, which --compile_prefill's graph would
    # guard on (a second compile for the first turn with cached positions)
    new = prompt[:, cached:].clone(memory_format=torch.contiguous_format)
    positions = torch.arange(cached, T, device=device)
    if T - cached > 1:  # --compile_prefill: the length alone is symbolic, so that no other size equal to it by
        # chance (the batch, RoPE's cos|sin, a threshold count) shares its symbol and a later length recompiles
        torch._dynamo.mark_dynamic(new, 1)
        torch._dynamo.mark_dynamic(positions, 0)
    # one token runs eagerly: dynamo specialises a dim of size 1, so a compiled prefill would compile a second
    # graph for it (a minute on a GPU) to save milliseconds
    tok, finite = (prefill_fn if T - cached > 1 else prefill)(model, new, positions, temperature, top_k)
    seq[:, T:T + 1] = tok
    all_finite = finite
    stop = torch.tensor(list(stop_ids) or [-1], device=device)
    done = torch.isin(tok[:, 0], stop)
    n = 1
    pos = torch.tensor([T], device=device)  # advanced on the device: no host-to-device copy per step
    for i in range(1, max_new_tokens):
        if on_token is not None:
            on_token(seq[:, :T + n])
        if (on_token is not None or i % 16 == 0) and bool(done.all()):  # a host sync: every step only if streaming
            break
        tok, finite = decode_fn(model, tok.clone(), pos, temperature, top_k)
        pos += 1
        seq[:, T + i:T + i + 1] = tok
        all_finite = all_finite & finite
        done = done | torch.isin(tok[:, 0], stop)
        n += 1
    if not bool(all_finite):
        raise FloatingPointError("the model produced NaN or infinite logits (activations overflowed?)")
    return seq[:, :T + n]


@torch.no_grad()
def achieved_sparsity(model: Transformer, prompt_len: int, seq: Tensor, prompt_cached: bool = False) -> Tensor:
    """(2, 7) per projection on the decode steps of `seq`: the fraction of inputs dropped, then the fraction of
    weight rows skipped (those no batch row keeps; the same for one row). Measured by replaying the steps: the
    prompt as prefill ran it (prompt_cached: the KV cache holds it still, as right after generate(), whose decode
    writes only past the prompt), then the generated tokens with their per-token masks, as decode ran them. The
    cache positions it writes are put back as they were: a chat's next turn reuses decode's own keys and values,
    and the replay, one multi-token forward, rounds differently (enough to flip a keep decision at its threshold)."""
    B, L = seq.shape
    if L <= prompt_len + 1:
        return torch.zeros(2, len(PROJECTIONS))
    dev = seq.device
    first = prompt_len if prompt_cached else 0
    caches = [b.attention.kv_cache for b in model.layers]
    saved = [(c.k_cache[:B, :, first:L - 1].clone(), c.v_cache[:B, :, first:L - 1].clone()) for c in caches]
    with restored(model):
        if not prompt_cached:
            model(seq[:, :prompt_len], torch.arange(prompt_len, device=dev), prefill=True)
        model.set_sparse(decode=True, prefill=True)
        model.start_stats()
        model(seq[:, prompt_len:L - 1], torch.arange(prompt_len, L - 1, device=dev))
        c = model.pop_stats().sum(0)
    for cache, (k, v) in zip(caches, saved):
        cache.k_cache[:B, :, first:L - 1] = k
        cache.v_cache[:B, :, first:L - 1] = v
    return torch.stack([c[:, 0] / c[:, 1], c[:, 2] / c[:, 3]]).float()


def check_kernel_widths(config: ModelArgs, device: torch.device) -> None:
    """Sparse decode's kernels end an output tile where the thresholds change (q|k|v, gate|up): a model whose
    widths there are not multiples of SEGMENT_MULTIPLE is refused before it loads. The CPU's reference ops take any."""
    if not sparse_ops.use_triton(torch.empty(0, device=device)):
        return
    widths = {"q (heads x head_dim)": config.n_head * config.head_dim,
              "k and v (kv heads x head_dim)": config.n_local_heads * config.head_dim,
              "intermediate_size": config.intermediate_size}
    bad = [f"{name} {w}" for name, w in widths.items() if w % sparse_ops.SEGMENT_MULTIPLE]
    if bad:
        raise ValueError(f"sparse decode's kernels need widths that are multiples of {sparse_ops.SEGMENT_MULTIPLE}; "
                         f"this model has {', '.join(bad)} (--sparsity 0 decodes it dense)")


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes a run can still take on the device: CUDA's free memory, or a Linux CPU's MemAvailable (None elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def check_memory(config: ModelArgs, dtype: torch.dtype, device: torch.device, batch: int, seq: int) -> None:
    """Refuse, before the load, a --batch_size whose KV cache cannot fit in the device's free memory (with the causal
    mask and, on a GPU, the weights; a CPU may map those from the file): a CPU process would be killed without a
    word, and a size past any memory would overflow torch's size arithmetic with a traceback."""
    # keys and values, and the causal mask's bool per pair of positions
    need = 2 * config.n_layer * batch * config.n_local_heads * config.head_dim * seq * dtype.itemsize + seq * seq
    if device.type == "cuda":
        with torch.device("meta"):
            need += sum(p.numel() for p in Transformer(config).parameters()) * dtype.itemsize
    free = free_memory(device)
    if free is not None and need > free:
        raise ValueError(f"--batch_size {batch} with a {seq}-token KV cache needs at least {need / 1e9:.3g} GB"
                         + (" with the weights" if device.type == "cuda" else "")
                         + f", more than the {free / 1e9:.3g} GB free on the {device.type}")


def compile_decode(device: torch.device):
    """decode_one_token compiled as gpt-fast compiles it: one graph, and on a GPU CUDA graphs (mode="reduce-overhead")
    and inductor's coordinate-descent tuning, with which inductor turns a one-row linear into a GEMV of its own, fused
    with the norm before it, where cuBLAS is slower (the dense model's linears at batch 1; with sparsity, the output
    projection). docs/benchmarks.md times both baselines."""
    if device.type != "cuda":
        return torch.compile(decode_one_token, fullgraph=True)
    return torch.compile(decode_one_token, fullgraph=True,
                         options={"triton.cudagraphs": True, "coordinate_descent_tuning": True})


def load_calibration(config: ModelArgs, args) -> Optional[dict]:
    """The calibration in use, or None for the dense path (--sparsity 0). At --sparsity 0 a thresholds file that a
    flag names (--thresholds, --score, --greedy, --sparse_prefill) is still checked, so a sweep that starts dense
    fails early."""
    dense = args.sparsity == 0
    if dense and not (args.thresholds or args.score or args.greedy or args.sparse_prefill):
        return None
    path = args.thresholds or thr_file.default_path(args.checkpoint, args.score or "magnitude")
    cal = thr_file.load(path, config)
    if args.score and cal["score"] != args.score:
        raise ValueError(f"{path} holds {cal['score']} scores, not the --score {args.score} asked for")
    thr_file.thresholds_for(cal, args.sparsity, args.greedy)  # the level is in the file's range
    return None if dense else cal


def is_utf8(text: str) -> bool:
    """False for text from a terminal in another encoding: its undecodable bytes arrive as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


INTERACTIVE_CACHE = 4096  # tokens of the one cache of a compiled --interactive session (--compile or
# --compile_prefill); a 128K context's would not fit: its causal mask alone is 17 GB


BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token (sentencepiece's and HF's)

DEFAULT_PROMPT = "Hello, my name is"
DEFAULT_CHAT_PROMPT = "Hello! What can you help me with?"


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", "--checkpoint_path", type=Path, required=True,
                   help="checkpoints/<name>/model.pth (config.json beside it); --checkpoint_path is gpt-fast's name")
    p.add_argument("--prompt",
                   help=f"input text, after BOS where the tokenizer adds one (Llama-2/3, Mistral; not SmolLM2, "
                        f"Qwen2); an empty one starts from BOS, where the model has one; with --chat the user's "
                        f"turn, the template placing BOS (default: {DEFAULT_PROMPT}; with --chat: "
                        f"{DEFAULT_CHAT_PROMPT})")
    p.add_argument("--interactive", action="store_true",
                   help="read prompts from standard input instead of --prompt, one per line, each decoded as "
                        "--prompt would be (with --chat, as the next turn of one conversation), until a blank line "
                        f"or the end of the input; with --compile or --compile_prefill one cache of up to "
                        f"{INTERACTIVE_CACHE} tokens serves the session; a refused prompt (too long, not UTF-8) makes "
                        "the exit status 1 at the end")
    p.add_argument("--chat", action="store_true",
                   help="a chat model's format: the prompt is a user turn in the checkpoint's chat template "
                        "(chat_template.jinja, which the converters take from the model: its chat_template.jinja, "
                        "tokenizer_config.json or GGUF metadata), and only the reply is printed; with --interactive "
                        "one conversation, each line the next user turn after the earlier ones and their replies "
                        "(the last sample's, row 1), its oldest exchanges left out where the whole would not fit; "
                        "the KV cache keeps the last turn, so a turn prefills only where its prompt departs from it "
                        "(with one row the reply's keys and values are decode's own, sparse with --sparsity)")
    p.add_argument("--system", default=None,
                   help="with --chat, a system turn that opens the conversation (default: none, but what the "
                        "template adds itself)")
    p.add_argument("--max_new_tokens", type=cli.at_least(1), default=200, help="tokens to generate per sample")
    p.add_argument("--num_samples", type=cli.at_least(1), default=1,
                   help="how many times to generate (timed separately; with --interactive, per prompt)")
    p.add_argument("--batch_size", type=cli.at_least(1), default=1,
                   help="rows decoded together (the prompt repeated); sparse decode takes up to 8; refused before "
                        "the load where their KV cache cannot fit in the device's free memory")
    p.add_argument("--temperature", type=cli.non_negative_float, default=0.8,
                   help="sampling temperature; 0 (or below 1e-6) means greedy")
    p.add_argument("--top_k", type=cli.at_least(1), default=200, help="sample from the k most likely tokens")
    p.add_argument("--compile", action="store_true",
                   help="compile decode as gpt-fast does (fullgraph; on a GPU, where it is the fast path, CUDA "
                        "graphs and inductor's coordinate-descent tuning: about two minutes for a 7B/8B model, 30-50 s "
                        "in later runs, which reuse inductor's on-disk cache; on a CPU it takes a minute or two to "
                        "compile and gains little)")
    p.add_argument("--compile_prefill", action="store_true",
                   help="compile the prefill too (dynamic shapes: one compile serves every prompt of two or more "
                        "tokens; a one-token prompt prefills eagerly)")
    p.add_argument("--profile", type=cli.out_file, default=None, metavar="FILE",
                   help="write a torch.profiler trace of the last sample here (JSON for chrome://tracing or "
                        "Perfetto; that sample's timing then includes the profiler's overhead, and its text is "
                        "printed when it ends, not streamed)")
    p.add_argument("--device", type=cli.device, default=cli.default_device(), help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help=cli.DTYPE_HELP)
    p.add_argument("--sparsity", type=cli.sparsity, default=0.0,
                   help="TEAL sparsity in [0, 1): fraction of each linear's inputs zeroed during decode; 0 runs "
                        "the dense model (a thresholds file that other flags name is still checked)")
    p.add_argument("--thresholds", type=Path, default=None,
                   help="thresholds JSON from calibrate.py (default: beside the checkpoint, thresholds.json or, "
                        "with --score weighted, thresholds_weighted.json)")
    p.add_argument("--score", choices=thr_file.SCORES, default=None,
                   help="which scores to threshold: |x| (default; thresholds.json) or |x|*||W col|| "
                        "(thresholds_weighted.json); with --thresholds the file's own, a different --score is refused")
    p.add_argument("--greedy", action="store_true",
                   help="per-projection sparsities from calibrate.py --greedy; --sparsity is then the "
                        "parameter-weighted block sparsity")
    p.add_argument("--sparse_prefill", action="store_true",
                   help="apply the thresholds to the prompt too (prefill is dense by default)")
    p.add_argument("--seed", type=cli.seed, default=1234, help="random seed for sampling")
    p.add_argument("--no_stream", action="store_true", help="print each sample at the end, not token by token")
    args = p.parse_args(argv)
    if args.interactive and args.prompt is not None:
        p.error("--prompt and --interactive exclude each other (interactive prompts come from standard input)")
    if args.system is not None and not args.chat:
        p.error("--system is a turn of --chat's template")
    if args.prompt is None:
        args.prompt = DEFAULT_CHAT_PROMPT if args.chat else DEFAULT_PROMPT
    for flag in ("prompt", "system"):
        if not is_utf8(getattr(args, flag) or ""):
            p.error(f"--{flag} is not valid UTF-8 text")
    args.dtype = args.dtype or cli.default_dtype(args.device)
    if args.sparsity > 0 and args.batch_size > sparse_ops.MAX_BATCH:
        p.error(f"sparse decode takes --batch_size up to {sparse_ops.MAX_BATCH}")
    if args.interactive and args.profile:
        p.error("--profile traces one --prompt's last sample, not --interactive")
    if args.interactive and sys.stdin is None:
        p.error("--interactive reads prompts from standard input, which is closed")
    return args


def encode_prompt(tokenizer, text: str, args, room: int, room_name: str, history: Optional[list] = None) -> tuple:
    """(ids, shown): the prompt's tokens, after BOS where the tokenizer adds one (or the prompt is empty), or with
    --chat, text as the next user turn in the chat template (after --system's turn and the conversation so far,
    history); and those of them printed before the continuation (the prompt without BOS; none in a chat). With
    --max_new_tokens they must fit in room tokens: where the conversation would not, its oldest exchanges are
    removed from history (a note says so)."""
    if args.chat:
        history = [] if history is None else history
        dropped = 0
        while True:
            ids = tokenizer.encode_chat(text, args.system, history[2 * dropped:])
            if len(ids) + args.max_new_tokens <= room or 2 * dropped >= len(history):
                break
            dropped += 1  # the oldest exchange: a user turn and its reply
        if dropped and len(ids) + args.max_new_tokens <= room:
            del history[:2 * dropped]
            oldest = f"oldest {dropped} exchanges" if dropped > 1 else "oldest exchange"
            print(f"(the {oldest} left out of the conversation: the whole would not fit {room_name})", file=sys.stderr)
        shown = []
    else:
        bos = (tokenizer.add_bos or not text) and tokenizer.bos_id is not None  # as encode adds it
        ids = tokenizer.encode(text, bos=bos)
        shown = ids[1 if bos else 0:]
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    if len(ids) + args.max_new_tokens > room:
        what = "chat prompt (its template included: " if args.chat else "prompt ("
        goes_on = "; the conversation goes on without it" if history else ""  # even alone it would not fit
        raise ValueError(f"{what}{len(ids)} tokens) + --max_new_tokens ({args.max_new_tokens}) exceeds "
                         f"{room_name}{goes_on}")
    return ids, shown


def common_prefix(a: list, b: list) -> int:
    """How many leading tokens the two lists share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def read_prompts():
    """--interactive: prompts from standard input until a blank line, its end or Ctrl-C."""
    if hasattr(sys.stdin, "reconfigure"):
        # Bytes that are not UTF-8 arrive as lone surrogates, which main refuses line by line; strict decoding (a
        # locale such as en_US.UTF-8) would raise inside input() and end the session
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            text = input("What is your prompt? ").rstrip("\r")  # a Windows line end is no part of the prompt
        except (EOFError, KeyboardInterrupt):
            print()  # the next output starts on a line of its own
            return
        if not text.strip():
            return
        yield text


def report(model: Transformer, cal: Optional[dict], args, T: int, seq: Tensor, dt: float, sample_no: int,
           stop_ids: tuple, cached: int = 0) -> None:
    """A sample's statistics: tokens/s, bandwidth and, with a calibration, the sparsity its decode steps achieved.
    cached: the prompt's positions that were in the KV cache already (not prefilled)."""
    total_bytes, linear_bytes = model_bytes(model)
    n_new = seq.shape[1] - T
    # decoding ends once every row has stopped: the steps after the last row's stop are timed but not shown
    last_stop = max(next((j for j, t in enumerate(row) if t in stop_ids), n_new - 1) for row in seq[:, T:].tolist())
    past_stop = n_new - 1 - last_stop
    rows = "every row's" if args.batch_size > 1 else "the"
    print(f"\n\nsample {sample_no}: {n_new} tokens x {args.batch_size} row{'s' * (args.batch_size > 1)} in {dt:.2f}s: "
          f"{n_new * args.batch_size / dt:.1f} tokens/s (prefill included"
          + (f": {T - cached} of the prompt's {T} tokens, the rest cached from the conversation)" if cached else ")")
          + (f"; the text above is row 1 of {args.batch_size}" if args.batch_size > 1 else "")
          + (f"; {past_stop} decoded after {rows} end-of-sequence token (this sample was not streamed: decoding "
             f"looks for it every 16 steps)" if past_stop else ""))
    line = f"bandwidth {total_bytes * n_new / dt / 1e9:.1f} GB/s dense-equivalent"
    if cal is not None and n_new < 2:
        print("achieved sparsity (decode): no decode steps (the prefill made the only token)")
    elif cal is not None:
        s, skipped = achieved_sparsity(model, T, seq, prompt_cached=True).double()  # right after generate()
        skipped_bytes = float((linear_bytes * skipped).sum())
        weighted = float((linear_bytes * s).sum() / linear_bytes.sum())
        print("achieved sparsity (decode): " + ", ".join(f"{p} {v:.1%}" for p, v in zip(PROJECTIONS, s.tolist()))
              + f"; parameter-weighted {weighted:.1%}"
              + (f"; weight rows skipped (kept by no batch row) {skipped_bytes / float(linear_bytes.sum()):.1%}"
                 if args.batch_size > 1 else ""))
        # The fingerprint holds the shapes: the thresholds may be another model's (a few steps can stray anyway)
        if abs(weighted - args.sparsity) > 0.1 and n_new >= 16:
            print(f"warning: {weighted:.1%} of inputs dropped against --sparsity {args.sparsity}: were the "
                  f"thresholds in {cal['path']} calibrated on this model? (source: {cal['source']})", file=sys.stderr)
        if sparse_ops.use_triton(seq):  # without the kernels the reference masks and reads every weight
            line += f", {(total_bytes - skipped_bytes) * n_new / dt / 1e9:.1f} GB/s on the bytes read"
    print(line)
    if seq.is_cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")


def save_trace(profiler, path: Path) -> None:
    """The profiler's trace written into `path` as the other outputs are: torch writes a new file and moves it over
    the name, which would replace a device file (/dev/null) or a link rather than write through it."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / ("trace" + "".join(path.suffixes))  # .json.gz: torch compresses by the name
        profiler.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = cli.use_device(args.device)
    t0 = time.perf_counter()
    # Every input checked against config.json before the weights load (seconds to minutes for a large model)
    config = load_config(args.checkpoint)
    check_output(args.profile, args.checkpoint, "--profile", inputs=[args.thresholds])
    tokenizer = get_tokenizer(args.checkpoint.parent)
    cal = load_calibration(config, args)
    if cal is not None:
        check_kernel_widths(config, device)
    # --interactive compiled: one cache for every prompt, so one captured graph (the GPU's decode attention reads
    # only its filled positions); else each prompt gets a cache of its own length
    fixed_cache = args.interactive and (args.compile or args.compile_prefill)
    room, room_name = config.block_size, config.context()
    if fixed_cache and INTERACTIVE_CACHE < room:
        room, room_name = INTERACTIVE_CACHE, f"the {INTERACTIVE_CACHE}-token cache of a compiled --interactive session"
    encoded = None if args.interactive else encode_prompt(tokenizer, args.prompt, args, room, room_name)
    # interactive: every prompt would be refused, one by one, where even the chat template's own tokens leave no room
    if args.interactive:
        template_tokens = len(tokenizer.encode_chat("", args.system)) if args.chat else 0
        if template_tokens + args.max_new_tokens >= room:
            raise ValueError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in {room_name}"
                             + (f" (the chat template takes {template_tokens} tokens)" if args.chat else ""))
    # the longest cache the run sets up (an interactive one without --compile: at least this long)
    longest = room if fixed_cache else args.max_new_tokens + (len(encoded[0]) if encoded else 1)
    check_memory(config, DTYPES[args.dtype], device, args.batch_size, longest)
    # dense decode keeps the row-major weights: inductor's one-row GEMVs reduce along their contiguous rows (8%
    # faster than cuBLAS on Llama-3-8B); across the sparse ops' column-major layout they read slowly
    # (docs/benchmarks.md, "generate.py on the GPU")
    model = load_model(args.checkpoint, device=device, dtype=DTYPES[args.dtype], column_major=cal is not None)
    if cal is not None:
        thr_file.apply(model, cal, args.sparsity, args.greedy, prefill=args.sparse_prefill)
    if fixed_cache:
        model.setup_caches(args.batch_size, room)
    used = "; dense"
    if cal is not None:  # which of the file's thresholds serve this level
        kind = (", greedy allocation" if args.greedy else
                ", sparse-aware thresholds" if thr_file.uses_sparse_aware(cal, args.sparsity) else
                ", TEAL's thresholds: --sparsity is above the file's sparse-aware levels" if cal.get("sparse_aware")
                else "")
        used = f"; sparsity {args.sparsity} from {cal['path']} ({cal['score']} scores{kind})"
    print(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f}s{used}", file=sys.stderr)

    decode_fn, prefill_fn = decode_one_token, prefill
    if args.compile:
        decode_fn = compile_decode(device)
    if args.compile_prefill:
        prefill_fn = torch.compile(prefill, fullgraph=True)  # generate() marks the prompt's length dynamic
    stop_ids = tuple(tokenizer.eos_ids)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    n_warmup = 1 if args.compile or args.compile_prefill else 0  # the first run compiles and captures; not timed
    history = []  # --chat --interactive: the conversation so far, user turns and the replies to them
    in_cache = []  # --chat --interactive: the tokens whose keys and values the KV cache holds for every row
    refused = 0  # --interactive: prompts refused, each with an error line, the session going on
    for text in read_prompts() if args.interactive else [args.prompt]:
        try:
            if not is_utf8(text):
                raise ValueError("the prompt is not valid UTF-8 text")
            ids, shown_ids = encoded or encode_prompt(tokenizer, text, args, room, room_name, history)
        except ValueError as e:  # an interactive prompt refused (too long, not UTF-8 ...): say so, ask for the next
            if not args.interactive:
                raise
            print(f"error: {e}", file=sys.stderr)
            refused += 1
            continue
        T = len(ids)
        # a conversation: the cache still holds the last turn, of which this prompt repeats the start (at least one
        # token left to prefill: its logits give the first new token)
        cached = min(common_prefix(in_cache, ids), T - 1) if args.chat else 0
        if not fixed_cache:
            model.setup_caches(args.batch_size, T + args.max_new_tokens, keep=cached)
        prompt = torch.tensor(ids, dtype=torch.long, device=device).repeat(args.batch_size, 1)

        def shown_text(seq: Tensor, partial: bool = False) -> str:
            """Row 1 as gpt-fast prints it: the prompt (without BOS; a chat's reply alone) and what follows, up to
            the first stop token. Decoded whole: sentencepiece drops a leading space from a continuation decoded on
            its own. partial (a sample still decoding): less the text that later tokens may change, so that the
            streamed text is the whole one: a character whose bytes span tokens decodes to U+FFFD until its last
            byte comes, and HF's ByteFallback decoder (Llama-2's, Mistral's tokenizer.json) decodes a run of byte
            pieces as a whole, every byte U+FFFD where one is not UTF-8, so a trailing run of them waits."""
            new = seq[0, T:].tolist()
            new = next((new[:j] for j, t in enumerate(new) if t in stop_ids), new)
            while partial and new and BYTE_PIECE.fullmatch(tokenizer.id_to_token(new[-1]) or ""):
                new.pop()
            text = tokenizer.decode(shown_ids + new)
            return text.rstrip("\ufffd") if partial else text

        for i in range(n_warmup + args.num_samples):
            warmup = i < n_warmup
            if i == n_warmup:  # each prompt's samples from the seed, as a --prompt run's, warm-up or not
                torch.manual_seed(args.seed)
            profiling = args.profile is not None and i == n_warmup + args.num_samples - 1
            shown = [0]

            def stream(seq, final=False):
                s = shown_text(seq, partial=not final)
                print(s[shown[0]:], end="", flush=True)
                shown[0] = len(s)

            # the profiled sample is not streamed: a host sync per token would be in its trace, and the profiler's
            # own lines on stderr in its text
            on_token = None if (args.no_stream or warmup or profiling) else stream
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            profiler = torch.profiler.profile(activities=activities) if profiling else contextlib.nullcontext()
            t = time.perf_counter()
            try:
                with profiler:
                    seq = generate(model, prompt, args.max_new_tokens, decode_fn, args.temperature, args.top_k,
                                   stop_ids, on_token, prefill_fn, cached)
            except BaseException:
                if shown[0]:
                    print(flush=True)  # an error's line starts below the streamed text
                raise
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            if warmup:
                print(f"compiled and warmed up in {dt:.1f}s", file=sys.stderr)
                continue
            if on_token is None:
                print(shown_text(seq), end="")
            else:
                stream(seq, final=True)
            report(model, cal, args, T, seq, dt, i + 1 - n_warmup, stop_ids, cached)
            if profiling:
                save_trace(profiler, args.profile)
                print(f"profiler trace of this sample (timing includes the profiler's overhead) in {args.profile}")
        n_warmup = 0  # compiled once for every prompt
        if args.chat:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": shown_text(seq)}]
            # the prompt, and with one row its reply as decode made it (each decode step writes its input token's
            # keys and values: all but the last token); the rows of a batch have replies of their own
            in_cache = seq[0, :-1].tolist() if args.batch_size == 1 else ids
    if refused:  # a script that pipes prompts in learns it from the exit status
        raise ValueError(f"{refused} prompt{'s were' if refused > 1 else ' was'} refused (the errors above)")

if __name__ == "__main__":
    cli.run(main)
