"""Session 34 throwaway: turn 2 of a SmolLM2 chat at 40% sparsity, prefilled after a cached prefix of turn 1's
prompt and prefilled whole: per decode step the greedy tokens and the logits' largest difference (relative)."""
import torch, sys
from pathlib import Path
sys.path.insert(0, ".")
from checkpoint import load_model, load_config
import thresholds as tf, generate
from tokenizer import get_tokenizer
ck = Path("checkpoints/smollm2-135m/model.pth")
m = load_model(ck, device=torch.device("cpu"), dtype=torch.float32, column_major=True)
cal = tf.load(tf.default_path(ck), load_config(ck))
tf.apply(m, cal, 0.4, False, prefill=False)
tok = get_tokenizer(ck.parent)
h = [{"role":"user","content":"What is a Python list comprehension?"}]
p1 = tok.encode_chat("What is a Python list comprehension?", None, [])
reply = "List comprehensions are a syntax that allows you to create a list of lists."
p2 = tok.encode_chat("Show me an example that squares numbers.", None, h + [{"role":"assistant","content":reply}])
c = generate.common_prefix(p1, p2); print(len(p1), len(p2), c)
def run(keep):
    m.setup_caches(1, len(p1) + 4)
    m(torch.tensor([p1]), torch.arange(len(p1)), prefill=True)
    m.setup_caches(1, len(p2) + 40, keep=keep)
    lg = [m(torch.tensor([p2[keep:]]), torch.arange(keep, len(p2)), prefill=True)[:, -1]]
    t = lg[0].argmax(-1)
    toks = [t.item()]
    for i in range(30):
        lg.append(m(t.view(1,1), torch.tensor([len(p2)+i]))[:, -1]); t = lg[-1].argmax(-1); toks.append(t.item())
    return lg, toks
with torch.no_grad():
    a, ta = run(c); b, tb = run(0)
for i,(x,y) in enumerate(zip(a,b)):
    print(i, ta[i], tb[i], f"{(x-y).abs().max().item()/x.abs().max().item():.2e}")
    if ta[i] != tb[i]: break
