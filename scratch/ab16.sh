#!/usr/bin/env bash
# Same-machine A/B: the batch-1 kernel table at 40/50% with gemv.py before (ac133d5) and after (7034b38) the
# threshold-0 change, alternately, twice each.
set -u
rm -rf /tmp/kept && mkdir -p /tmp/kept && cp -r sparse_ops scripts /tmp/kept/ && cp scratch/gemv_before_threshold0.py /tmp/kept/sparse_ops/gemv.py
for r in 1 2; do
  (cd /tmp/kept && timeout 120 python3 scripts/bench_kernels.py --batch 1 --sparsity 0.4,0.5 --json $OUT/ab_before$r.json 2>&1 | grep -v -i warn | grep -v GLU > $OUT/ab_before$r.txt)
  timeout 120 python3 scripts/bench_kernels.py --batch 1 --sparsity 0.4,0.5 --json $OUT/ab_after$r.json 2>&1 | grep -v -i warn | grep -v GLU > $OUT/ab_after$r.txt
done
python3 - <<'PY'
import json, os
o = os.environ["OUT"]
runs = {k: [json.load(open(f"{o}/ab_{k}{r}.json"))["rows"] for r in (1, 2)] for k in ("before", "after")}
for i, row in enumerate(runs["before"][0]):
    b = [runs["before"][r][i]["kernel_us"] for r in (0, 1)]
    a = [runs["after"][r][i]["kernel_us"] for r in (0, 1)]
    print(f"{row['shape']:28s} s={row['sparsity']:.2f} before {b[0]:6.2f} {b[1]:6.2f}  after {a[0]:6.2f} {a[1]:6.2f}")
PY
