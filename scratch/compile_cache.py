"""Session 34 throwaway: generate.main in this process, then inductor's cache counters (FX graph cache hits, misses,
bypasses) on stderr: does a second process reuse the first one's compile?"""
import sys

from torch._dynamo.utils import counters

import generate

try:
    generate.main(sys.argv[1:])
finally:
    print("inductor counters:", {k: v for k, v in counters["inductor"].items() if "cache" in k}, file=sys.stderr)
